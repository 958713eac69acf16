"""``detseg adapt``: a COCO dataset → the served models adapted to it, measured before and after, signed.

Stages, each recorded in ``<out>/work/state.json`` under a key of everything it depends on (the data's sha256, the
base models' sha256, the recipe), so that a re-run with the same inputs resumes after the last finished stage and
a run with other inputs starts over:

1. ``before``: ``detseg eval`` of the base models on the held-out split (and on ``original``, a dataset of the
   base's own domain, when given: forgetting shows there), through a server started in this process;
2. ``detector``: ultralytics' trainer from the base detector (``adaptation.detector``);
3. ``segmenter``: SAM 2 on cached features (``adaptation.segmenter``);
4. ``after``: the card is written and the same evaluations run on a server that loads the folder (``--adapted``),
   exactly as ``detseg serve --adapted <out>`` will serve it.

Then the card gets the figures, the before/after report is written, and ``detseg-manifest.json`` covers every file
of the folder (signed with ``signing_key`` when given); ``detseg verify <out>`` checks it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service import __version__
from service.adaptation import data as adapt_data
from service.adaptation.detector import adapt_detector
from service.adaptation.recipes import DetectorRecipe, SegmenterRecipe
from service.adaptation.segmenter import adapt_decoder
from service.app import InProcessServer
from service.client import Client
from service.config import Settings
from service.evaluation.dataset import EvalDataset, load_dataset
from service.evaluation.report import write_comparison
from service.evaluation.run import run_eval
from service.models.adapted import CARD_NAME, CARD_SCHEMA
from service.models.catalog import PROFILE_SCORE_THRESHOLDS
from service.models.profiles import ModelSet, resolve_models
from service.provenance import canonical_json, file_sha256, load_private_key, manifest, sha256_hex
from service.provenance.exports import PLACED_INPUTS, files_under, write_signed_export
from service.provenance.manifests import KIND_EXPORT, MANIFEST_NAME

STATE_NAME = "state.json"
HOLDOUT_NAME = "holdout.json"


@dataclasses.dataclass(frozen=True)
class AdaptJob:
    """Everything ``detseg adapt`` was asked. ``settings``: the base models (as for serve) and the in-process
    servers' settings; ``holdout``: a COCO file of held-out images (else ``holdout_fraction`` of ``annotations``,
    seeded); ``original``: a COCO dataset of the base models' own domain, evaluated before and after; ``replay``:
    another of that domain, trained beside the data (never evaluated; so it must not be ``original``)."""

    annotations: Path
    out: Path
    settings: Settings
    images: Path | None = None
    holdout: Path | None = None
    holdout_fraction: float = 0.15
    original: Path | None = None
    replay: Path | None = None
    detector: DetectorRecipe = dataclasses.field(default_factory=DetectorRecipe)
    segmenter: SegmenterRecipe = dataclasses.field(default_factory=SegmenterRecipe)
    version: str = ""  # default: the base detector's version + "+adapt." + the job key's first 8 hex digits
    signing_key: Path | None = None
    noc_instances: int = 50
    command: str = ""


@dataclasses.dataclass(frozen=True)
class AdaptResult:
    folder: Path
    version: str
    card: dict[str, Any]
    seconds: float


Progress = Callable[[str, float], None]  # (stage, fraction of it done)


def adapt(job: AdaptJob, progress: Progress = lambda stage, fraction: None) -> AdaptResult:
    t = time.perf_counter()
    # The data first: what is wrong with it is said before any folder is written or any model resolved (the
    # official weights may be fetched).
    dataset = load_dataset(job.annotations, job.images)
    original = load_dataset(job.original) if job.original else None
    digests: dict[Path, str] = {}  # each image's sha256, read once for the split and the data's identity
    split = _split(job, dataset, original, digests)
    signing_key = load_private_key(job.signing_key) if job.signing_key else None  # ValueError before any training
    out = job.out
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    base = resolve_models(job.settings.replace(adapted=""), progress=False)
    # Both evaluations at one operating point: the base detector's calibrated default score threshold (or the
    # settings'), which the card carries to every server of the folder.
    calibrated = PROFILE_SCORE_THRESHOLDS.get(base.profile)
    measured = job.settings.replace(default_score_threshold=job.settings.request_score_threshold(calibrated))
    data = _data_identity(job, dataset, split.replay, digests)
    key = sha256_hex(
        canonical_json(
            {
                "data": data,
                "base": _base_models(base),
                "holdout": [i.file_name for i in split.holdout.images],
                "original": file_sha256(job.original) if job.original else None,
                "replay": data["replay"],
                "detector": dataclasses.asdict(job.detector),
                "segmenter": dataclasses.asdict(job.segmenter),
                "noc_instances": job.noc_instances,
                "score_threshold": measured.default_score_threshold,
            }
        )
    )
    version = job.version or f"{base.detector.version}+adapt.{key[:8]}"
    state = _State(work / STATE_NAME, key)
    # Which images were held out (file names as in the annotations): the figures' data, kept with the version.
    (out / HOLDOUT_NAME).write_text(json.dumps(split.holdout.coco))

    before = state.get("before")
    if before is None:
        settings = measured.replace(adapted="")  # the base models, as resolved above
        before = _evaluate(settings, split.holdout, original, out / "eval" / "before", job, progress, "before")
        state.put("before", before)

    detector = state.get("detector")
    if detector is None:
        det_work = work / "detector"
        if det_work.exists():
            shutil.rmtree(det_work)
        det_work.mkdir()
        names = adapt_data.class_names(split)
        yolo = adapt_data.write_yolo(split, det_work / "data")
        imgsz = _detector_input_size(base)
        with training_threads(job.detector.threads):
            weights, det_result = adapt_detector(
                base.detector.path, names, yolo, det_work, imgsz, job.detector, lambda f, _: progress("detector", f)
            )
        shutil.copyfile(weights, out / "detector.pt")
        detector = {"file": "detector.pt", **dataclasses.asdict(det_result)}
        state.put("detector", detector)

    segmenter = state.get("segmenter")
    if segmenter is None:
        with training_threads(job.segmenter.threads):
            segmenter = _adapt_segmenter(base, split, job.segmenter, out / "segmenter.pt", progress)
        state.put("segmenter", segmenter)

    card = _card(job, base, version, data, split, detector, segmenter, key)
    card["score_threshold"] = calibrated
    card["evaluation"] = {"score_threshold": measured.default_score_threshold, "noc_instances": job.noc_instances}
    (out / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    after = state.get("after")
    if after is None:
        settings = measured.replace(adapted=str(out))
        after = _evaluate(settings, split.holdout, original, out / "eval" / "after", job, progress, "after")
        state.put("after", after)
    card["metrics"] = {"before": before, "after": after}
    card["seconds"] = {"detector": detector["seconds"], "segmenter": segmenter["seconds"]}
    (out / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    write_comparison(before, after, out, f"detseg adapt: {version}")
    shutil.rmtree(work)  # stage results live on in the card; a finished run has nothing to resume
    _sign(out, job, base, card, signing_key)
    return AdaptResult(out, version, card, time.perf_counter() - t)


@contextlib.contextmanager
def training_threads(threads: int) -> Iterator[None]:
    """torch's thread count on this thread for a training stage: ``threads``, or every core the process may use
    (0); the count before is restored after. Set, not inherited: the "before" evaluation's in-process server leaves
    the process's thread at 1 (``service.runners.local.torch_thread``), and ultralytics' ``select_device`` at cores
    - 1; inherited, both stages trained on 1 of a 2-core machine's cores (docs/adaptation.md)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _State:
    """Finished stages' results under the job's key; a different key discards them."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        saved = json.loads(path.read_text()) if path.exists() else {}
        self.stages: dict[str, Any] = saved.get("stages", {}) if saved.get("key") == key else {}

    def get(self, stage: str) -> Any:
        return self.stages.get(stage)

    def put(self, stage: str, result: Any) -> None:
        self.stages[stage] = result
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, "stages": self.stages}, indent=1))
        tmp.replace(self.path)


def _split(
    job: AdaptJob, dataset: EvalDataset, original: EvalDataset | None, digests: dict[Path, str] | None = None
) -> adapt_data.Split:
    """The training, held-out and replay sets. No image measured is trained on, compared by content (sha256), not
    by name or id: an image of the data listed twice, a given ``--holdout``'s images (a subset of the data, say),
    and replay images that are held out or in ``--original`` are left out of training."""
    if job.holdout is None:
        split = adapt_data.split(dataset, job.holdout_fraction, job.segmenter.seed)
    else:
        holdout = load_dataset(job.holdout, job.images)
        if holdout.categories != dataset.categories:
            raise ValueError(f"{job.holdout}: its categories differ from {job.annotations}'s")
        split = adapt_data.Split(dataset, holdout)
    digests = {} if digests is None else digests
    measured = _contents(split.holdout, digests) | (_contents(original, digests) if original is not None else set())
    train = _without(split.train, measured, digests)
    if not train.images:
        raise ValueError(f"{job.annotations}: every image is also held out or in --original; nothing to train on")
    annotations = train.coco["annotations"]
    if annotations and all(a.get("iscrowd") for a in annotations):  # nothing to train on, said rather than done
        raise ValueError(
            f"{job.annotations}: every annotation of the training images is a crowd region (iscrowd 1), which is "
            "not trained on (COCO's meaning: a group, no instance); CVAT's COCO export (datumaro) writes its masks so: "
            "set iscrowd to 0 for instances"
        )
    split = dataclasses.replace(split, train=train)
    if job.replay is None:
        return split
    if job.original is not None and job.replay.resolve() == job.original.resolve():
        raise ValueError("--replay and --original are one file: forgetting must be measured on images not trained on")
    return dataclasses.replace(split, replay=_without(load_dataset(job.replay), measured, digests))


def _digest(path: Path, digests: dict[Path, str]) -> str:
    """``path``'s sha256, read once per run (``digests``: the run's, by path)."""
    if path not in digests:
        digests[path] = file_sha256(path)
    return digests[path]


def _contents(dataset: EvalDataset, digests: dict[Path, str]) -> set[str]:
    return {_digest(i.path, digests) for i in dataset.images}


def _without(dataset: EvalDataset, contents: set[str], digests: dict[Path, str]) -> EvalDataset:
    """``dataset`` without its images whose sha256 is in ``contents``."""
    return dataset.subset({i.id for i in dataset.images if _digest(i.path, digests) not in contents})


def _data_identity(
    job: AdaptJob, dataset: EvalDataset, replay: EvalDataset | None, digests: dict[Path, str]
) -> dict[str, Any]:
    """The data's sha256 (``_files_identity``), its categories, and the same for the replay set."""
    return {
        **_files_identity(job.annotations, dataset, digests),
        "holdout_sha256": file_sha256(job.holdout) if job.holdout else None,
        "categories": [dataset.categories[k] for k in sorted(dataset.categories)],
        "replay": None if replay is None or job.replay is None else _files_identity(job.replay, replay, digests),
    }


def _files_identity(annotations: Path, dataset: EvalDataset, digests: dict[Path, str]) -> dict[str, Any]:
    """A COCO file's name and sha256, and one sha256 over every image's (file name, sha256) in order."""
    images = [[i.file_name, _digest(i.path, digests)] for i in dataset.images]
    return {
        "annotations": annotations.name,
        "annotations_sha256": file_sha256(annotations),
        "images": len(images),
        "images_sha256": sha256_hex(canonical_json(images)),
    }


def _base_models(base: ModelSet) -> list[dict[str, str]]:
    return [
        {"role": ref.role.value, "name": ref.name, "version": ref.version, "sha256": ref.sha256}
        for ref in (base.detector, base.segmenter)
    ]


def _detector_input_size(base: ModelSet) -> int:
    from service.models.loading import load_detector_module

    return load_detector_module(base.detector.path).input_size()


def _adapt_segmenter(
    base: ModelSet, split: adapt_data.Split, recipe: SegmenterRecipe, out: Path, progress: Progress
) -> dict[str, Any]:
    import torch

    from service.models.loading import load_segmenter_module

    ref = base.segmenter
    model = load_segmenter_module(ref.architecture, ref.path, ref.overrides)
    side = int(model.image_size)
    train, holdout = adapt_data.sam_examples(split.train, side), adapt_data.sam_examples(split.holdout, side)
    if split.replay is not None:
        train += adapt_data.sam_examples(split.replay, side)
    result = adapt_decoder(model, train, holdout, recipe, lambda f, _: progress("segmenter", f))
    torch.save({"model": model.state_dict()}, out)  # float32: the weights the figures were measured with
    return {"file": out.name, **dataclasses.asdict(result)}


def _evaluate(
    settings: Settings,
    holdout: EvalDataset,
    original: EvalDataset | None,
    out: Path,
    job: AdaptJob,
    progress: Progress,
    stage: str,
) -> dict[str, Any]:
    """``detseg eval`` figures of the settings' models on the held-out split (and the original domain)."""
    figures: dict[str, Any] = {}
    with InProcessServer(settings.replace(host="127.0.0.1", port=0)) as server:
        server.wait_serving()
        with Client(server.target, timeout=300) as client:
            for name, dataset in (("holdout", holdout), ("original", original)):
                if dataset is None:
                    continue
                progress(stage, 0.0 if name == "holdout" else 0.5)
                result = run_eval(
                    client, dataset, out / name, noc_instances=job.noc_instances, title=f"{stage}: {name}"
                )
                figures[name] = _summary(result)
    progress(stage, 1.0)
    return figures


def _summary(figures: dict[str, Any]) -> dict[str, Any]:
    """What the card and the comparison keep of ``run_eval``'s figures."""
    o = figures["overall"]
    return {
        "images": figures["images"],
        "mask_ap": figures["mask_ap"],
        "mask_ap50": figures["mask_ap50"],
        "box_ap": figures["box_ap"],
        "box_ap50": figures["box_ap50"],
        "recall": o["recall"],
        "matched_mask_iou": o["mean_mask_iou"],
        "false_positives_per_image": o["false_positives_per_image"],
        "noc@85": figures["noc"].get("noc@85"),
        "noc@90": figures["noc"].get("noc@90"),
        "ap50_per_class": figures["ap50_per_class"],
        "per_slice": {
            attribute: {
                value: {"recall": g["recall"], "mean_mask_iou": g["mean_mask_iou"]} for value, g in groups.items()
            }
            for attribute, groups in figures["per_slice"].items()
        },
        "classes_not_asked": figures["classes_not_asked"],
        "models": figures["models"],
    }


def _card(
    job: AdaptJob,
    base: ModelSet,
    version: str,
    data: dict[str, Any],
    split: adapt_data.Split,
    detector: dict[str, Any],
    segmenter: dict[str, Any],
    key: str,
) -> dict[str, Any]:
    out = job.out
    return {
        "schema": CARD_SCHEMA,
        "version": version,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "detseg_version": __version__,
        "command": job.command,
        "key": key,
        "base": _base_models(base),
        "base_profile": base.profile,
        "detector": {
            "file": "detector.pt",
            "name": f"{base.detector.name}-adapted",
            "architecture": base.detector.architecture,
            "sha256": file_sha256(out / "detector.pt"),
            "classes": adapt_data.class_names(split),
            "training": detector,
        },
        "segmenter": {
            "file": "segmenter.pt",
            "name": f"{base.segmenter.name}-adapted",
            "architecture": base.segmenter.architecture,
            "overrides": list(base.segmenter.overrides),
            "sha256": file_sha256(out / "segmenter.pt"),
            "method": job.segmenter.method,
            "encoder_changed": job.segmenter.method in ("encoder-lora", "full"),
            "training": segmenter,
        },
        "data": {
            **data,
            "train_images": len(split.train.images),
            "holdout_images": len(split.holdout.images),
            "holdout": HOLDOUT_NAME,
        },
        "recipe": {"detector": dataclasses.asdict(job.detector), "segmenter": dataclasses.asdict(job.segmenter)},
    }


def _sign(out: Path, job: AdaptJob, base: ModelSet, card: dict[str, Any], key: Ed25519PrivateKey | None) -> Path:
    """The folder's manifest: every file, the base and adapted models, the data as inputs; signed with ``key``."""
    files = [p for p in files_under(out) if p.name != MANIFEST_NAME]
    models = [
        *(
            {"role": b["role"], "name": b["name"], "version": b["version"], "weights_sha256": b["sha256"]}
            for b in card["base"]
        ),
        *(
            {
                "role": role,
                "name": card[role]["name"],
                "version": card["version"],
                "weights_sha256": card[role]["sha256"],
            }
            for role in ("detector", "segmenter")
        ),
    ]
    content = manifest(
        kind=KIND_EXPORT,
        models=models,
        inputs=[
            {"name": card["data"]["annotations"], "sha256": card["data"]["annotations_sha256"]},
            {"name": "images", "sha256": card["data"]["images_sha256"]},
        ],
        prompts={"classes": card["data"]["categories"]},
        parameters={
            "adapted": card["version"],
            "recipe": card["recipe"],
            "base_profile": base.profile,
            PLACED_INPUTS: [],  # no input is placed in the folder: verify fails on any file it does not cover
        },
        artifacts=[],
        detseg_version=__version__,
    )
    return write_signed_export(out, files, content, key=key)
