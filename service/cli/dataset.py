"""``detseg eval`` and ``detseg label``: many images through the service, a running one (--target) or one started
in this process for the model flags."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from service.cli.common import (
    MODEL_FLAGS,
    add_connection_flags,
    add_model_flags,
    connects,
    number,
    settings_from,
    target_client,
)
from service.client import Client, RequestFailed
from service.errors import ConfigurationError
from service.evaluation.dataset import load_dataset
from service.evaluation.predict import Prompt
from service.evaluation.run import run_eval
from service.labeling.run import FORMATS as LABEL_FORMATS
from service.labeling.run import Prompts, check_formats, check_prompts, image_files, label_folder
from service.provenance import load_private_key


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    v = sub.add_parser("eval", help="a COCO dataset through the service: AP, IoU per class and slice, NoC, report")
    v.add_argument("annotations", type=Path, help="COCO instance-segmentation JSON")
    v.add_argument("--images", type=Path, help="folder the file_names are relative to (default: beside the JSON)")
    v.add_argument("--slices", type=Path, help="JSON: file_name (or image id) -> {attribute: value}")
    v.add_argument("--prompt", choices=[k.value for k in Prompt], default=Prompt.CLASSES.value, help="default classes")
    v.add_argument("--out", type=Path, default=Path("eval-report"), help="report folder (default eval-report)")
    v.add_argument("--limit", type=number(int, 1), help="the first N images only")
    v.add_argument(
        "--score-threshold", type=number(float, 0, 1), default=0.05, help="asked of the server (low, for AP)"
    )
    v.add_argument(
        "--operating-threshold", type=number(float, 0, 1), help="score instances are kept at (default: server's)"
    )
    v.add_argument(
        "--noc-instances", type=number(int, 0), default=100, help="instances the simulated annotator clicks on"
    )
    _client_flags(v)
    v.set_defaults(func=evaluate)

    lab = sub.add_parser("label", help="pre-label a folder of images through the service; COCO/YOLO/CVAT/LS exports")
    lab.add_argument("folder", type=Path, help="images (JPEG, PNG, WebP; searched recursively)")
    lab.add_argument("--out", type=Path, required=True, help="records, errors, exports/ (re-runs resume here)")
    lab.add_argument("--classes", default="", help="comma-separated class names")
    lab.add_argument("--text", action="append", default=[], help="free-text prompt (repeatable)")
    lab.add_argument("--score-threshold", type=number(float, 0, 1))
    lab.add_argument("--formats", default=",".join(LABEL_FORMATS), help=f"default {','.join(LABEL_FORMATS)}")
    lab.add_argument("--image-url-prefix", default="/data/local-files/?d=", help="Label Studio image URL prefix")
    lab.add_argument("--signing-key", type=Path, help="Ed25519 private key (PEM) that signs the manifest")
    lab.add_argument("--no-progress", dest="progress", action="store_false")
    _client_flags(lab)
    lab.set_defaults(func=label)


def _client_flags(p: argparse.ArgumentParser) -> None:
    """--target, or the models of a server started in this process (as serve would load them)."""
    p.add_argument("--target", help="a running server; default: start one in this process with --models")
    add_model_flags(p)
    p.add_argument(
        "--timeout", type=number(float, 0, open_low=True), default=300.0, help="per-request deadline in seconds"
    )
    add_connection_flags(p)


@contextlib.contextmanager
def _client(args: argparse.Namespace) -> Iterator[Client]:
    """The client of the server to talk to: --target (with the connection flags), or an in-process server (free
    loopback port, plaintext) for the model flags."""
    if args.target:
        with target_client(args) as client:
            yield client
        return
    if connects(args):
        raise ConfigurationError("--tls, --tls-ca, --tls-cert, --tls-key and --token-file reach a --target server")
    from service.app import InProcessServer  # loads torch: only when this process serves

    settings = settings_from(args, MODEL_FLAGS).replace(host="127.0.0.1", port=0)
    with InProcessServer(settings) as server:
        server.wait_serving()
        with Client(server.target, timeout=args.timeout) as client:
            yield client


def evaluate(args: argparse.Namespace) -> int:
    try:
        dataset = load_dataset(args.annotations, args.images, args.slices)
    except ValueError as e:  # what the files lack, named (as `label` and `adapt` print theirs)
        print(f"detseg eval: {e}", file=sys.stderr)
        return 2
    if args.limit:
        dataset = dataset.limit(args.limit)
    with _client(args) as client:
        figures = run_eval(
            client,
            dataset,
            args.out,
            prompt=Prompt(args.prompt),
            score_threshold=args.score_threshold,
            operating_threshold=args.operating_threshold,
            noc_instances=args.noc_instances,
            title=f"detseg eval: {args.annotations.name}",
        )
    o, noc = figures["overall"], figures["noc"]
    print(
        f"{figures['images']} images: mask AP {_fig(figures['mask_ap'])} AP50 {_fig(figures['mask_ap50'])}, box AP "
        f"{_fig(figures['box_ap'])} AP50 {_fig(figures['box_ap50'])}; recall {_fig(o['recall'])}, mean mask IoU "
        f"{_fig(o['mean_mask_iou'])}, FP/image {_fig(o['false_positives_per_image'], 2)}; NoC@85 "
        f"{_fig(noc.get('noc@85'), 1)}, NoC@90 {_fig(noc.get('noc@90'), 1)}"
    )
    print(f"report: {args.out / 'report.html'}")
    if figures["failed_images"]:
        first = figures["failed_images"][0]
        print(
            f"detseg eval: {len(figures['failed_images'])} of {figures['images']} images failed and count as empty "
            f"(the report lists them; first: {first['file_name']}: {first['error']})",
            file=sys.stderr,
        )
        return 1
    return 0


def label(args: argparse.Namespace) -> int:
    prompts = Prompts(
        classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()),
        texts=tuple(args.text),
        score_threshold=args.score_threshold,
    )
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    try:
        check_prompts(prompts)  # InvalidInput (a DetsegError: reported by main) before any server starts
        check_formats(formats)
        image_files(args.folder)  # ValueError: no such folder, or no image in it
        if args.signing_key is not None:
            load_private_key(args.signing_key)  # ValueError: no Ed25519 private key (checked again where it is used)
        with _client(args) as client:
            summary = label_folder(
                client,
                args.folder,
                args.out,
                prompts,
                formats=formats,
                image_url_prefix=args.image_url_prefix,
                signing_key=args.signing_key,
                progress=args.progress,
            )
    except (RequestFailed, ValueError) as e:
        print(f"detseg label: {e}", file=sys.stderr)
        return 2
    print(
        f"{summary.images} images: {summary.labeled_now} labeled now, {summary.skipped} already done, "
        f"{summary.failed} failed (see {args.out / 'errors.jsonl'}); {summary.instances} instances, "
        f"{summary.flagged} flagged for review"
    )
    for name, path in summary.exports.items():
        print(f"  {name:<13} {path}")
    return 1 if summary.failed else 0


def _fig(value: float | None, decimals: int = 3) -> str:
    """A figure of the summary line; "–" where there is none (nothing matched, no annotator run)."""
    return "–" if value is None else f"{value:.{decimals}f}"
