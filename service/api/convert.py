"""Protocol buffers ↔ pipeline types. Pure conversion; validation lives in the pipeline."""

from __future__ import annotations

import dataclasses

from google.protobuf.duration_pb2 import Duration

from service import __version__
from service.errors import InvalidInput
from service.models.roles import ModelDescriptor, ModelRole, PrecisionGate
from service.pipeline.image import DecodedImage
from service.pipeline.prompts import Exemplar, ImageInput, Options, RefinementOptions, Region, SegmentQuery
from service.pipeline.results import (
    CONCEPT,
    DETECTOR,
    EXEMPLAR,
    REGION,
    TEXT,
    EncodeResult,
    InstanceResult,
    SegmentResult,
)
from service.pipeline.review import ReviewOptions, ReviewRules
from service.pipeline.tracking import ENDED, LOST, NEW, TRACKED, FrameQuery, FrameResult, TrackPrompt, TrackQuery
from service.pipeline.vocabulary import EMBEDDING, EXACT, OPEN
from service.processing.masks import PNG, POLYGON, RLE, EncodedMask
from service.proto.detseg.v1 import detseg_pb2 as pb

_ENCODINGS = {
    pb.MASK_ENCODING_UNSPECIFIED: RLE,
    pb.MASK_ENCODING_COCO_RLE: RLE,
    pb.MASK_ENCODING_POLYGON: POLYGON,
    pb.MASK_ENCODING_PNG: PNG,
}
_SOURCES = {
    DETECTOR: pb.INSTANCE_SOURCE_DETECTOR,
    REGION: pb.INSTANCE_SOURCE_REGION_PROMPT,
    TEXT: pb.INSTANCE_SOURCE_TEXT,
    EXEMPLAR: pb.INSTANCE_SOURCE_EXEMPLAR,
    CONCEPT: pb.INSTANCE_SOURCE_CONCEPT,
}
_TRACK_STATES = {
    NEW: pb.TRACK_STATE_NEW,
    TRACKED: pb.TRACK_STATE_TRACKED,
    LOST: pb.TRACK_STATE_LOST,
    ENDED: pb.TRACK_STATE_ENDED,
}
_MATCH_KINDS = {EXACT: pb.TEXT_MATCH_KIND_EXACT, EMBEDDING: pb.TEXT_MATCH_KIND_EMBEDDING, OPEN: pb.TEXT_MATCH_KIND_OPEN}
_ROLES = {
    ModelRole.DETECTOR: pb.MODEL_ROLE_DETECTOR,
    ModelRole.SEGMENTER: pb.MODEL_ROLE_SEGMENTER,
    ModelRole.TEXT_ENCODER: pb.MODEL_ROLE_TEXT_ENCODER,
    ModelRole.CONCEPT_SEGMENTER: pb.MODEL_ROLE_CONCEPT_SEGMENTER,
    ModelRole.TRACKER: pb.MODEL_ROLE_TRACKER,
}


def image_from_proto(message: pb.Image, field: str = "image") -> ImageInput:
    """``field``: the message's path in the request, which an error names."""
    source = message.WhichOneof("source")
    if source == "raw":
        return ImageInput(raw=message.raw.data, width=message.raw.width, height=message.raw.height)
    if source == "encoded":
        return ImageInput(encoded=message.encoded)
    if source == "handle":
        return ImageInput(handle=message.handle)
    raise InvalidInput(
        f"{field}: missing; set {field}.encoded (JPEG, PNG, WebP bytes), {field}.raw or {field}.handle", field=field
    )


def query_from_proto(request: pb.SegmentRequest) -> SegmentQuery:
    return SegmentQuery(
        image=image_from_proto(request.image),
        classes=tuple(request.classes),
        regions=tuple(region_from_proto(r) for r in request.regions),
        options=options_from_proto(request.options),
        request_id=request.request_id,
        texts=tuple(request.texts),
        exemplars=tuple(exemplar_from_proto(e, f"exemplars[{i}]") for i, e in enumerate(request.exemplars)),
    )


def region_from_proto(r: pb.RegionPrompt) -> Region:
    return Region(
        box=(r.box.x_min, r.box.y_min, r.box.x_max, r.box.y_max) if r.HasField("box") else None,
        points=tuple((p.x, p.y, p.label) for p in r.points),
        label=r.label,
        previous_mask=r.previous_mask,
    )


def exemplar_from_proto(e: pb.Exemplar, field: str) -> Exemplar:
    """``field``: the exemplar's path in the request (``exemplars[2]``), which an error names."""
    return Exemplar(
        box=(e.box.x_min, e.box.y_min, e.box.x_max, e.box.y_max),
        label=e.label,
        image=image_from_proto(e.image, f"{field}.image") if e.HasField("image") else None,
    )


def options_from_proto(o: pb.SegmentOptions) -> Options:
    encoding = _ENCODINGS.get(o.mask_encoding)
    if encoding is None:
        raise InvalidInput(f"options.mask_encoding: unknown value {o.mask_encoding}")
    return Options(
        score_threshold=o.score_threshold if o.HasField("score_threshold") else None,
        iou_threshold=o.iou_threshold if o.HasField("iou_threshold") else None,
        max_instances=o.max_instances if o.HasField("max_instances") else None,
        mask_encoding=encoding,
        multimask=o.multimask,
        refinement=refinement_from_proto(o.refinement),
        review=review_from_proto(o.review),
        keep_masks=o.keep_masks,
    )


def track_query_from_proto(start: pb.TrackStart) -> TrackQuery:
    """A Track call's start message. Options that do not apply to tracking are INVALID_ARGUMENT, not ignored."""
    o = start.options
    for name in ("keep_masks", "multimask"):
        if getattr(o, name):
            raise InvalidInput(f"start.options.{name}: does not apply to tracking")
    if o.HasField("review"):
        raise InvalidInput("start.options.review: does not apply to tracking")
    return TrackQuery(
        classes=tuple(start.classes),
        texts=tuple(start.texts),
        exemplars=tuple(exemplar_from_proto(e, f"start.exemplars[{i}]") for i, e in enumerate(start.exemplars)),
        detect_every=start.detect_every if start.HasField("detect_every") else None,
        lost_after=start.lost_after if start.HasField("lost_after") else None,
        max_objects=start.max_objects if start.HasField("max_objects") else None,
        match_iou=start.match_iou if start.HasField("match_iou") else None,
        options=_start_options(o),
        request_id=start.request_id,
    )


def _start_options(o: pb.SegmentOptions) -> Options:
    try:
        return options_from_proto(o)
    except InvalidInput as e:
        raise InvalidInput(f"start.{e}") from None


_MAX_DURATION_SECONDS = 315_576_000_000  # google.protobuf.Duration's range: about 10,000 years either way


def valid_duration(d: Duration) -> bool:
    """A Duration as protobuf defines one: seconds within its range, nanos under a second, both of one sign."""
    return (
        abs(d.seconds) <= _MAX_DURATION_SECONDS
        and abs(d.nanos) <= 999_999_999
        and not (d.seconds > 0 > d.nanos or d.seconds < 0 < d.nanos)
    )


def frame_from_proto(frame: pb.TrackFrame) -> FrameQuery:
    if frame.HasField("timestamp") and not valid_duration(frame.timestamp):
        t = frame.timestamp
        raise InvalidInput(
            f"frame.timestamp: seconds={t.seconds}, nanos={t.nanos} is not a Duration: seconds within "
            f"±{_MAX_DURATION_SECONDS}, nanos within ±999,999,999 and of the seconds' sign"
        )
    try:
        image = image_from_proto(frame.image)
    except InvalidInput:
        raise InvalidInput("frame.image: missing; set image.encoded (JPEG, PNG, WebP bytes) or image.raw") from None
    return FrameQuery(
        image=image,
        frame_index=frame.frame_index,
        prompts=tuple(TrackPrompt(region_from_proto(t.region), t.track_id) for t in frame.prompts),
        end_tracks=tuple(frame.end_tracks),
        detect=frame.detect,
    )


def track_response_to_proto(result: FrameResult, frame: pb.TrackFrame, request_id: str) -> pb.TrackResponse:
    response = pb.TrackResponse(
        frame_index=result.frame_index,
        instances=[
            pb.TrackedInstance(
                track_id=t.track_id,
                state=_TRACK_STATES[t.state],
                instance=instance_to_proto(t.instance),
                first_frame=t.first_frame,
            )
            for t in result.instances
        ],
        image=image_info(result.image),
        detected=result.detected,
        request_id=request_id,
    )
    if frame.HasField("timestamp"):
        response.timestamp.CopyFrom(frame.timestamp)
    return response


def refinement_from_proto(r: pb.MaskRefinement) -> RefinementOptions:
    return RefinementOptions(
        disabled=r.disabled,
        min_region_area=r.min_region_area if r.HasField("min_region_area") else None,
        clip_to_box=r.clip_to_box if r.HasField("clip_to_box") else None,
        box_margin=r.box_margin if r.HasField("box_margin") else None,
    )


def review_from_proto(r: pb.ReviewRules) -> ReviewOptions:
    return ReviewOptions(
        **{f: getattr(r, f) if r.HasField(f) else None for f in _REVIEW_FIELDS}, drop_flagged=r.drop_flagged
    )


def review_rules_to_proto(rules: ReviewRules) -> pb.ReviewRules:
    return pb.ReviewRules(**{f: getattr(rules, f) for f in _REVIEW_FIELDS})


_REVIEW_FIELDS = tuple(f.name for f in dataclasses.fields(ReviewRules))


def mask_to_proto(mask: EncodedMask) -> pb.Mask:
    out = pb.Mask(height=mask.height, width=mask.width)
    if mask.encoding == RLE:
        out.coco_rle.size.extend([mask.height, mask.width])
        out.coco_rle.counts = mask.rle_counts
    elif mask.encoding == POLYGON:
        out.polygons.SetInParent()
        for poly in mask.polygons:
            out.polygons.polygons.add(coordinates=poly)
    else:
        out.png = mask.png
    return out


def instance_to_proto(inst: InstanceResult) -> pb.Instance:
    x0, y0, x1, y1 = (float(v) for v in inst.box)
    out = pb.Instance(
        label=inst.label,
        class_id=inst.class_id,
        score=inst.score,
        box=pb.BoundingBox(x_min=x0, y_min=y0, x_max=x1, y_max=y1),
        mask=mask_to_proto(inst.mask),
        mask_score=inst.mask_score,
        source=_SOURCES[inst.source],
        region_index=inst.region_index,
        mask_handle=inst.mask_handle,
        review=pb.Review(
            needed=inst.review.needed,
            reasons=[f"REVIEW_REASON_{r.name}" for r in inst.review.reasons],  # proto enum names
            stability_score=inst.review.stability,
        ),
    )
    m = inst.text_match
    if m is not None:
        out.text_match.CopyFrom(
            pb.TextMatch(
                text_index=m.text_index,
                text=m.text,
                kind=_MATCH_KINDS[m.kind],
                matched_class=m.class_name,
                similarity=m.similarity,
                read_as=m.read_as,
            )
        )
    return out


def model_to_proto(m: ModelDescriptor) -> pb.ModelInfo:
    return pb.ModelInfo(
        role=_ROLES.get(m.role, pb.MODEL_ROLE_UNSPECIFIED),
        name=m.name,
        architecture=m.architecture,
        version=m.version,
        weights_sha256=m.weights_sha256,
        vocabulary=list(m.vocabulary),
        input_size=m.input_size,
        open_vocabulary=m.open_vocabulary,
        precision=m.precision,
        precision_gate=None if m.precision_gate is None else precision_gate_to_proto(m.precision_gate),
    )


def precision_gate_to_proto(g: PrecisionGate) -> pb.PrecisionGate:
    return pb.PrecisionGate(
        precision=g.precision,
        held_out_set=g.held_out_set,
        images=g.images,
        prompts=g.prompts,
        min_mask_iou=g.min_mask_iou,
        median_mask_iou=g.median_mask_iou,
        required_min_mask_iou=g.required_min_mask_iou,
        passed=g.passed,
    )


def response_to_proto(
    result: SegmentResult, models: list[pb.ModelInfo], profile: str, backend: str
) -> pb.SegmentResponse:
    return pb.SegmentResponse(
        instances=[instance_to_proto(i) for i in result.instances],
        image=image_info(result.image),
        provenance=provenance(result.request_id, result.timings, models, profile, backend),
    )


def duration(seconds: float) -> Duration:
    """Seconds as a protobuf Duration, to the nanosecond (0.5 s is 0.5 s, not 0)."""
    out = Duration()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def encode_response_to_proto(
    result: EncodeResult, request_id: str, ttl_seconds: float, models: list[pb.ModelInfo], profile: str, backend: str
) -> pb.EncodeImageResponse:
    return pb.EncodeImageResponse(
        handle=result.handle,
        image=image_info(result.image),
        cached=result.cached,
        ttl=duration(ttl_seconds),
        provenance=provenance(request_id, result.timings, models, profile, backend),
    )


def image_info(image: DecodedImage) -> pb.ImageInfo:
    return pb.ImageInfo(width=image.width, height=image.height, sha256=image.sha256, format=image.format)


def provenance(
    request_id: str, stage_seconds: dict[str, float], models: list[pb.ModelInfo], profile: str, backend: str
) -> pb.Provenance:
    timings = [pb.StageTiming(stage=stage, duration=duration(seconds)) for stage, seconds in stage_seconds.items()]
    return pb.Provenance(
        request_id=request_id,
        profile=profile,
        backend=backend,
        models=models,
        timings=timings,
        server_version=__version__,
    )
