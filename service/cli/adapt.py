"""``detseg adapt``: fine-tune the served detector and SAM 2 on a COCO dataset, measured before and after; the
result is a signed folder that ``detseg serve --adapted`` serves under its own version."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from tqdm import tqdm

from service.adaptation.recipes import METHODS, PRECISIONS, DetectorRecipe, SegmenterRecipe
from service.cli.common import MODEL_FLAGS, add_model_flags, number, settings_from
from service.startup import configure_process

STAGES = ("before", "detector", "segmenter", "after")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d, s = DetectorRecipe(), SegmenterRecipe()  # the defaults the help states
    a = sub.add_parser(
        "adapt", help="fine-tune the detector and SAM 2 on a COCO dataset; before/after report; a signed version"
    )
    a.add_argument("annotations", type=Path, help="COCO instances JSON (e.g. `detseg label`'s export, reviewed)")
    a.add_argument("--images", type=Path, help="folder the file_names are relative to (default: beside the JSON)")
    a.add_argument("--out", type=Path, required=True, help="the adapted version's folder (re-runs resume here)")
    a.add_argument("--holdout", type=Path, help="COCO JSON of held-out images (default: a share of the data)")
    a.add_argument(
        "--holdout-fraction",
        type=number(float, 0, 1, open_low=True, open_high=True),
        default=0.15,
        help="share held out when no --holdout",
    )
    a.add_argument("--original", type=Path, help="COCO JSON of the base models' own domain: forgetting shows there")
    a.add_argument(
        "--replay", type=Path, help="COCO JSON of other images of that domain, trained beside the data: less forgetting"
    )
    a.add_argument("--version", default="", help="version string (default: base version + adapt. + a data hash)")
    a.add_argument("--segmenter-method", choices=METHODS, default=s.method, help=f"default {s.method}")
    minutes = number(float, 0, open_low=True)  # ultralytics reads a time of 0 as no limit (1,000 epochs)
    a.add_argument("--detector-minutes", type=minutes, default=d.minutes, help=f"default {d.minutes}")
    a.add_argument("--segmenter-minutes", type=minutes, default=s.minutes, help=f"default {s.minutes}")
    a.add_argument(
        "--max-clicks",
        type=number(int, 0),
        default=s.max_clicks,
        help=f"SAM: longest simulated click sequence per instance and step (0: random clicks; default {s.max_clicks})",
    )
    a.add_argument(
        "--detector-precision",
        choices=PRECISIONS,
        default=d.precision,
        help="number format the detector trains in: bf16 autocast, fp32, or auto: bf16 where the CPU has a bfloat16 "
        f"unit (AVX512-BF16, AMX), else fp32 (default {d.precision}); the file saved and served is float32",
    )
    a.add_argument("--seed", type=number(int, 0), default=0)
    a.add_argument(
        "--noc-instances", type=number(int, 0), default=50, help="instances the simulated annotator clicks on"
    )
    a.add_argument("--signing-key", type=Path, help="Ed25519 private key (PEM) that signs the folder's manifest")
    a.add_argument("--no-progress", dest="progress", action="store_false")
    add_model_flags(a)
    a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args, MODEL_FLAGS)
    # ultralytics offline, no auto-install, quiet unless asked (its trainer prints a progress bar per epoch and
    # validation): before its trainer is imported
    configure_process(settings)
    # Imported here: it loads torch (see the package's docstring).
    from service.adaptation.run import AdaptJob, adapt

    job = AdaptJob(
        annotations=args.annotations,
        out=args.out,
        settings=settings,
        images=args.images,
        holdout=args.holdout,
        holdout_fraction=args.holdout_fraction,
        original=args.original,
        replay=args.replay,
        detector=dataclasses.replace(
            DetectorRecipe(), minutes=args.detector_minutes, seed=args.seed, precision=args.detector_precision
        ),
        segmenter=dataclasses.replace(
            SegmenterRecipe(),
            method=args.segmenter_method,
            minutes=args.segmenter_minutes,
            max_clicks=args.max_clicks,
            seed=args.seed,
        ),
        version=args.version,
        signing_key=args.signing_key,
        noc_instances=args.noc_instances,
        command=shlex.join(["detseg", *args.argv]),
    )
    with tqdm(total=len(STAGES) * 100, unit="%", file=sys.stderr, disable=not args.progress or None) as bar:

        def progress(stage: str, fraction: float) -> None:
            bar.set_description(stage)
            bar.n = round(100 * (STAGES.index(stage) + fraction))
            bar.refresh()

        try:
            result = adapt(job, progress)
        except ValueError as e:
            print(f"detseg adapt: {e}", file=sys.stderr)
            return 2
    metrics = result.card["metrics"]
    print(f"adapted version {result.version} in {args.out} ({result.seconds / 60:.1f} min)")
    for dataset, after in metrics["after"].items():
        before = metrics["before"].get(dataset, {})
        line = ", ".join(
            f"{name} {_fmt(before.get(name))} → {_fmt(after.get(name))}"
            for name in ("mask_ap50", "matched_mask_iou", "box_ap50", "noc@85")
        )
        print(f"  {dataset}: {line}")
    print(f"report: {args.out / 'comparison.html'}; serve it: detseg serve --adapted {args.out}")
    return 0


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
