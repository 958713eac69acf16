"""The SegmentationService servicer: converts messages and calls the pipeline, nothing more."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from service.api import convert
from service.api.admission import Admission
from service.api.errors import describe, guarded, status_details
from service.api.interceptors import CALL_REQUEST_ID, header_request_id
from service.api.sessions import TrackSessions
from service.api.workers import WorkerLink
from service.config import Settings
from service.errors import ConfigurationError, DeadlineExceeded, InvalidInput, ModelUnavailable, Overloaded
from service.pipeline.pipeline import Pipeline
from service.pipeline.prompts import SegmentQuery, valid_request_id
from service.pipeline.tracking import TrackLimits, TrackQuery, TrackSession
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from service.provenance import response as signing
from service.runners.base import DEADLINE

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CacheCounts:
    hits: int
    misses: int
    evictions: int


class SegmentationServicer(pb_grpc.SegmentationServiceServicer):
    """Serves one Pipeline. Until ``attach`` is called (models loading), RPCs answer UNAVAILABLE. ``link``: this
    worker's link to its siblings (None: a single-process server)."""

    def __init__(self, settings: Settings, link: WorkerLink | None = None) -> None:
        self._settings = settings
        self._signing_key = _signing_key(settings.signing_key)
        self.admission = Admission(settings.max_in_flight, settings.max_queue, link)
        self.tracking = TrackSessions(settings.max_track_sessions)
        self._track_limits = TrackLimits(
            detect_every=settings.track_detect_every,
            lost_after=settings.track_lost_after,
            max_objects=settings.track_max_objects,
            max_objects_limit=settings.track_max_objects_limit,
            match_iou=settings.track_match_iou,
            confirm_after=settings.track_confirm_after,
        )
        self._pipeline: Pipeline | None = None
        self._failed = False
        self._profile = ""
        self._models: list[pb.ModelInfo] = []

    def attach(self, pipeline: Pipeline, profile: str) -> None:
        self._pipeline = pipeline
        self._profile = profile
        self._models = [convert.model_to_proto(m) for m in pipeline.runner.models]

    def cache_stats(self) -> CacheCounts:
        """The embedding cache's hit, miss and eviction counts (zeros while models load)."""
        cache = self._pipeline.images.cache if self._pipeline is not None else None
        return CacheCounts(cache.hits, cache.misses, cache.evictions) if cache is not None else CacheCounts(0, 0, 0)

    @property
    def shared_tier(self) -> Any:
        """The pipeline's shared cache tier (``service.pipeline.shared_cache.RedisTier``), None when there is none."""
        return self._pipeline.images.shared if self._pipeline is not None else None

    def load_failed(self) -> None:
        """The models could not be loaded: RPCs say so (the reason is in the server's log, not for callers)."""
        self._failed = True

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            if self._failed:
                raise ModelUnavailable("the server's models failed to load; see the server log")
            raise ModelUnavailable("models are still loading; retry shortly")
        return self._pipeline

    async def Segment(self, request: pb.SegmentRequest, context: grpc.aio.ServicerContext) -> pb.SegmentResponse:
        request_id = _call_request_id(request.request_id, context)
        _set_deadline(context, self._settings.default_deadline_seconds)
        return await guarded(context, request_id, self._segment(request, request_id))

    async def _segment(self, request: pb.SegmentRequest, request_id: str) -> pb.SegmentResponse:
        """``request_id``: the caller's when well-formed, else a fresh one (a malformed one is rejected below)."""
        pipeline = self.pipeline
        query = _with_request_id(convert.query_from_proto(request), request_id)
        pipeline.check(query)
        async with self.admission.slot(DEADLINE.get()):
            result = await _within_deadline(pipeline.segment(query))
        response = convert.response_to_proto(result, self._models, self._profile, pipeline.runner.backend)
        signing.attach_manifest(request, response, self._signing_key)
        return response

    async def BatchSegment(
        self, request: pb.BatchSegmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchSegmentResponse:
        _set_deadline(context, self._settings.default_deadline_seconds)
        return await guarded(context, "batch-" + uuid.uuid4().hex, self._batch(request))

    async def _batch(self, request: pb.BatchSegmentRequest) -> pb.BatchSegmentResponse:
        self.pipeline  # noqa: B018 - UNAVAILABLE for the whole call while models load
        limit = self._settings.max_batch_items
        if not 1 <= len(request.requests) <= limit:
            raise InvalidInput(f"requests: {len(request.requests)} given, need 1 to {limit}")
        turns = self._turns()
        results = await asyncio.gather(*(self._item(i, r, turns) for i, r in enumerate(request.requests)))
        return pb.BatchSegmentResponse(results=results)

    def _turns(self) -> asyncio.Semaphore:
        """One call's turns at admission (BatchSegment, StreamSegment): at most max_in_flight of its items ask at a
        time, the rest wait their turn within the call, rather than filling the admission queue and being refused as
        over it because of their own call (a lone stream refused its own items RESOURCE_EXHAUSTED where max_in_flight
        + max_queue < max_stream_in_flight)."""
        return asyncio.Semaphore(self._settings.max_in_flight)

    async def StreamSegment(
        self, request_iterator: AsyncIterator[pb.SegmentRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SegmentResult]:
        """In-order results; at most max_stream_in_flight items read and not yet answered (flow control)."""
        _set_deadline(context, None)  # a stream may run for hours: each item gets the default (_item)
        try:
            self.pipeline  # noqa: B018 - UNAVAILABLE for the whole stream while models load
        except ModelUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        slots = asyncio.Semaphore(self._settings.max_stream_in_flight)
        turns = self._turns()
        started: asyncio.Queue[asyncio.Task[pb.SegmentResult] | None] = asyncio.Queue()

        async def read() -> None:
            index, items = 0, aiter(request_iterator)
            try:
                while True:
                    await slots.acquire()  # a slot before the next read: unread items wait in gRPC's flow control
                    try:
                        item = await anext(items)
                    except StopAsyncIteration:
                        return
                    await started.put(asyncio.create_task(self._item(index, item, turns)))
                    index += 1
            finally:  # also when reading fails (a message that does not parse): the answers end, then its error
                started.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await started.get()) is not None:
                yield await task
                slots.release()
            try:
                await reader  # the stream's own error, if reading it failed
            except DecodeError:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "a stream message does not parse as a detseg.v1.SegmentRequest"
                )
        finally:
            reader.cancel()
            while not started.empty():
                leftover = started.get_nowait()
                if leftover is not None:
                    leftover.cancel()

    async def Track(self, request_iterator: AsyncIterator[pb.TrackRequest], context: grpc.aio.ServicerContext) -> None:
        """One tracking session per call: its start, then one answer per frame, in order (module
        ``service.pipeline.tracking``). A frame's own error is its answer; the start's, a limit, an idle stream (no
        message, or no answer read, for track_idle_seconds) or a failing model end the call. The session's state is
        released however the call ends. Answers are written (``_write``), not yielded, so that a write a client
        never reads ends within the call's own task."""
        _set_deadline(context, None)
        call_deadline = DEADLINE.get()  # the caller's, if any: no frame runs past it
        messages = aiter(request_iterator)
        request_id = "track-" + uuid.uuid4().hex
        session: TrackSession | None = None
        try:
            pipeline = self.pipeline
            first = await self._next_message(messages)
            if first is None or first.WhichOneof("message") != "start":
                raise InvalidInput("start: the first message of a Track call must be TrackRequest.start")
            query = convert.track_query_from_proto(first.start)
            request_id = _request_id(query.request_id)
            session = TrackSession(pipeline, _with_request_id(query, request_id), self._track_limits)
            async with self.tracking.session(session):
                await session.open()
                while (message := await self._next_message(messages)) is not None:
                    await self._write(context, await self._track_frame(session, message, call_deadline))
        except Exception as e:
            failure = describe(e, request_id)
            await context.abort(failure.code, failure.message, status_details(failure))
        finally:
            if session is not None:
                session.close()

    async def _next_message(self, messages: AsyncIterator[pb.TrackRequest]) -> pb.TrackRequest | None:
        """The stream's next message, None at its end; DeadlineExceeded when none comes within track_idle_seconds,
        InvalidInput when its bytes do not parse (the call ends: gRPC reads no further message of it)."""
        try:
            async with asyncio.timeout(self._settings.track_idle_seconds):  # as Admission: not wait_for
                return await anext(messages, None)
        except DecodeError:
            raise InvalidInput("a stream message does not parse as a detseg.v1.TrackRequest") from None
        except TimeoutError:
            raise DeadlineExceeded(
                f"no message for {self._settings.track_idle_seconds:g} s (track_idle_seconds): the session is closed"
            ) from None

    async def _write(self, context: grpc.aio.ServicerContext, response: pb.TrackResponse) -> None:
        """Sends one answer. A client that reads none for track_idle_seconds has its call cancelled, as an idle stream
        is closed: gRPC's flow control holds a write once the client's window is full, and the session held its place
        among max_track_sessions for as long as the client stayed connected. Cancelled, not aborted: a status cannot
        be sent while the write is pending (gRPC's core refuses it), and the client reads nothing anyway."""
        try:
            async with asyncio.timeout(self._settings.track_idle_seconds):
                await context.write(response)
        except TimeoutError:
            idle = self._settings.track_idle_seconds
            log.info("a Track call's client read no answer for %g s (track_idle_seconds): the call is cancelled", idle)
            raise asyncio.CancelledError from None

    async def _track_frame(
        self, session: TrackSession, message: pb.TrackRequest, call_deadline: float | None
    ) -> pb.TrackResponse:
        """One frame's answer, or its own error where the session is as before it: the frame is refused
        (InvalidInput), or admission has no room for it now (Overloaded; DeadlineExceeded waiting for a slot: sent
        again, it is answered as if first sent then). Failures once the frame runs end the call. A frame has
        default_deadline_seconds, within the call's deadline (``call_deadline``, None: none): each frame's was a
        fresh default, so admission and Triton were told of time the call did not have."""
        frame = message.frame
        own = time.monotonic() + self._settings.default_deadline_seconds
        DEADLINE.set(own if call_deadline is None else min(own, call_deadline))
        try:
            if message.WhichOneof("message") != "frame":
                raise InvalidInput("start: a Track call has one start message, the first; send frames after it")
            query = convert.frame_from_proto(frame)
            async with contextlib.AsyncExitStack() as admitted:
                try:
                    await admitted.enter_async_context(self.admission.slot(DEADLINE.get()))
                except (Overloaded, DeadlineExceeded) as e:
                    return _frame_error(frame, session.request_id, e)
                result = await _within_deadline(session.frame(query))
        except InvalidInput as e:
            return _frame_error(frame, session.request_id, e)
        self.tracking.answered()
        return convert.track_response_to_proto(result, frame, session.request_id)

    async def _item(self, index: int, request: pb.SegmentRequest, turns: asyncio.Semaphore) -> pb.SegmentResult:
        """One batch/stream item: its response, or its own error (the others go on); run in its turn (``_turns``)."""
        request_id = _request_id(request.request_id)
        if DEADLINE.get() is None:  # a stream item without the caller's deadline (this task's own context)
            DEADLINE.set(time.monotonic() + self._settings.default_deadline_seconds)
        try:
            async with turns:
                response = await self._segment(request, request_id)
            return pb.SegmentResult(index=index, response=response)
        except Exception as e:
            failure = describe(e, request_id)
            return pb.SegmentResult(
                index=index, error=pb.ItemError(code=failure.code.value[0], message=failure.message)
            )

    async def EncodeImage(
        self, request: pb.EncodeImageRequest, context: grpc.aio.ServicerContext
    ) -> pb.EncodeImageResponse:
        request_id = _call_request_id("", context)
        _set_deadline(context, self._settings.default_deadline_seconds)
        return await guarded(context, request_id, self._encode_image(request, request_id))

    async def _encode_image(self, request: pb.EncodeImageRequest, request_id: str) -> pb.EncodeImageResponse:
        pipeline = self.pipeline
        async with self.admission.slot(DEADLINE.get()):
            result = await _within_deadline(pipeline.encode(convert.image_from_proto(request.image)))
        return convert.encode_response_to_proto(
            result, request_id, pipeline.images.cache.ttl, self._models, self._profile, pipeline.runner.backend
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return await guarded(context, "list-models", self._list_models())

    async def _list_models(self) -> pb.ListModelsResponse:
        pipeline, s = self.pipeline, self._settings
        return pb.ListModelsResponse(
            models=self._models,
            profile=self._profile,
            backend=pipeline.runner.backend,
            defaults=pb.ServerDefaults(
                score_threshold=pipeline.limits.default_score_threshold,
                iou_threshold=s.default_iou_threshold,
                max_instances=s.default_max_instances,
                max_instances_limit=s.max_instances,
                max_image_bytes=s.max_image_bytes,
                max_image_pixels=s.max_image_pixels,
                refinement=pb.MaskRefinement(
                    min_region_area=s.mask_min_region_area,
                    clip_to_box=s.mask_clip_to_box,
                    box_margin=s.mask_box_margin,
                ),
                max_text_prompts=s.max_text_prompts,
                max_text_chars=s.max_text_chars,
                text_match_threshold=s.text_match_threshold,
                max_exemplars=s.max_exemplars,
                max_image_side=s.max_image_side,
                max_class_prompts=s.max_class_prompts,
                max_region_prompts=s.max_region_prompts,
                max_points_per_region=s.max_points_per_region,
                max_batch_items=s.max_batch_items,
                max_stream_in_flight=s.max_stream_in_flight,
                cache_ttl=convert.duration(pipeline.images.cache.ttl),
                max_kept_masks=s.max_kept_masks,
                review=convert.review_rules_to_proto(pipeline.limits.review),
                track=pb.TrackDefaults(
                    **dataclasses.asdict(self._track_limits),  # what sessions run with
                    max_sessions=self.tracking.max_sessions,
                    idle_timeout=convert.duration(s.track_idle_seconds),
                    memory_frames=_memory_frames(pipeline),
                ),
            ),
            prompt_kinds=_prompt_kinds(pipeline),
        )


def _signing_key(path: str) -> Any:
    """The Ed25519 private key at ``path`` (None when empty); ConfigurationError when it cannot be read."""
    if not path:
        return None
    from service import provenance

    try:
        return provenance.load_private_key(Path(path))
    except OSError as e:
        raise ConfigurationError(f"signing_key: cannot read an Ed25519 private key from {path} ({e})") from None
    except ValueError as e:  # names the file
        raise ConfigurationError(f"signing_key: {e}") from None


def _memory_frames(pipeline: Pipeline) -> int:
    """SAM 2's memory frames per tracked object (0 where this server cannot track)."""
    tracker = getattr(pipeline.runner, "tracker", None)
    return tracker.memory_frames if tracker is not None else 0


def _prompt_kinds(pipeline: Pipeline) -> list[pb.PromptKind]:
    kinds = [pb.PROMPT_KIND_CLASSES, pb.PROMPT_KIND_REGIONS]
    if pipeline.matcher is not None or pipeline.class_embeddings is not None or pipeline.concept_processing:
        kinds.append(pb.PROMPT_KIND_TEXTS)
    if pipeline.runner.detector.visual_prompts or pipeline.concept_processing is not None:
        kinds.append(pb.PROMPT_KIND_EXEMPLARS)
    return kinds


def _frame_error(frame: pb.TrackFrame, request_id: str, error: Exception) -> pb.TrackResponse:
    """A frame's answer that is its own error (``describe``: code and message as the call's would be)."""
    failure = describe(error, request_id)
    response = pb.TrackResponse(
        frame_index=frame.frame_index,
        request_id=request_id,
        error=pb.ItemError(code=failure.code.value[0], message=failure.message),
    )
    if frame.HasField("timestamp") and convert.valid_duration(frame.timestamp):  # echoed when it is one
        response.timestamp.CopyFrom(frame.timestamp)
    return response


def _call_request_id(given: str, context: grpc.aio.ServicerContext) -> str:
    """A unary call's id: the request's field, else the ``x-request-id`` metadata, when well-formed, else a fresh
    one; the access log's record of the call names the same (``CALL_REQUEST_ID``)."""
    header = header_request_id(context.invocation_metadata())
    request_id = given if valid_request_id(given) or not header else header
    request_id = _request_id(request_id)
    CALL_REQUEST_ID.set(request_id)
    return request_id


def _request_id(given: str) -> str:
    """The id to log and echo: the caller's if well-formed, else a fresh one, so caller text never reaches a log
    line raw (a malformed id is then rejected as INVALID_ARGUMENT by the pipeline's checks)."""
    return given if valid_request_id(given) else uuid.uuid4().hex


Query = TypeVar("Query", SegmentQuery, TrackQuery)


def _with_request_id(query: Query, request_id: str) -> Query:
    """``query`` with ``request_id`` (``_request_id``'s) in place of the caller's, unless the caller's is malformed:
    that one stays, for the query's checks to reject (INVALID_ARGUMENT naming the field)."""
    if query.request_id and not valid_request_id(query.request_id):
        return query
    return dataclasses.replace(query, request_id=request_id)


async def _within_deadline(work: Awaitable[T]) -> T:
    """``work``, cancelled when the call's deadline passes (DeadlineExceeded). Model passes already running in
    worker threads finish in the background; their results are dropped."""
    deadline = DEADLINE.get()
    if deadline is None:
        return await work
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):  # as Admission: not wait_for
            return await work
    except TimeoutError:
        raise DeadlineExceeded("the deadline passed while the request was being answered") from None


def _set_deadline(context: grpc.aio.ServicerContext, default_seconds: float | None) -> None:
    """The call's deadline for admission and the runners (the Triton runner forwards what is left of it): the
    caller's, else ``default_seconds`` from now (None: left unset, for streams, whose items each get one)."""
    remaining = context.time_remaining()
    if remaining is not None:
        DEADLINE.set(time.monotonic() + remaining)
    elif default_seconds is not None:
        DEADLINE.set(time.monotonic() + default_seconds)
