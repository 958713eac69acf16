"""``detseg label DIR``: bulk pre-labeling of a folder through the service, resumable, then exports.

- Images: every JPEG/PNG/WebP under the folder (recursive, sorted by relative path).
- Requests go over StreamSegment (``Client.segment_many``): the server keeps at most its
  ``max_stream_in_flight`` in flight, so concurrency is bounded without threads here.
- Resumable: each answer is appended to ``records.jsonl`` (one JSON object per line, flushed and fsynced)
  as soon as it arrives; a re-run skips images whose relative path and sha256 are there (a record of an image
  changed since is dropped, whether or not the image is labeled again). A killed run loses nothing written (a torn
  last line is ignored). Failed images go to ``errors.jsonl`` with the server's message and are retried by the
  next run; they never stop this one. ``run.json`` holds what made the records (``run_identity``: the server's
  models and backend, the prompts, the score threshold): a re-run into the same folder with anything else is
  refused, since the manifest names one set of models and prompts for every record.
- Prompts are checked before anything is sent (``check_prompts``: not blank, printable text), and then asked of the
  server on the first image to label (at score threshold 1): a label it refuses (an unknown class, a text that
  matches no class) would be refused for every image, so the run stops at once. File names are checked then too
  (``check_file_names``), so no export fails after every image was labeled.
- At the end, the exports (``service.labeling.exports``) are written from all records under ``exports/``,
  with a provenance manifest (models, weights sha256, inputs sha256, prompts, parameters, time, and the sha256 of
  every file the export wrote but the placed source images) beside them, signed when a key is given
  (``service.provenance``). The folder is built aside and renamed into place when complete: a failed export leaves
  the previous one (or none), never half of one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service import __version__, provenance
from service.client import Client, RequestFailed, segment_request
from service.errors import InvalidInput
from service.labeling.records import LabeledImage, LabeledInstance
from service.printable import check_printable, normalise_class_name, unprintable
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.provenance import file_sha256
from service.provenance.response import manifest_models
from service.results import Instance, Result

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
RECORDS = "records.jsonl"
ERRORS = "errors.jsonl"
RUN = "run.json"
EXPORTS = "exports"
FORMATS = ("coco", "yolo", "cvat", "label-studio")


@dataclasses.dataclass(frozen=True)
class Prompts:
    """What every image is asked: class names and/or free texts (the service's own rules apply)."""

    classes: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    score_threshold: float | None = None


def check_prompts(prompts: Prompts) -> None:
    """InvalidInput naming the first class or text (``classes[i]``, ``texts[i]``, as in the request) that is blank or
    not printable text (``service.printable``): the server would refuse it for every image, and the exports name
    their categories after it."""
    for field, names in (("classes", prompts.classes), ("texts", prompts.texts)):
        for i, name in enumerate(names):
            if not name.strip():
                raise InvalidInput(f"{field}[{i}]: empty; give a class name or a word or phrase")
            check_printable(name, f"{field}[{i}]")


def check_formats(formats: Sequence[str]) -> None:
    """ValueError naming an unknown export format."""
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format {unknown[0]!r}; known: {', '.join(FORMATS)}")


@dataclasses.dataclass(frozen=True)
class LabelSummary:
    images: int
    labeled_now: int
    skipped: int  # finished by an earlier run
    failed: int
    instances: int
    flagged: int
    exports: dict[str, Path]


def image_files(folder: Path, out: Path | None = None) -> list[Path]:
    """Every image under ``folder`` but those in ``out``'s exports (where they place the images: with ``out`` inside
    ``folder``, each re-run labeled them as new images), sorted by relative path. ValueError when
    ``folder`` is no folder or holds no image (a mistyped or wrong folder: said, rather than empty exports
    written)."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and (out is None or not _exported(p, out))
    )
    if not files:
        raise ValueError(f"{folder}: no images under it ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _exported(path: Path, out: Path) -> bool:
    """Whether ``path`` lies in ``out``'s exports (or an export being written beside them): where the images are
    placed (``out`` itself may hold the labeled folder: only its exports are left out)."""
    first = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(out))).parts[0]
    return first == EXPORTS or first.startswith(f".{EXPORTS}.")


def check_file_names(names: Sequence[str], formats: Sequence[str]) -> None:
    """ValueError for a file name the exports cannot carry (not printable text, ``service.printable``) or, with
    ``yolo``, two images that would share one YOLO label file (``a.jpg``, ``a.png``): said before any image is sent,
    not once every image is labeled."""
    from service.labeling import exports

    for name in names:
        problem = unprintable(name)
        if problem is not None:
            raise ValueError(f"file_name {name!r}: contains {problem}; file names must be printable text")
    if "yolo" in formats:
        exports.check_label_paths(names)


def run_identity(models: pb.ListModelsResponse, prompts: Prompts) -> dict[str, Any]:
    """What makes a run's records: the server's models (``manifest_models``) and backend, the prompts, and the score
    threshold in force (the server's default where the run gives none)."""
    threshold = prompts.score_threshold
    return {
        "models": manifest_models(models.models),
        "backend": models.backend,
        "classes": list(prompts.classes),
        "texts": list(prompts.texts),
        "score_threshold": float(models.defaults.score_threshold if threshold is None else threshold),
    }


def check_same_run(out: Path, identity: dict[str, Any]) -> None:
    """ValueError naming what differs when ``out`` holds records of a run with another ``run_identity``."""
    path = out / RUN
    if not path.exists():
        if (out / RECORDS).exists():  # written before run.json existed: what made them cannot be told
            raise ValueError(
                f"{out} holds records of a run that did not say what made them (no {RUN}: written by an earlier "
                "detseg): label into a new --out, or remove that folder to label again"
            )
        return
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        earlier = {}
    differs = [k for k in identity if earlier.get(k) != identity[k]] if isinstance(earlier, dict) else list(identity)
    if differs:
        raise ValueError(
            f"{out} holds the records of another run (its {', '.join(differs)} differed; {path} says what made "
            "them): label into a new --out, or remove that folder to label again"
        )


def check_served_prompts(client: Client, image: Path, prompts: Prompts) -> None:
    """Asks the prompts of the server on one image at score threshold 1 (nothing is segmented): RequestFailed when it
    refuses a prompt itself (INVALID_ARGUMENT naming ``classes[i]`` or ``texts[i]``: a class the detector does not
    know, a text that matches none of its classes), which every image would get. Any other refusal is that image's
    (it fails again in the run and is recorded)."""
    try:
        client.segment(
            image.read_bytes(),
            classes=prompts.classes,
            texts=prompts.texts,
            score_threshold=1.0,
            request_id="label-prompts",
        )
    except RequestFailed as e:
        if e.code == grpc.StatusCode.INVALID_ARGUMENT and re.fullmatch(r"(classes|texts)\[\d+\]", e.field or ""):
            raise


def read_records(out: Path) -> dict[str, LabeledImage]:
    """The finished images of earlier runs, by relative path (a torn last line is skipped)."""
    records: dict[str, LabeledImage] = {}
    path = out / RECORDS
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            image = LabeledImage.from_json(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a killed run
        records[image.file_name] = image
    return records


def labeled_image(file_name: str, sha256: str, result: Result) -> LabeledImage:
    """The record of one answer, read through ``service.results`` (the client's ``Result``): sources, review reasons
    and RLE spelled as every reader spells them. An object answered once per prompt that found it under the same
    label (a class and a text read as that class: the same label, box and mask) is one instance, the first answered:
    a dataset holds one annotation per object and label."""
    firsts: dict[tuple[Any, ...], Instance] = {}
    for i in result.instances:
        firsts.setdefault((i.label, i.box, i.rle["counts"]), i)
    instances = tuple(
        LabeledInstance(
            label=i.label,
            score=float(i.score),
            box=i.box,  # XYXY of Python floats (results.Instance)
            rle=i.rle,  # type: ignore[arg-type]
            mask_score=float(i.mask_score),
            source=i.source,
            needs_review=i.needs_review,
            review_reasons=i.review_reasons,
        )
        for i in firsts.values()
    )
    return LabeledImage(file_name, result.width, result.height, sha256, instances)


def _end_torn_line(path: Path) -> None:
    """Terminates a last line a killed run left unfinished, so the next record starts on a line of its own."""
    if path.exists() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def label_folder(
    client: Client,
    folder: Path,
    out: Path,
    prompts: Prompts,
    *,
    formats: Sequence[str] = FORMATS,
    image_url_prefix: str = "/data/local-files/?d=",
    signing_key: Path | None = None,
    progress: bool = True,
) -> LabelSummary:
    """Labels every image of ``folder`` not labeled yet into ``out``, then writes the exports. Bad prompts
    (InvalidInput, or RequestFailed where the server refuses them), formats, file names, a folder that is none or
    holds no image, an ``out`` of another run, or a ``signing_key`` that is no Ed25519 private key (ValueError) are
    refused before anything is written."""
    from tqdm import tqdm

    check_prompts(prompts)
    check_formats(formats)
    files = image_files(folder, out)
    check_file_names([path.relative_to(folder).as_posix() for path in files], formats)
    key = provenance.load_private_key(signing_key) if signing_key is not None else None
    identity = run_identity(client.list_models(), prompts)
    check_same_run(out, identity)
    done = read_records(out)
    todo: list[tuple[str, Path, str]] = []
    for path in files:
        name = path.relative_to(folder).as_posix()
        digest = file_sha256(path)
        if name in done and done[name].sha256 != digest:
            del done[name]  # its labels are another image's, whether or not this run labels it
        if name not in done:
            todo.append((name, path, digest))
    if todo:
        check_served_prompts(client, todo[0][1], prompts)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN).write_text(json.dumps(identity, indent=2) + "\n")
    for log in (out / RECORDS, out / ERRORS):
        _end_torn_line(log)

    def requests() -> Iterator[Any]:
        for _, path, digest in todo:
            yield segment_request(
                path.read_bytes(),
                classes=prompts.classes,
                texts=prompts.texts,
                score_threshold=prompts.score_threshold,
                request_id=f"label-{digest[:16]}",
            )

    failed = 0
    bar = tqdm(total=len(files), initial=len(files) - len(todo), unit="img", disable=not progress)
    for item in client.segment_many(requests()):
        name, _, digest = todo[item.index]
        if item.result is None:
            failed += 1
            _append(
                out / ERRORS,
                {
                    "file_name": name,
                    "sha256": digest,
                    "code": item.error.code.name if item.error else "UNKNOWN",
                    "message": item.error.message if item.error else "",
                },
            )
        else:
            record = labeled_image(name, digest, item.result)
            _append(out / RECORDS, record.to_json())
            done[name] = record
        bar.update(1)
    bar.close()
    present = {path.relative_to(folder).as_posix() for path in files}
    images = [done[n] for n in sorted(done) if n in present]
    exports = write_exports(client, images, folder, out / EXPORTS, prompts, formats, image_url_prefix, key)
    return LabelSummary(
        images=len(files),
        labeled_now=len(todo) - failed,
        skipped=len(files) - len(todo),
        failed=failed,
        instances=sum(len(i.instances) for i in images),
        flagged=sum(inst.needs_review for i in images for inst in i.instances),
        exports=exports,
    )


def categories_of(images: Sequence[LabeledImage], prompts: Prompts, vocabulary: Sequence[str] = ()) -> list[str]:
    """Every asked name as the server labels its answers (request order: category ids stay the same run after run,
    found or not), then any other label answered (sorted; e.g. a closed detector's class for a free text).

    Names the server takes as one class (``normalise_class_name``: "Car", "car", "car_") are one category: a class of
    the closed detector's ``vocabulary`` in the vocabulary's spelling, which its answers carry; any other name in its
    first spelling, stripped, as an open-vocabulary server keeps it."""
    canonical = {normalise_class_name(v): v for v in vocabulary}
    names: dict[str, str] = {}
    for name in (*prompts.classes, *prompts.texts):
        key = normalise_class_name(name)
        names.setdefault(key, canonical.get(key, name.strip()))
    seen = {normalise_class_name(inst.label): inst.label for image in images for inst in image.instances}
    return list(names.values()) + sorted(label for key, label in seen.items() if key not in names)


def write_exports(
    client: Client,
    images: Sequence[LabeledImage],
    folder: Path,
    out: Path,
    prompts: Prompts,
    formats: Sequence[str],
    image_url_prefix: str,
    key: Ed25519PrivateKey | None,
) -> dict[str, Path]:
    """The asked formats under ``out/<format>/`` and the provenance manifest over every file written; returns each
    format's main file and the manifest (paths under ``out``).

    Everything is written into a temporary sibling of ``out`` first and renamed into place only when complete (an
    earlier export there is replaced as a whole); on any failure the sibling is removed and ``out`` is left as it
    was. The manifest lists every file written as an artifact, but the placed source images (links to, or copies
    of, the inputs whose sha256 the manifest records): their folders are its ``provenance.PLACED_INPUTS``."""
    from service.labeling import exports

    check_formats(formats)
    models = client.list_models()
    detector = next((m for m in models.models if m.role == pb.MODEL_ROLE_DETECTOR), None)
    closed = () if detector is None or detector.open_vocabulary else tuple(detector.vocabulary)
    categories = categories_of(images, prompts, closed)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = _new_sibling(out, "partial")
    try:
        written: dict[str, Path] = {}
        placed: list[str] = []  # the folders holding the source images (links or copies), relative to ``out``
        for fmt in formats:
            target, final = stage / fmt, out / fmt
            if fmt == "coco":
                path = exports.write_coco(images, categories, target)
            elif fmt == "yolo":
                path = exports.write_yolo_seg(images, categories, target, folder, dataset_root=final)
                placed.append(f"{fmt}/{exports.IMAGES_DIR}")
            elif fmt == "cvat":
                path = exports.write_cvat(images, categories, target, folder)
                placed.append(f"{fmt}/{exports.IMAGES_DIR}")
            else:
                path = exports.write_label_studio(images, categories, target, image_url_prefix).tasks
            written[fmt] = out / path.relative_to(stage)
        manifest = write_manifest(models, images, stage, prompts, categories, key, placed)
        written["manifest"] = out / manifest.relative_to(stage)
        _swap_in(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone already when renamed into place
    return written


def _new_sibling(path: Path, kind: str) -> Path:
    """A new empty hidden folder beside ``path`` (the umask's permissions, as ``mkdir`` gives)."""
    sibling = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.{kind}")
    sibling.mkdir()
    return sibling


def _swap_in(stage: Path, out: Path) -> None:
    """Renames folder ``stage`` to ``out``, replacing a folder already there (removed once the new one is in place;
    links in it are removed, never followed)."""
    if not out.exists():
        os.rename(stage, out)
        return
    old = _new_sibling(out, "old")
    os.rename(out, old / out.name)
    try:
        os.rename(stage, out)
    except OSError:
        os.rename(old / out.name, out)  # the earlier export back where it was
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(
    models: pb.ListModelsResponse,
    images: Sequence[LabeledImage],
    out: Path,
    prompts: Prompts,
    categories: Sequence[str],
    key: Ed25519PrivateKey | None,
    placed: Sequence[str] = (),
) -> Path:
    """``out/detseg-manifest.json`` over every file under ``out`` (walked: whatever the export wrote, at any depth,
    links included) but the manifest itself and the input images placed in the folders ``placed`` (relative to
    ``out``, each holding every image under its file_name: the manifest's ``provenance.PLACED_INPUTS``, verified
    against the inputs' sha256). A link among the others that leads outside ``out`` is refused (ValueError), never
    skipped. ``models``: the server's ListModels answer."""
    skip = {f"{folder}/{i.file_name}" for folder in placed for i in images} | {provenance.MANIFEST_NAME}
    files = [p for p in provenance.files_under(out) if p.as_posix() not in skip]
    base = provenance.manifest(
        kind=provenance.KIND_EXPORT,
        models=manifest_models(models.models),
        inputs=[{"name": i.file_name, "sha256": i.sha256} for i in images],
        prompts={"classes": list(prompts.classes), "texts": list(prompts.texts)},
        parameters={
            "score_threshold": prompts.score_threshold,
            "categories": list(categories),
            "profile": models.profile,
            "backend": models.backend,
            provenance.PLACED_INPUTS: list(placed),
        },
        artifacts=[],
        detseg_version=__version__,
    )
    return provenance.write_signed_export(out, files, base, key=key)
