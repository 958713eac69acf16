"""The one reader of a detseg answer: protobuf ``SegmentResponse``s and ``TrackResponse``s (and their parts) as
typed Python values.

Everything that turns a received message into Python goes through here: the client's ``Result``/``Instance``/
``ModelRef`` and a tracked frame's ``FrameResult``/``TrackedInstance`` (``from_proto``), the plain-JSON view of an
instance that a response's manifest signs and ``detseg segment --json`` prints (``instance_content``), the labeling
records (built from a ``Result``) and the names of the proto's enums (``enum_name``:
``INSTANCE_SOURCE_REGION_PROMPT`` → ``"region_prompt"``). One reader, so a source, a review reason, a model role or a
track state is spelled the same everywhere: the enum value's name, lower case, without the enum's prefix.

Ground floor: numpy, pycocotools, the standard library and the generated protobuf modules only.

Frames: boxes are original-image pixels, XYXY; masks (H, W) bool at the original image size, decoded from the
COCO RLE the server sends only when asked for (``Instance.mask``, ``Result.masks``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from service.proto.detseg.v1 import detseg_pb2 as pb

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

XYXY = tuple[float, float, float, float]


def enum_name(enum_type: EnumTypeWrapper, value: int) -> str:
    """The lower-case name of ``value`` of a proto enum without the enum's own prefix, which protobuf's style
    writes as the enum type's name in UPPER_SNAKE_CASE: ``enum_name(pb.InstanceSource, 2)`` is "region_prompt",
    ``enum_name(pb.ReviewReason, 1)`` "low_score", ``enum_name(pb.ModelRole, 3)`` "text_encoder". Raises
    ValueError for a number the enum does not define."""
    return enum_type.Name(value).removeprefix(_prefix(enum_type.DESCRIPTOR.name)).lower()


def _prefix(type_name: str) -> str:
    """``"InstanceSource"`` → ``"INSTANCE_SOURCE_"`` (acronyms kept together: ``"HTTPCode"`` → ``"HTTP_CODE_"``)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", type_name).upper() + "_"


def _box(inst: pb.Instance) -> XYXY:
    return (inst.box.x_min, inst.box.y_min, inst.box.x_max, inst.box.y_max)


def _rle(inst: pb.Instance) -> dict[str, Any]:
    return {"size": list(inst.mask.coco_rle.size), "counts": inst.mask.coco_rle.counts.decode("ascii")}


def _mask(inst: pb.Instance) -> dict[str, Any]:
    """The mask as sent, under its encoding's key: "rle" (COCO RLE, the default and what a response without a mask
    shows), "polygons" ({"size": [H, W], "polygons": [[x0, y0, ...], ...]}) or "png" ({"size": [H, W], "sha256": of
    the PNG's bytes})."""
    mask, which = inst.mask, inst.mask.WhichOneof("data")
    if which == "polygons":
        polygons = [list(p.coordinates) for p in mask.polygons.polygons]
        return {"polygons": {"size": [mask.height, mask.width], "polygons": polygons}}
    if which == "png":
        return {"png": {"size": [mask.height, mask.width], "sha256": hashlib.sha256(mask.png).hexdigest()}}
    return {"rle": _rle(inst)}


def _reasons(inst: pb.Instance) -> list[str]:
    return [enum_name(pb.ReviewReason, r) for r in inst.review.reasons]


def instance_content(inst: pb.Instance) -> dict[str, Any]:
    """What a response says about one instance, as plain JSON: what a response's manifest signs (its digest) and
    ``detseg segment --json`` prints. Built from the protobuf values as sent (float32 scores and coordinates widened
    to Python floats), so the server that signs and a client that verifies build the same content. The mask is in
    the encoding sent (``_mask``: "rle", "polygons" or "png"), so a changed mask fails verification in every one."""
    return {
        "label": inst.label,
        "class_id": inst.class_id,
        "score": inst.score,
        "box": list(_box(inst)),
        "mask_score": inst.mask_score,
        "source": enum_name(pb.InstanceSource, inst.source),
        "region_index": inst.region_index,
        "text": inst.text_match.text,
        "similarity": inst.text_match.similarity,
        "read_as": inst.text_match.read_as,
        **_mask(inst),
        "review": {"needed": inst.review.needed, "reasons": _reasons(inst), "stability": inst.review.stability_score},
    }


@dataclasses.dataclass(frozen=True)
class ImageHandle:
    """An image the server has encoded and cached (``Client.encode_image``): prompts on it skip the encoder."""

    handle: str


@dataclasses.dataclass(frozen=True)
class Instance:
    """One labeled instance of a result. ``box``: XYXY original pixels; ``rle``: COCO RLE {"size": [H, W],
    "counts": str} of the whole image; ``source``: "detector", "region_prompt" (a caller's region), "text",
    "exemplar" or "concept"; ``text``/``similarity``: the free text it answers and how closely it matched (text
    answers only); ``needs_review``/``review_reasons``: whether a person should check it and the rules that fired
    ("low_score", "low_mask_score", "unstable_mask", "tiny_mask", "fragmented_mask", "weak_text_match");
    ``stability``: SAM's stability score of the mask; ``mask_handle``: its kept low-res mask when the request asked
    ``keep_masks`` (pass it as a later ``Region.previous_mask`` to correct the mask with a click), else "";
    ``read_as``: the phrase an open-vocabulary detector's text was read as before it was embedded ("scarlet star"
    → "red star", the demo's phrase reader), "" when it was embedded as sent."""

    label: str
    class_id: int
    score: float
    box: XYXY
    mask_score: float
    source: str
    region_index: int
    text: str
    similarity: float
    rle: dict[str, Any]
    needs_review: bool = False
    review_reasons: tuple[str, ...] = ()
    stability: float = 1.0
    mask_handle: str = ""
    read_as: str = ""

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool, decoded on each access (keep it if you need it twice)."""
        from pycocotools import mask as mask_utils

        return mask_utils.decode({"size": list(self.rle["size"]), "counts": self.rle["counts"].encode()}).astype(bool)

    @property
    def area(self) -> int:
        """Mask pixels."""
        from pycocotools import mask as mask_utils

        return int(mask_utils.area({"size": list(self.rle["size"]), "counts": self.rle["counts"].encode()}))

    @classmethod
    def from_proto(cls, inst: pb.Instance) -> Self:
        """The instance as sent; ValueError when its mask is not COCO RLE (the client asks for RLE)."""
        if inst.mask.WhichOneof("data") not in (None, "coco_rle"):
            raise ValueError("the client asks for COCO RLE masks; got another encoding")
        return cls(
            label=inst.label,
            class_id=inst.class_id,
            score=inst.score,
            box=_box(inst),
            mask_score=inst.mask_score,
            source=enum_name(pb.InstanceSource, inst.source),
            region_index=inst.region_index,
            text=inst.text_match.text,
            similarity=inst.text_match.similarity,
            rle=_rle(inst),
            needs_review=inst.review.needed,
            review_reasons=tuple(_reasons(inst)),
            stability=inst.review.stability_score,
            mask_handle=inst.mask_handle,
            read_as=inst.text_match.read_as,
        )


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A model that answered: role ("detector", "segmenter", ...), catalog name, version, weights sha256."""

    role: str
    name: str
    version: str
    weights_sha256: str

    @classmethod
    def from_proto(cls, model: pb.ModelInfo) -> Self:
        return cls(enum_name(pb.ModelRole, model.role), model.name, model.version, model.weights_sha256)


@dataclasses.dataclass(frozen=True)
class Result:
    """The answer for one image: instances highest score first (detections, then regions in request order),
    the image's size and sha256, and who answered (``request_id``, ``profile``, ``models``). ``response`` is the
    message itself, for anything not lifted into fields. (``service.client.Result`` adds ``verify`` and
    ``to_supervision``.)"""

    instances: tuple[Instance, ...]
    width: int
    height: int
    sha256: str
    request_id: str
    profile: str
    models: tuple[ModelRef, ...]
    response: pb.SegmentResponse = dataclasses.field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, response: pb.SegmentResponse) -> Self:
        p = response.provenance
        return cls(
            instances=tuple(Instance.from_proto(i) for i in response.instances),
            width=response.image.width,
            height=response.image.height,
            sha256=response.image.sha256,
            request_id=p.request_id,
            profile=p.profile,
            models=tuple(ModelRef.from_proto(m) for m in p.models),
            response=response,
        )

    def __len__(self) -> int:
        return len(self.instances)

    def __iter__(self) -> Iterator[Instance]:
        return iter(self.instances)

    @property
    def labels(self) -> list[str]:
        return [i.label for i in self.instances]

    @property
    def boxes(self) -> np.ndarray:
        """(N, 4) float32 XYXY original pixels."""
        return np.array([i.box for i in self.instances], dtype=np.float32).reshape(-1, 4)

    @property
    def scores(self) -> np.ndarray:
        """(N,) float32 detector scores."""
        return np.array([i.score for i in self.instances], dtype=np.float32)

    def masks(self) -> np.ndarray:
        """(N, H, W) bool, original image size (decoded now)."""
        if not self.instances:
            return np.zeros((0, self.height, self.width), dtype=bool)
        return np.stack([i.mask for i in self.instances])


@dataclasses.dataclass(frozen=True)
class TrackedInstance:
    """One object of a tracked frame (``FrameResult``): ``track_id`` stable for its life in the session (from 1,
    never reused); ``state``: "new" (first answered on this frame), "tracked" (seen on it), "lost" (not seen: empty
    mask, zero box) or "ended" (answered for the last time); ``first_frame``: the frame_index it started on;
    ``instance``: label, class_id, source as the track started, score of the detection that started or last matched
    it (1 for prompts), box and mask on this frame, mask_score = SAM 2's object score (probability it is visible)."""

    track_id: int
    state: str
    first_frame: int
    instance: Instance

    @classmethod
    def from_proto(cls, tracked: pb.TrackedInstance) -> Self:
        return cls(
            track_id=tracked.track_id,
            state=enum_name(pb.TrackState, tracked.state),
            first_frame=tracked.first_frame,
            instance=Instance.from_proto(tracked.instance),
        )

    @property
    def visible(self) -> bool:
        """Seen on this frame: "new" or "tracked" with a mask of at least one pixel."""
        return self.state in ("new", "tracked") and self.instance.area > 0


@dataclasses.dataclass(frozen=True)
class FrameError:
    """Why a frame of a Track call could not be used (the session goes on as if it had not been sent): ``code`` a
    google.rpc.Code number (3 INVALID_ARGUMENT, ...), ``message`` naming the field, as a unary call would."""

    code: int
    message: str


@dataclasses.dataclass(frozen=True)
class FrameResult:
    """The answer to one frame of a Track call: its ``frame_index`` and ``timestamp`` (seconds, None when the frame
    had none) echoed, every live track and those ending on it (``instances``, by track_id), whether the detector ran
    on it (``detected``), the frame's size and sha256, and the session's ``request_id``. A frame that could not be
    used has ``error`` set and nothing else (no instances, size 0). ``response`` is the message itself."""

    frame_index: int
    timestamp: float | None
    instances: tuple[TrackedInstance, ...]
    detected: bool
    width: int
    height: int
    sha256: str
    request_id: str
    error: FrameError | None
    response: pb.TrackResponse = dataclasses.field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, response: pb.TrackResponse) -> Self:
        ts = response.timestamp
        return cls(
            frame_index=response.frame_index,
            timestamp=ts.seconds + ts.nanos / 1e9 if response.HasField("timestamp") else None,
            instances=tuple(TrackedInstance.from_proto(t) for t in response.instances),
            detected=response.detected,
            width=response.image.width,
            height=response.image.height,
            sha256=response.image.sha256,
            request_id=response.request_id,
            error=FrameError(response.error.code, response.error.message) if response.HasField("error") else None,
            response=response,
        )

    def __len__(self) -> int:
        return len(self.instances)

    def __iter__(self) -> Iterator[TrackedInstance]:
        return iter(self.instances)

    @property
    def visible(self) -> tuple[TrackedInstance, ...]:
        """The tracks seen on this frame (``TrackedInstance.visible``), by track_id."""
        return tuple(t for t in self.instances if t.visible)
