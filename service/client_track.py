"""The request side of ``Client.track``: a Track call's messages from plain values and message parts, and the
request stream that keeps an error raised while a message was being built.

``service.client`` turns its typed prompts and images (``Region``, ``Exemplar``, ``image_message``) into the parts
(``pb.RegionPrompt``, ``pb.Exemplar``, ``pb.Image``) and calls these; the answers are read by ``service.results``
(``FrameResult``). The floor below the client: the standard library and the generated protobuf modules only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from service.proto.detseg.v1 import detseg_pb2 as pb

T = TypeVar("T")


def start_message(
    *,
    classes: Iterable[str] = (),
    texts: Iterable[str] = (),
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
    start = pb.TrackStart(classes=list(classes), texts=list(texts), exemplars=list(exemplars), request_id=request_id)
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
