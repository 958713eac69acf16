"""A Segment request in plain Python, and its validation (limits, ranges, vocabulary, image frame).

Everything here runs before any model does; each failure is an InvalidInput naming the field and the limit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Sequence

import numpy as np

from service.errors import InvalidInput
from service.pipeline.refine import Refinement
from service.pipeline.review import ReviewOptions, ReviewRules, resolve_review
from service.pipeline.vocabulary import TextMatch
from service.printable import check_printable, normalise_class_name
from service.processing.masks import ENCODINGS, RLE
from service.processing.segmentation import SamPrompt

MASK_PREFIX = "mask:"  # kept masks' handles: this, then 32 lower-case hex digits (``mask_handle``)
MASK_HANDLE = re.compile(r"mask:[0-9a-f]{32}")


@dataclasses.dataclass(frozen=True)
class Region:
    """A caller-placed object. box: (x_min, y_min, x_max, y_max) or None; points: [(x, y, label)]."""

    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float, int], ...] = ()
    label: str = ""
    previous_mask: str = ""  # a kept mask's handle (MASK_PREFIX + hex): SAM's mask input


@dataclasses.dataclass(frozen=True)
class Options:
    """Request options; None = the server default."""

    score_threshold: float | None = None
    iou_threshold: float | None = None
    max_instances: int | None = None
    mask_encoding: str = RLE
    multimask: bool = False
    refinement: RefinementOptions = dataclasses.field(default_factory=lambda: RefinementOptions())
    review: ReviewOptions = dataclasses.field(default_factory=ReviewOptions)
    keep_masks: bool = False  # keep each instance's low-res mask with the cached image; return its handle


@dataclasses.dataclass(frozen=True)
class RefinementOptions:
    """Mask refinement asked for; None = the server default. ``disabled``: SAM's masks untouched."""

    disabled: bool = False
    min_region_area: int | None = None
    clip_to_box: bool | None = None
    box_margin: float | None = None


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """Encoded bytes, raw RGB (width, height given), or the handle of a cached image."""

    encoded: bytes | None = None
    raw: bytes | None = None
    width: int = 0
    height: int = 0
    handle: str | None = None

    @property
    def data(self) -> bytes:
        """The bytes received (what ImageInfo.sha256 hashes; the cache handle hashes raw pixels with their size)."""
        return self.raw if self.raw is not None else self.encoded or b""

    @property
    def raw_size(self) -> tuple[int, int] | None:
        """(width, height) of raw pixels; None for encoded bytes or a handle."""
        return (self.width, self.height) if self.raw is not None else None


@dataclasses.dataclass(frozen=True)
class Exemplar:
    """An example object: box (x_min, y_min, x_max, y_max) in original pixels of its image; image None = the
    request's image."""

    box: tuple[float, float, float, float]
    label: str = ""  # as sent; its class: ``exemplar_classes``
    image: ImageInput | None = None


@dataclasses.dataclass(frozen=True)
class SegmentQuery:
    image: ImageInput
    classes: tuple[str, ...] = ()
    regions: tuple[Region, ...] = ()
    options: Options = dataclasses.field(default_factory=Options)
    request_id: str = ""
    texts: tuple[str, ...] = ()
    exemplars: tuple[Exemplar, ...] = ()


@dataclasses.dataclass(frozen=True)
class Limits:
    max_class_prompts: int
    max_region_prompts: int
    max_points_per_region: int
    max_instances: int
    default_score_threshold: float
    default_iou_threshold: float
    default_max_instances: int
    max_image_pixels: int
    mask_min_region_area: int
    mask_clip_to_box: bool
    mask_box_margin: float
    max_text_prompts: int
    max_text_chars: int
    max_exemplars: int
    review: ReviewRules  # the server's review rules (Settings review_*)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to run for one validated request.

    names: what the detections' class ids index (the detector's vocabulary, or an open-vocabulary request's
    own); class_ids: the classes the detector's output is filtered to (None = every class); class_prompt: the
    class ids the request's ``classes`` ask for (None = every class: no classes and no texts were given);
    texts: each text's match, whose instances are returned once per text.
    """

    names: tuple[str, ...]
    exemplar_start: int  # names[exemplar_start:] are the exemplars' classes (open vocabulary)
    run_detector: bool
    class_ids: list[int] | None
    class_prompt: frozenset[int] | None
    texts: list[TextMatch]
    score_threshold: float
    iou_threshold: float
    max_instances: int
    mask_encoding: str
    multimask: bool
    refinement: Refinement
    regions: list[SamPrompt]
    region_labels: list[str]
    review: ReviewRules
    drop_flagged: bool


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def valid_request_id(request_id: str) -> bool:
    """True for 1 to 128 characters of [A-Za-z0-9._:-]: safe to log and to echo."""
    return _REQUEST_ID.fullmatch(request_id) is not None


def check_query(query: SegmentQuery, limits: Limits) -> None:
    """Checks that need no pixels: counts, option ranges, point labels, finite numbers, request id, and every text
    that may come back as a label (classes, texts, region and exemplar labels: length, printable characters)."""
    if query.request_id and not valid_request_id(query.request_id):
        raise InvalidInput("request_id: at most 128 characters of [A-Za-z0-9._:-]")
    _check_count(query.classes, limits.max_class_prompts, "classes")
    _check_names(query.classes, limits.max_text_chars, "classes", "give a class name (ListModels lists the vocabulary)")
    _check_count(query.regions, limits.max_region_prompts, "regions")
    _check_count(query.texts, limits.max_text_prompts, "texts")
    _check_count(query.exemplars, limits.max_exemplars, "exemplars")
    for i, e in enumerate(query.exemplars):
        _check_box(e.box, f"exemplars[{i}].box")
        if e.label and not e.label.strip():
            raise InvalidInput(f"exemplars[{i}].label: blank; leave it empty to label the objects 'exemplar'")
        _check_label(e.label, limits.max_text_chars, f"exemplars[{i}].label")
    _check_names(query.texts, limits.max_text_chars, "texts", "give a word or phrase, e.g. 'red car'")
    o = query.options
    for name, value in (("score_threshold", o.score_threshold), ("iou_threshold", o.iou_threshold)):
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise InvalidInput(f"options.{name}: {value} is outside [0, 1]")
    if o.max_instances is not None and not (1 <= o.max_instances <= limits.max_instances):
        raise InvalidInput(f"options.max_instances: {o.max_instances} is outside [1, {limits.max_instances}]")
    if o.mask_encoding not in ENCODINGS:
        raise InvalidInput(f"options.mask_encoding: unknown value {o.mask_encoding!r}")
    area, margin = o.refinement.min_region_area, o.refinement.box_margin
    if area is not None and not 0 <= area <= limits.max_image_pixels:
        raise InvalidInput(
            f"options.refinement.min_region_area: {area} is outside [0, {limits.max_image_pixels}] pixels"
        )
    if margin is not None and not (math.isfinite(margin) and 0.0 <= margin <= 10.0):
        raise InvalidInput(f"options.refinement.box_margin: {margin} is outside [0, 10] (fraction of the box)")
    resolve_review(o.review, limits.review)  # raises naming a field out of range
    for i, r in enumerate(query.regions):
        field = f"regions[{i}]"
        if r.box is None and not r.points:
            raise InvalidInput(f"{field}: give a box, points, or both")
        if r.previous_mask and not MASK_HANDLE.fullmatch(r.previous_mask):
            raise InvalidInput(
                f"{field}.previous_mask: not a mask handle (Instance.mask_handle: {MASK_PREFIX} and 32 hex digits)"
            )
        _check_label(r.label, limits.max_text_chars, f"{field}.label")
        if len(r.points) > limits.max_points_per_region:
            raise InvalidInput(f"{field}.points: {len(r.points)} given, the limit is {limits.max_points_per_region}")
        if r.box is not None:
            _check_box(r.box, f"{field}.box")
        for j, (x, y, label) in enumerate(r.points):
            if label not in (0, 1):
                raise InvalidInput(f"{field}.points[{j}].label: {label} must be 1 (positive) or 0 (negative)")
            if not (math.isfinite(x) and math.isfinite(y)):
                raise InvalidInput(f"{field}.points[{j}]: coordinates must be finite numbers")


def kept_mask_handle(image_handle: str, prompt: SamPrompt, multimask: bool) -> str:
    """The handle of a prompt's kept low-res mask: a digest of the image, the prompt (box, clicks, the previous
    mask it started from) and the mask choice, so the same request keeps the same handle on any worker."""
    h = hashlib.sha256(image_handle.encode())
    h.update(b"box" + (prompt.box.astype(np.float32).tobytes() if prompt.box is not None else b""))
    h.update(b"points" + prompt.points.astype(np.float32).tobytes() + prompt.point_labels.astype(np.int32).tobytes())
    if prompt.previous is not None:
        h.update(b"previous" + np.ascontiguousarray(prompt.previous, np.float32).tobytes())
    h.update(b"multimask" if multimask else b"single")
    return MASK_PREFIX + h.hexdigest()[:32]


def _check_count(items: Sequence[object], limit: int, field: str) -> None:
    if len(items) > limit:
        raise InvalidInput(f"{field}: {len(items)} given, the limit is {limit}")


def _check_names(names: Sequence[str], max_chars: int, field: str, hint: str) -> None:
    """Class names and texts: not blank, at most ``max_chars`` characters, printable (``service.printable``)."""
    for i, name in enumerate(names):
        if not name.strip():
            raise InvalidInput(f"{field}[{i}]: empty; {hint}")
        _check_label(name, max_chars, f"{field}[{i}]")


def _check_label(label: str, max_chars: int, field: str) -> None:
    """Any text that may come back as an instance's label: at most ``max_chars`` characters, printable."""
    if len(label) > max_chars:
        raise InvalidInput(f"{field}: {len(label)} characters, the limit is {max_chars}")
    check_printable(label, field)


def _check_box(box: tuple[float, float, float, float], field: str) -> None:
    x0, y0, x1, y1 = box
    if not all(math.isfinite(v) for v in box):
        raise InvalidInput(f"{field}: coordinates must be finite numbers, got {list(box)}")
    if x1 <= x0 or y1 <= y0:
        raise InvalidInput(
            f"{field}: corners reversed or empty (x_min={x0}, y_min={y0}, x_max={x1}, y_max={y1}); "
            "need x_max > x_min and y_max > y_min"
        )


def check_box_inside(box: tuple[float, float, float, float], width: int, height: int, field: str) -> None:
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise InvalidInput(
            f"{field}: [{x0}, {y0}, {x1}, {y1}] is not within the {width}x{height} image: a box lies in "
            f"x [0, {width}], y [0, {height}] (original-image pixels, XYXY)"
        )


def exemplar_classes(exemplars: Sequence[Exemplar]) -> tuple[str, ...]:
    """Each exemplar's class, the label its objects come back with: its label with the spaces around it trimmed,
    "exemplar" when empty; labels equal after ``normalise_class_name`` (case, runs of spaces, "_" and "-") are one
    class, named by its first spelling, as ``vocabulary.request_vocabulary`` names classes and texts ("red_star" and
    "Red Star" were two classes of one object each)."""
    first: dict[str, str] = {}
    out = []
    for e in exemplars:
        name = e.label.strip() or "exemplar"
        out.append(first.setdefault(normalise_class_name(name), name))
    return tuple(out)


def check_inside(query: SegmentQuery, width: int, height: int) -> None:
    """The request's regions (boxes and clicks) and its exemplar boxes on the request's own image lie within the
    ``width`` x ``height`` image: checked once the image is decoded, before any model (a text encoder included)
    runs."""
    for i, r in enumerate(query.regions):
        if r.box is not None:
            check_box_inside(r.box, width, height, f"regions[{i}].box")
        for j, (x, y, _) in enumerate(r.points):
            if not (0 <= x <= width and 0 <= y <= height):
                raise InvalidInput(f"regions[{i}].points[{j}]: ({x}, {y}) lies outside the {width}x{height} image")
    for i, e in enumerate(query.exemplars):
        if e.image is None:
            check_box_inside(e.box, width, height, f"exemplars[{i}].box")


def plan(
    query: SegmentQuery,
    limits: Limits,
    vocabulary: Sequence[str],
    texts: Sequence[TextMatch] = (),
    open_vocabulary: bool = False,
) -> Plan:
    """Validates against the vocabulary (the image frame is ``check_inside``'s, checked before); resolves defaults.
    ``texts``: the matches of ``query.texts``. ``open_vocabulary``: ``vocabulary`` is the request's own
    (``vocabulary.open_vocabulary``) and any class name is valid."""
    class_ids: list[int] | None
    if open_vocabulary:
        class_prompt: frozenset[int] | None = _open_class_prompt(query, vocabulary)
        class_ids = None
    else:
        class_prompt = frozenset(resolve_classes(query.classes, vocabulary)) if query.classes else None
        if class_prompt is None and texts:
            class_prompt = frozenset()  # texts alone: only what they match
        class_ids = None if class_prompt is None else sorted(class_prompt | {m.class_id for m in texts})
    prompts: list[SamPrompt] = []
    for r in query.regions:
        box = np.asarray(r.box, dtype=np.float32) if r.box is not None else None
        points = np.asarray([(x, y) for x, y, _ in r.points], dtype=np.float32).reshape(-1, 2)
        labels = np.asarray([lab for _, _, lab in r.points], dtype=np.int32)
        prompts.append(SamPrompt(box=box, points=points, point_labels=labels))
    o = query.options
    thresholds = resolve_thresholds(o, limits)
    exemplars = tuple(dict.fromkeys(exemplar_classes(query.exemplars)))
    return Plan(
        names=(*vocabulary, *exemplars),
        exemplar_start=len(vocabulary),
        run_detector=bool(query.classes) or bool(texts) or bool(exemplars) or not query.regions,
        class_ids=class_ids,
        class_prompt=class_prompt,
        texts=list(texts),
        score_threshold=thresholds.score_threshold,
        iou_threshold=thresholds.iou_threshold,
        max_instances=thresholds.max_instances,
        mask_encoding=o.mask_encoding,
        multimask=o.multimask,
        refinement=resolve_refinement(o.refinement, limits),
        regions=prompts,
        region_labels=[r.label or "object" for r in query.regions],
        review=resolve_review(o.review, limits.review),
        drop_flagged=o.review.drop_flagged,
    )


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """A request's detection thresholds, the server defaults filled in."""

    score_threshold: float
    iou_threshold: float
    max_instances: int


def resolve_thresholds(o: Options, limits: Limits) -> Thresholds:
    return Thresholds(
        score_threshold=o.score_threshold if o.score_threshold is not None else limits.default_score_threshold,
        iou_threshold=o.iou_threshold if o.iou_threshold is not None else limits.default_iou_threshold,
        max_instances=o.max_instances if o.max_instances is not None else limits.default_max_instances,
    )


def _open_class_prompt(query: SegmentQuery, vocabulary: Sequence[str]) -> frozenset[int]:
    """The ids of an open-vocabulary request's ``classes`` in its vocabulary (``check_query`` checked them)."""
    if not query.classes and not query.texts and not query.exemplars and not query.regions:
        raise InvalidInput(
            "classes, texts: the detector is open-vocabulary and has no fixed classes; name what to find "
            "(any words) in classes or texts, or show it with exemplars"
        )
    index = {normalise_class_name(v): i for i, v in enumerate(vocabulary)}
    return frozenset(index[normalise_class_name(name)] for name in query.classes)


def resolve_refinement(asked: RefinementOptions, limits: Limits) -> Refinement:
    """The request's refinement, unset fields taking the server defaults in ``limits``."""
    if asked.disabled:
        return Refinement.NONE
    area = limits.mask_min_region_area if asked.min_region_area is None else asked.min_region_area
    clip = limits.mask_clip_to_box if asked.clip_to_box is None else asked.clip_to_box
    margin = limits.mask_box_margin if asked.box_margin is None else asked.box_margin
    return Refinement(min_region_area=area, box_margin=margin if clip else None)


def resolve_classes(names: Sequence[str], vocabulary: Sequence[str]) -> list[int]:
    """Class names → vocabulary indices, case/space/underscore-insensitive; duplicates collapse."""
    index = {normalise_class_name(v): i for i, v in enumerate(vocabulary)}
    ids: list[int] = []
    for i, name in enumerate(names):
        key = normalise_class_name(name)
        if key not in index:
            shown = ", ".join(vocabulary[:40]) + (f" … ({len(vocabulary)} in all)" if len(vocabulary) > 40 else "")
            raise InvalidInput(f"classes[{i}]: unknown class {name[:64]!r}; the detector knows: {shown}")
        if index[key] not in ids:
            ids.append(index[key])
    return ids
