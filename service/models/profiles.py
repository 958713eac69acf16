"""Which weights a server loads: a profile (official | test) or explicit catalog names / paths."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import NamedTuple

from service.config import Settings
from service.errors import DetsegError, ModelUnavailable, WeightsNotFound
from service.models import testing
from service.models.adapted import read_adapted
from service.models.catalog import CATALOG, PROFILES, CatalogEntry
from service.models.download import ensure_weights
from service.models.roles import ModelRole
from service.provenance import MANIFEST_NAME, VerificationFailed, file_sha256, verify_path

log = logging.getLogger(__name__)

# What profile "auto" serves when the official weights are neither cached nor downloadable: the open-vocabulary
# shapes demo, which answers class names, free text and exemplars offline (service/models/demo/SHAPES_YOLOE.md).
FALLBACK_PROFILE = "demo-open"

# Every profile (Settings.models) with what it serves, one line each: `detseg models` lists them, and
# resolve_models knows exactly these.
PROFILE_SUMMARIES: dict[str, str] = {
    "auto": f"official when its weights are cached or can be downloaded, else {FALLBACK_PROFILE}",
    **{name: f"{det} + {seg}: official weights, downloaded once" for name, (det, seg) in PROFILES.items()},
    "demo": "shapes-yolo11n (5 shape classes) + shapes-sam2-mini, shipped in service/models/demo; offline",
    "demo-open": "shapes-yoloe (open vocabulary: class names, free text, exemplars) + shapes-sam2-mini; offline",
    "test": "test-yolo11n + test-sam2.1_hiera_t: seeded random weights built locally, for tests",
    "test-open": "test-yoloe-11n (open vocabulary) + test-sam2.1_hiera_t: seeded random weights, for tests",
}
# A profile whose models were replaced by a `detseg adapt` folder (Settings.adapted) is reported as this.
ADAPTED_PROFILE = "adapted"


@dataclasses.dataclass(frozen=True)
class WeightsRef:
    """A verified weights file and what architecture it belongs to."""

    role: ModelRole
    name: str
    version: str
    architecture: str  # ultralytics yaml, or sam2 config name
    path: Path
    sha256: str
    overrides: tuple[str, ...] = ()  # sam2 hydra overrides (e.g. a reduced image_size)


@dataclasses.dataclass(frozen=True)
class ModelSet:
    """``tracker``: the SAM 2 module video tracking runs on when it is not the segmenter itself (the demo's; its image
    encoder is the segmenter's), else None."""

    profile: str
    detector: WeightsRef
    segmenter: WeightsRef
    tracker: WeightsRef | None = None


def resolve_models(settings: Settings, *, progress: bool = True) -> ModelSet:
    """Finds (downloading if allowed) and verifies every weights file the settings name.

    Profile ``auto`` is ``official`` when those weights are cached or can be downloaded, else
    ``FALLBACK_PROFILE`` with one WARNING saying so and how to get the official ones.

    Raises:
        WeightsNotFound: one message naming every missing file and where to put it.
        ModelUnavailable: an unknown profile or model name.
    """
    if settings.models == "auto":
        try:
            return resolve_models(settings.replace(models="official"), progress=progress)
        except WeightsNotFound as e:
            files = ", ".join(e.files) or "official weights"
            why = "; ".join(dict.fromkeys(e.reasons)) or "not found"
            log.warning(
                "%s not in %s and could not be fetched (%s): serving the DEMO profile %s (shapes models); for "
                "official weights run `detseg serve --models official` online once, or put the files `detseg "
                "models` lists in that folder",
                files,
                settings.cache_dir,
                why,
                FALLBACK_PROFILE,
            )
            return resolve_models(settings.replace(models=FALLBACK_PROFILE), progress=progress)
    detector: WeightsRef | None
    segmenter: WeightsRef | None
    tracker: WeightsRef | None = None
    if settings.models in ("demo", "demo-open"):
        detector, segmenter, tracker = _demo_refs(open_vocabulary=settings.models == "demo-open")
        profile = settings.models
    elif settings.models in ("test", "test-open"):
        det_path, seg_path = testing.make_test_models(settings.cache_dir / "test-models")
        detector = WeightsRef(
            ModelRole.DETECTOR, "test-yolo11n", "seed-0", testing.TEST_DETECTOR_ARCH, det_path, file_sha256(det_path)
        )
        if settings.models == "test-open":  # the open-vocabulary (YOLOE) test detector instead
            det_path = testing.make_test_open_detector(settings.cache_dir / "test-models")
            detector = WeightsRef(
                ModelRole.DETECTOR,
                "test-yoloe-11n",
                "seed-0",
                testing.TEST_OPEN_DETECTOR_ARCH,
                det_path,
                file_sha256(det_path),
            )
        segmenter = WeightsRef(
            ModelRole.SEGMENTER,
            "test-sam2.1_hiera_t",
            "seed-0",
            testing.TEST_SEGMENTER_CONFIG,
            seg_path,
            file_sha256(seg_path),
            testing.TEST_SEGMENTER_OVERRIDES,
        )
        profile = settings.models
    elif settings.models in PROFILES:
        det_name, seg_name = PROFILES[settings.models]
        detector, segmenter, profile = None, None, settings.models
        missing: list[str] = []
        missing_files: list[str] = []
        reasons: list[str] = []
        for role, name in ((ModelRole.DETECTOR, det_name), (ModelRole.SEGMENTER, seg_name)):
            try:
                ref = _from_catalog(_entry(name, role), settings, progress)
            except WeightsNotFound as e:
                missing.append(str(e))
                missing_files.extend(e.files)
                reasons.extend(e.reasons)
                continue
            if role == ModelRole.DETECTOR:
                detector = ref
            else:
                segmenter = ref
        if missing:
            raise WeightsNotFound(
                "official weights unavailable:\n  - " + "\n  - ".join(missing), files=missing_files, reasons=reasons
            )
    else:
        known = ", ".join(PROFILE_SUMMARIES)
        raise ModelUnavailable(f"unknown model profile {settings.models!r}; known: {known}")
    if settings.adapted:
        detector, segmenter, tracker = _adapted_refs(Path(settings.adapted), segmenter, tracker)
        profile = ADAPTED_PROFILE
    if settings.detector:
        detector = _explicit(settings.detector, ModelRole.DETECTOR, settings, progress)
        profile = "custom"
    if settings.segmenter:
        segmenter = _explicit(settings.segmenter, ModelRole.SEGMENTER, settings, progress)
        profile, tracker = "custom", None  # a segmenter of the caller's tracks with its own memory path
    assert detector is not None and segmenter is not None  # every branch above sets both or raises
    return ModelSet(profile=profile, detector=detector, segmenter=segmenter, tracker=tracker)


def text_encoder_weights(text_model: str, settings: Settings, *, progress: bool = True) -> Path:
    """The verified weights file of the text encoder an open-vocabulary checkpoint names (e.g. "mobileclip:blt"),
    from the catalog (downloaded if allowed)."""
    for entry in CATALOG.values():
        if entry.role == ModelRole.TEXT_ENCODER and entry.architecture == text_model:
            return _from_catalog(entry, settings, progress).path
    raise ModelUnavailable(f"no catalog entry for the text encoder {text_model!r}")


def resolve_concept_weights(settings: Settings, *, progress: bool = True) -> WeightsRef:
    """The SAM 3 weights ``settings.concept_model`` names: the catalog's "sam3" or a checkpoint path, verified."""
    return _explicit(settings.concept_model, ModelRole.CONCEPT_SEGMENTER, settings, progress)


class DemoRefs(NamedTuple):
    detector: WeightsRef
    segmenter: WeightsRef
    tracker: WeightsRef | None  # None until its weights are shipped


def _demo_refs(open_vocabulary: bool = False) -> DemoRefs:
    """The shapes-trained models shipped in ``service/models/demo`` (see their model cards); with
    ``open_vocabulary`` the text-prompted YOLOE detector instead of the 5-class YOLO11n."""
    from service.models.demo import profile as demo

    name, arch, path = (
        ("shapes-yoloe", demo.SHAPES_YOLOE_ARCH, demo.SHAPES_YOLOE)
        if open_vocabulary
        else ("shapes-yolo11n", demo.SHAPES_YOLO_ARCH, demo.SHAPES_YOLO)
    )
    for weights in (path, demo.SHAPES_SAM2):
        if not weights.is_file():
            raise ModelUnavailable(f"demo weights {weights.name} are missing from this installation")
    detector = WeightsRef(ModelRole.DETECTOR, name, demo.VERSION, arch, path, file_sha256(path))
    segmenter = WeightsRef(
        ModelRole.SEGMENTER,
        "shapes-sam2-mini",
        demo.VERSION,
        demo.SHAPES_SAM2_CONFIG,
        demo.SHAPES_SAM2,
        file_sha256(demo.SHAPES_SAM2),
        demo.SHAPES_SAM2_OVERRIDES,
    )
    video = demo.SHAPES_SAM2_VIDEO
    tracker = (
        WeightsRef(
            ModelRole.TRACKER,
            "shapes-sam2-mini-video",
            demo.VERSION,
            demo.SHAPES_SAM2_CONFIG,
            video,
            file_sha256(video),
            demo.SHAPES_SAM2_VIDEO_OVERRIDES,
        )
        if video.is_file()
        else None
    )
    return DemoRefs(detector, segmenter, tracker)


def _adapted_refs(
    folder: Path, base_segmenter: WeightsRef | None, base_tracker: WeightsRef | None
) -> tuple[WeightsRef, WeightsRef, WeightsRef | None]:
    """The detector and segmenter of a ``detseg adapt`` folder, their files checked against the card's sha256 (and
    every file against the folder's manifest, when it has one: a file changed since it was signed is refused); the
    profile's tracker stays when it was built on the segmenter the set was adapted from and the image encoder was
    not adapted (the demo tracker shares its image encoder with the segmenter), else None."""
    if (folder / MANIFEST_NAME).exists():  # signed by `detseg adapt`: served only as signed
        try:
            verify_path(folder, require_signature=False)
        except VerificationFailed as e:
            raise ModelUnavailable(f"{folder}: changed since `detseg adapt` signed it ({e})") from None
    adapted = read_adapted(folder)
    refs = []
    for role, model in ((ModelRole.DETECTOR, adapted.detector), (ModelRole.SEGMENTER, adapted.segmenter)):
        digest = file_sha256(model.path)
        if digest != model.sha256:
            raise ModelUnavailable(
                f"{folder}: {model.path.name} has sha256 {digest[:12]}…, its card records {model.sha256[:12]}… "
                "(changed since `detseg adapt` wrote it)"
            )
        refs.append(
            WeightsRef(role, model.name, adapted.version, model.architecture, model.path, digest, model.overrides)
        )
    same_base = base_segmenter is not None and base_segmenter.sha256 == adapted.base_segmenter_sha256
    tracker = base_tracker if same_base and not adapted.encoder_changed else None
    return refs[0], refs[1], tracker


def _entry(name: str, role: ModelRole) -> CatalogEntry:
    entry = CATALOG.get(name)
    if entry is None or entry.role != role:
        known = ", ".join(n for n, e in CATALOG.items() if e.role == role)
        raise ModelUnavailable(f"unknown {role} {name!r}; catalog {role}s: {known}")
    return entry


def _from_catalog(entry: CatalogEntry, settings: Settings, progress: bool) -> WeightsRef:
    path = ensure_weights(entry, settings.cache_dir, offline=settings.offline, progress=progress)
    return WeightsRef(entry.role, entry.name, entry.version, entry.architecture, path, entry.sha256)


def _explicit(value: str, role: ModelRole, settings: Settings, progress: bool) -> WeightsRef:
    """A catalog name, or a checkpoint path (segmenters: the file name must match a catalog entry's)."""
    if value in CATALOG:
        return _from_catalog(_entry(value, role), settings, progress)
    path = Path(value).expanduser()
    if not path.is_file():
        raise WeightsNotFound(f"{role} weights {value!r}: no such file and not a catalog name")
    architecture = ""
    if role == ModelRole.SEGMENTER:
        match = [e for e in CATALOG.values() if e.role == ModelRole.SEGMENTER and e.filename == path.name]
        if not match:
            raise DetsegError(
                f"segmenter {path.name}: cannot tell its architecture; name the file like an official "
                f"checkpoint ({', '.join(e.filename for e in CATALOG.values() if e.role == ModelRole.SEGMENTER)})"
            )
        architecture = match[0].architecture
    return WeightsRef(role, path.name, "file", architecture, path, file_sha256(path))
