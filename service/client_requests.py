"""The request side of the client: typed prompts and images (``Point``, ``Region``, ``Exemplar``, ``TrackInput``,
``image_message``) and the messages built from them (``segment_request``, ``track_requests``: a Track call's start
and frames, sent through ``RequestStream``, which keeps an error raised while a message was being built). The floor
below ``service.client``: the standard library, numpy, the generated protobuf modules and ``service.results`` only;
the client re-exports every public name here.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from PIL import Image, ImageOps

from service.proto.detseg.v1 import detseg_pb2 as pb
from service.results import XYXY, ImageHandle

if TYPE_CHECKING:
    from PIL import Image as PILImage

    # encoded bytes (JPEG/PNG/WebP), a file path, (H, W, 3) uint8 RGB, a PIL image, or a handle
    ImageLike = bytes | str | os.PathLike[str] | np.ndarray | ImageHandle | PILImage.Image

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Point:
    """A click, original-image pixels; ``positive`` False = "not this" (background)."""

    x: float
    y: float
    positive: bool = True


@dataclasses.dataclass(frozen=True)
class Region:
    """A caller-placed prompt: a box (XYXY original pixels), clicks, or both; ``label`` names the instance;
    ``previous_mask``: an earlier answer's ``Instance.mask_handle`` on the same image (asked with ``keep_masks``),
    whose mask the box and clicks correct (SAM's interactive loop)."""

    box: XYXY | None = None
    points: tuple[Point, ...] = ()
    label: str = ""
    previous_mask: str = ""


@dataclasses.dataclass(frozen=True)
class Exemplar:
    """ "Find more of this": a box (XYXY original pixels) on the request's image, or on ``image`` (a catalog
    photo); ``label`` names what it finds."""

    box: XYXY
    label: str = ""
    image: ImageLike | None = None


# Pillow modes a PNG holds as they are (the others are converted to RGB before sending).
_PNG_MODES = frozenset({"1", "L", "LA", "I;16", "P", "RGB", "RGBA"})
# An array larger than this raw (16 MiB: a 5.6 MP image) is sent as PNG: the server's max_image_bytes (20 MiB by
# default) bounds raw pixels as it bounds encoded ones, and its max_message_bytes (32 MiB) refused a 12 MP array in
# gRPC itself (RESOURCE_EXHAUSTED, naming no field or limit).
RAW_MAX_BYTES = 16 * 1024 * 1024


def image_message(image: ImageLike) -> pb.Image:
    """Any ``ImageLike`` as the request's Image: file bytes as they are (the server decodes and hashes them),
    arrays as raw RGB pixels (as lossless PNG past ``RAW_MAX_BYTES``), PIL images as PNG in their own mode where
    PNG holds it, turned upright by their EXIF orientation first: the server then reads them as it reads a file
    (alpha over white, 16-bit scaled, the displayed orientation), so ``Image.open(path)`` and ``path`` get the same
    answer."""
    if isinstance(image, ImageHandle):
        return pb.Image(handle=image.handle)
    if isinstance(image, bytes):
        return pb.Image(encoded=image)
    if isinstance(image, str | os.PathLike):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image array must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        if image.nbytes > RAW_MAX_BYTES:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
            return pb.Image(encoded=buffer.getvalue())
        return pb.Image(raw=pb.RawImage(data=np.ascontiguousarray(image).tobytes(), width=w, height=h))
    if hasattr(image, "save"):  # PIL.Image.Image
        upright = ImageOps.exif_transpose(image) or image
        if upright.mode not in _PNG_MODES:  # CMYK, YCbCr, 32-bit: RGB as the server would make them
            upright = upright.convert("RGB")
        buffer = io.BytesIO()
        upright.save(buffer, format="PNG")
        return pb.Image(encoded=buffer.getvalue())
    raise TypeError(f"unsupported image type {type(image).__name__}")


def jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """An (H, W, 3) uint8 RGB array as JPEG file bytes (what the client-side tools send when not sending raw pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _names(value: str | Iterable[str], keyword: str) -> list[str]:
    """``classes`` or ``texts`` as the message's list: one string is one name or text (not its characters)."""
    names = [value] if isinstance(value, str) else list(value)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"{keyword}[{i}]: a string, got {type(name).__name__} {name!r}")
    return names


def _box(xyxy: Sequence[float]) -> pb.BoundingBox:
    try:
        if not _is_sequence(xyxy):
            raise TypeError
        x0, y0, x1, y1 = (float(v) for v in xyxy)
    except (TypeError, ValueError):
        raise ValueError(f"a box is 4 numbers (x_min, y_min, x_max, y_max), original pixels; got {xyxy!r}") from None
    return pb.BoundingBox(x_min=x0, y_min=y0, x_max=x1, y_max=y1)


def _is_sequence(value: object) -> bool:
    return isinstance(value, Sequence | np.ndarray) and not isinstance(value, str | bytes)


def _boxed(item: Any, keyword: str, kind: type[T]) -> T:
    """One item of ``regions`` or ``exemplars`` as a ``kind`` (Region or Exemplar): itself, or a bare XYXY box made
    one; a number means the caller gave one box where a list of them was expected."""
    if isinstance(item, kind):
        return item
    if _is_sequence(item):
        return kind(box=tuple(item))  # type: ignore[call-arg]
    raise TypeError(
        f"{keyword}: each item is a {kind.__name__} or an (x_min, y_min, x_max, y_max) box, got "
        f"{type(item).__name__} {item!r} (one box goes in a list: {keyword}=[(x_min, y_min, x_max, y_max)])"
    )


def _region(region: Region | XYXY) -> pb.RegionPrompt:
    """A Region, or a bare XYXY box, as the request's RegionPrompt."""
    r = _boxed(region, "regions", Region)
    if isinstance(r.points, Point) or not all(isinstance(p, Point) for p in r.points):
        raise TypeError(f"regions: points are a sequence of Point(x, y[, positive]), got {r.points!r}")
    prompt = pb.RegionPrompt(label=r.label, previous_mask=r.previous_mask)
    if r.box is not None:
        prompt.box.CopyFrom(_box(r.box))
    for p in r.points:
        prompt.points.add(x=p.x, y=p.y, label=1 if p.positive else 0)
    return prompt


def _exemplar(item: Exemplar | XYXY) -> pb.Exemplar:
    """An Exemplar, or a bare XYXY box on the request's image, as the request's Exemplar."""
    e = _boxed(item, "exemplars", Exemplar)
    exemplar = pb.Exemplar(box=_box(e.box), label=e.label)
    if e.image is not None:
        exemplar.image.CopyFrom(image_message(e.image))
    return exemplar


def segment_request(
    image: ImageLike,
    *,
    classes: str | Iterable[str] = (),
    texts: str | Iterable[str] = (),
    regions: Iterable[Region | XYXY] = (),
    exemplars: Iterable[Exemplar | XYXY] = (),
    score_threshold: float | None = None,
    iou_threshold: float | None = None,
    max_instances: int | None = None,
    multimask: bool = False,
    review: pb.ReviewRules | None = None,
    request_id: str = "",
    keep_masks: bool = False,
) -> pb.SegmentRequest:
    """The SegmentRequest for these prompts (masks as COCO RLE). ``classes``, ``texts``: lists of strings (one
    string: one name or text). A bare XYXY box in ``regions`` is a box prompt, in ``exemplars`` an exemplar on the
    request's image. Unset thresholds and review rules take the server's defaults (ListModels); ``multimask``: SAM picks
    the best of three candidate masks (helps a single click); ``keep_masks``: the server keeps each instance's
    low-res mask with the image and returns its ``mask_handle``, for a follow-up ``Region.previous_mask``."""
    request = pb.SegmentRequest(
        image=image_message(image),
        classes=_names(classes, "classes"),
        texts=_names(texts, "texts"),
        request_id=request_id,
    )
    request.regions.extend(_region(r) for r in regions)
    request.exemplars.extend(_exemplar(e) for e in exemplars)
    options = request.options
    options.mask_encoding = pb.MASK_ENCODING_COCO_RLE
    options.multimask = multimask
    options.keep_masks = keep_masks
    if review is not None:
        options.review.CopyFrom(review)
    limits = {"score_threshold": score_threshold, "iou_threshold": iou_threshold, "max_instances": max_instances}
    for field, value in limits.items():
        if value is not None:
            setattr(options, field, value)
    return request


@dataclasses.dataclass(frozen=True)
class TrackInput:
    """One frame for ``Client.track`` and what the caller says about it. ``index``: its frame_index (None: one more
    than the previous frame's, 0 first); ``timestamp``: presentation time in seconds, echoed in its answer;
    ``regions``: objects placed on it, each a new track (a ``Region`` or a bare XYXY box; ``previous_mask`` does not
    apply); ``corrections``: track_id → a ``Region`` (box and/or clicks) that re-prompts that live track, its label
    kept unless the region gives one; ``end_tracks``: tracks to stop following (answered once more, "ended");
    ``detect``: run the detector on it whatever detect_every says."""

    image: ImageLike
    index: int | None = None
    timestamp: float | None = None
    regions: Sequence[Region | XYXY] = ()
    corrections: Mapping[int, Region] = dataclasses.field(default_factory=dict)
    end_tracks: Sequence[int] = ()
    detect: bool = False


def track_requests(
    frames: Iterable[ImageLike | TrackInput],
    *,
    exemplars: Iterable[Exemplar] = (),
    regions: Iterable[Region | XYXY] = (),
    **start: Any,
) -> Iterator[pb.TrackRequest]:
    """The messages of a Track call, each built as it is sent: the start (``exemplars`` on reference images: each
    needs its ``image``; ``start``: the other keywords of ``start_message``: classes, texts,
    detect_every, lost_after, max_objects, match_iou, score_threshold, request_id), then one frame per item of
    ``frames``, an image or a ``TrackInput``. ``regions``: objects placed on the first frame (new tracks), before its
    own."""
    if isinstance(frames, str | bytes | os.PathLike | np.ndarray | Image.Image):
        raise TypeError(
            f"frames: an iterable of frames (paths, bytes, arrays, PIL images or TrackInputs), not one "
            f"{type(frames).__name__}; for a video file, `detseg track` decodes it"
        )
    yield start_message(exemplars=[_exemplar(e) for e in exemplars], **start)
    index, placed = -1, [(0, _region(r)) for r in regions]
    for item in frames:
        f = item if isinstance(item, TrackInput) else TrackInput(item)
        index = index + 1 if f.index is None else f.index
        placed += [(0, _region(r)) for r in f.regions] + [(k, _region(r)) for k, r in f.corrections.items()]
        image, ends = image_message(f.image), f.end_tracks
        yield frame_message(image, index, timestamp=f.timestamp, prompts=placed, end_tracks=ends, detect=f.detect)
        placed = []


def start_message(
    *,
    classes: str | Iterable[str] = (),
    texts: str | Iterable[str] = (),
    exemplars: Iterable[pb.Exemplar] = (),
    detect_every: int | None = None,
    lost_after: int | None = None,
    max_objects: int | None = None,
    match_iou: float | None = None,
    score_threshold: float | None = None,
    request_id: str = "",
) -> pb.TrackRequest:
    """A Track call's first message (masks as COCO RLE). Unset limits take the server's defaults (ListModels'
    defaults.track); classes, texts and exemplars all empty with ``detect_every`` unset: the detector never runs, and
    only the objects the frames place are followed."""
    start = pb.TrackStart(
        classes=_names(classes, "classes"),
        texts=_names(texts, "texts"),
        exemplars=list(exemplars),
        request_id=request_id,
    )
    start.options.mask_encoding = pb.MASK_ENCODING_COCO_RLE
    if score_threshold is not None:
        start.options.score_threshold = score_threshold
    limits = {
        "detect_every": detect_every,
        "lost_after": lost_after,
        "max_objects": max_objects,
        "match_iou": match_iou,
    }
    for field, value in limits.items():
        if value is not None:
            setattr(start, field, value)
    return pb.TrackRequest(start=start)


def frame_message(
    image: pb.Image,
    index: int,
    *,
    timestamp: float | None = None,
    prompts: Iterable[tuple[int, pb.RegionPrompt]] = (),
    end_tracks: Iterable[int] = (),
    detect: bool = False,
) -> pb.TrackRequest:
    """One frame of a Track call: its image and ``index`` (frame_index, strictly increasing), optional presentation
    ``timestamp`` (seconds, echoed), ``prompts`` as (track_id, region) pairs (track_id 0: a new object, else the live
    track the region corrects), tracks to end, and whether to run the detector on it."""
    frame = pb.TrackFrame(image=image, frame_index=index, end_tracks=list(end_tracks), detect=detect)
    if timestamp is not None:
        frame.timestamp.FromNanoseconds(round(timestamp * 1e9))
    for track_id, region in prompts:
        frame.prompts.add(region=region, track_id=track_id)
    return pb.TrackRequest(frame=frame)


class RequestStream(Iterator[T]):
    """A stream call's request iterator that keeps the exception its messages raised (a file that is not there, an
    array that is not RGB) and ends the stream there. gRPC consumes requests in its own thread (or task) and would
    log such an exception and cancel the call (UNKNOWN, "Exception iterating requests!"); ended this way, the server
    answers the messages sent so far and the caller raises ``error`` itself, in its own thread."""

    def __init__(self, messages: Iterable[T]) -> None:
        self._messages = iter(messages)
        self.error: Exception | None = None

    def __next__(self) -> T:
        if self.error is not None:
            raise StopIteration
        try:
            return next(self._messages)
        except StopIteration:
            raise
        except Exception as e:
            self.error = e
            raise StopIteration from None
