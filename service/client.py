"""The Python client of a detseg server: typed requests and results over the generated stubs.

    from service.client import Client

    with Client("127.0.0.1:50051") as detseg:
        result = detseg.segment("photo.jpg", classes=["person", "bus"])
    detections = result.to_supervision()  # supervision.Detections: xyxy, mask, confidence, class_name

``AsyncClient`` is the same over ``grpc.aio``. Every call has a deadline (the client's ``timeout`` unless the
call gives one) that bounds the whole call, retries included. UNAVAILABLE (models still loading, a server not yet
listening or restarting, connection refused, a replica going away) is retried with capped exponential backoff and
full jitter (``RetryPolicy``) until that deadline: the deadline is the bound, not a count of attempts, so a call
made while a server starts and loads its models for a minute gets its answer once it is ready. Each attempt may
take only the time left. No other status is retried, since it would fail again. gRPC's own service-config
retries cap attempts at 5 and cannot wait out a loading server, hence the loop here. Streams (``segment_many``,
``track``) are not retried. Message limits are raised for masks of large images (``max_message_bytes``). Results are
``service.results``' types (re-exported here): boxes XYXY original pixels, masks (H, W) bool at the image's size.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from service import results
from service.client_requests import (  # noqa: F401 (re-exported: the request side is the client's)
    Exemplar,
    Point,
    Region,
    RequestStream,
    TrackInput,
    image_message,
    segment_request,
    track_requests,
)
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from service.provenance import VerifyResult
from service.provenance.response import verify_response
from service.results import (  # noqa: F401 (re-exported: the reader's types are the client's)
    XYXY,
    FrameError,
    FrameResult,
    ImageHandle,
    Instance,
    ModelRef,
    TrackedInstance,
)
from service.rich_status import violated_field

if TYPE_CHECKING:
    import supervision as sv

    from service.client_requests import ImageLike

DEFAULT_TARGET = "127.0.0.1:50051"


_MAX_EXPONENT = 64  # backoff growth steps counted: past any cap a policy names (2 ** 64 times its first wait)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE, until the call's deadline: before retry n the client sleeps a uniform random time in
    [0, min(initial_backoff_s * multiplier^(n-1), max_backoff_s)] ("full jitter", as gRPC's retry design and AWS's
    backoff guidance do), cut to the time the deadline leaves. ``max_attempts`` (calls in all) is no bound by
    default (None); a caller that wants fewer sets it (1: never retry)."""

    max_attempts: int | None = None
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        # the exponent stops where the cap is reached: 2.0 ** 1024 overflows (OverflowError at retry 1025)
        grown = self.initial_backoff_s * self.multiplier ** min(retry - 1, _MAX_EXPONENT)
        return rng.uniform(0.0, min(grown, self.max_backoff_s))


@dataclasses.dataclass(frozen=True)
class Result(results.Result):
    """The answer for one image (``service.results.Result``) with its manifest check and ``supervision`` view."""

    def verify(self, trusted_keys: Sequence[Any] = (), *, require_signature: bool = True) -> VerifyResult:
        """Checks the response's provenance manifest: the signature (by one of ``trusted_keys``, Ed25519 public
        keys, when given) and that it covers exactly these instances and this image. Raises VerificationFailed."""
        return verify_response(self.response, trusted_keys=trusted_keys, require_signature=require_signature)

    def to_supervision(self) -> sv.Detections:
        """``supervision.Detections``: xyxy, mask (N, H, W) bool, confidence, class_id (detector vocabulary; -1
        for regions and concepts) and data["class_name"] (the labels), data["mask_score"], data["source"]."""
        import supervision as sv

        return sv.Detections(
            xyxy=self.boxes.astype(np.float64).reshape(-1, 4),
            mask=self.masks() if self.instances else None,
            confidence=self.scores,
            class_id=np.array([i.class_id for i in self.instances], dtype=int),
            data={
                "class_name": np.array(self.labels, dtype=object),
                "mask_score": np.array([i.mask_score for i in self.instances], dtype=np.float32),
                "source": np.array([i.source for i in self.instances], dtype=object),
            },
        )


class RequestFailed(Exception):
    """A call the server refused or could not answer: ``code`` (grpc.StatusCode), the server's message, and
    how many attempts were made (more than 1 only for UNAVAILABLE). A deadline that passes while UNAVAILABLE is
    retried is DEADLINE_EXCEEDED, its message naming the last UNAVAILABLE. ``field``: the offending field's path
    (``classes[2]``) where the server named one in the status details (``google.rpc.BadRequest``), else None."""

    def __init__(self, code: grpc.StatusCode, message: str, attempts: int = 1, field: str | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.attempts, self.field = code, message, attempts, field

    @classmethod
    def from_rpc(cls, error: grpc.RpcError, attempts: int = 1) -> RequestFailed:
        trailing = getattr(error, "trailing_metadata", None)  # a grpc.Call, or grpc.aio's AioRpcError
        field = violated_field(trailing() if callable(trailing) else None)
        return cls(error.code(), error.details() or "", attempts, field)  # type: ignore[attr-defined]


def channel_options(max_message_bytes: int, retry: RetryPolicy) -> list[tuple[str, Any]]:
    """Message limits both ways, and reconnect backoff in step with ``retry`` so that a restarted server is
    found again within the retry budget (gRPC's default first reconnect waits ~1 s)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", int(retry.initial_backoff_s * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(retry.initial_backoff_s * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(retry.max_backoff_s * 1000)),
    ]


@dataclasses.dataclass(frozen=True)
class ItemResult:
    """One item of ``segment_many``: its index in the input, and its result or error."""

    index: int
    result: Result | None
    error: RequestFailed | None


def _item(r: pb.SegmentResult) -> ItemResult:
    if r.WhichOneof("result") == "response":
        return ItemResult(int(r.index), Result.from_proto(r.response), None)
    return ItemResult(int(r.index), None, RequestFailed(_status(r.error.code), r.error.message))


def _segment_requests(requests: Iterable[pb.SegmentRequest]) -> Iterator[pb.SegmentRequest]:
    """``segment_many``'s items, each checked to be a SegmentRequest (gRPC would fail the call on another type
    with INTERNAL "Exception serializing request!")."""
    for index, request in enumerate(requests):
        if not isinstance(request, pb.SegmentRequest):
            raise TypeError(
                f"segment_many: item {index} is a {type(request).__name__}, not a SegmentRequest "
                "(build one with segment_request(image, ...))"
            )
        yield request


def _status(value: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Code number."""
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)


class _Budget:
    """One call's retry state: its deadline (time.monotonic() seconds), the attempts made, the last error;
    ``on_retry``: told of each retry (the UNAVAILABLE as RequestFailed, and the seconds before the next attempt)."""

    def __init__(
        self,
        retry: RetryPolicy,
        deadline: float,
        rng: random.Random,
        on_retry: Callable[[RequestFailed, float], None] | None = None,
    ) -> None:
        self.retry, self.deadline, self.rng, self.on_retry = retry, deadline, rng, on_retry
        self.attempts = 0
        self.error: grpc.RpcError | None = None

    def time_left(self) -> float:
        """Seconds the next attempt may take (counted as made); raises RequestFailed DEADLINE_EXCEEDED when the
        deadline passed while retrying."""
        left = self.deadline - time.monotonic()
        if left <= 0 and self.error is not None:
            raise RequestFailed(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the deadline passed while retrying UNAVAILABLE ({self.attempts} attempts; the last: "
                f"{self.error.details() or 'no details'})",  # type: ignore[attr-defined]
                self.attempts,
            )
        self.attempts += 1
        return max(left, 0.0)

    def wait_after(self, error: grpc.RpcError) -> float:
        """Seconds to sleep before retrying after ``error``: a full-jitter backoff cut to the time left. Raises
        RequestFailed when ``error`` is not UNAVAILABLE or ``retry.max_attempts`` are spent."""
        self.error = error
        spent = self.retry.max_attempts is not None and self.attempts >= self.retry.max_attempts
        if error.code() != grpc.StatusCode.UNAVAILABLE or spent:  # type: ignore[attr-defined]
            raise RequestFailed.from_rpc(error, self.attempts)
        wait = min(self.retry.backoff(self.attempts, self.rng), max(self.deadline - time.monotonic(), 0.0))
        if self.on_retry is not None:
            self.on_retry(RequestFailed.from_rpc(error, self.attempts), wait)
        return wait


def _timeout(seconds: float) -> float:
    """A call's timeout: finite seconds, 0 or more (0: a deadline already passed). ValueError otherwise (gRPC answered
    an infinite one DEADLINE_EXCEEDED at once, before the call left)."""
    if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"timeout: {seconds!r}; give a finite number of seconds, 0 or more")
    return float(seconds)


class _Channel:
    """What both clients share: the channels (options from ``channel_options``), their stubs, deadlines, metadata.

    ``connections`` > 1 opens that many channels, each its own TCP connection, and sends each call on the next one:
    `detseg serve --workers N` (and a TCP load balancer) spreads connections, not calls, so one channel reaches one
    worker."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = 64 << 20,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        token: str | None = None,
        connections: int = 1,
        on_retry: Callable[[RequestFailed, float], None] | None = None,
    ) -> None:
        if connections < 1:
            raise ValueError(f"connections must be at least 1, got {connections}")
        self.retry = retry or RetryPolicy()
        options = channel_options(max_message_bytes, self.retry)
        if connections > 1:  # a subchannel pool per channel: otherwise channels to one target share a connection
            options = [*options, ("grpc.use_local_subchannel_pool", 1)]
        self._channels = [self._open(target, credentials, options) for _ in range(connections)]
        self._stubs = itertools.cycle([pb_grpc.SegmentationServiceStub(c) for c in self._channels])
        self.timeout = _timeout(timeout)  # seconds, for calls that give none; bounds the call with its retries
        self._metadata = (*metadata, ("authorization", f"Bearer {token}")) if token else tuple(metadata)
        self._rng = random.Random()
        self._on_retry = on_retry

    @property
    def _stub(self) -> pb_grpc.SegmentationServiceStub:
        """The stub of the next call's channel (round robin; itertools.cycle is atomic under the GIL)."""
        return next(self._stubs)

    def _budget(self, timeout: float | None) -> _Budget:
        seconds = self.timeout if timeout is None else _timeout(timeout)
        return _Budget(self.retry, time.monotonic() + seconds, self._rng, self._on_retry)

    @staticmethod
    def _open(target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]) -> Any:
        raise NotImplementedError


class Client(_Channel):
    """A blocking client; thread-safe (its channels reused). Use as a context manager or call ``close``.
    Keywords: ``timeout`` (default deadline, s), ``retry`` (RetryPolicy), ``max_message_bytes``, ``credentials``
    (grpc.ssl_channel_credentials(...) for TLS and mutual TLS), ``metadata`` (extra call metadata), ``token`` (sent
    as "authorization: Bearer <token>" when the server requires one), ``connections`` (channels, each its own
    connection, that calls take in turn: 1, or the worker count of `detseg serve --workers N` and more),
    ``on_retry`` (called before each retry of UNAVAILABLE with that error as RequestFailed and the seconds until the
    next attempt: to tell a user that a server does not answer yet)."""

    @staticmethod
    def _open(target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]) -> Any:
        if credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, credentials, options=options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        budget = self._budget(timeout)
        while True:
            try:
                return method(request, timeout=budget.time_left(), metadata=self._metadata)
            except grpc.RpcError as e:
                time.sleep(budget.wait_after(e))

    def segment(self, image: ImageLike, *, timeout: float | None = None, **prompts: Any) -> Result:
        """Segment one image; ``prompts``: the keywords of ``segment_request`` (classes, texts, regions,
        exemplars, score_threshold, iou_threshold, max_instances, request_id). Raises RequestFailed."""
        return Result.from_proto(self._call(self._stub.Segment, segment_request(image, **prompts), timeout))

    def segment_many(
        self, requests: Iterable[pb.SegmentRequest], *, timeout: float | None = None
    ) -> Iterator[ItemResult]:
        """Many requests over one StreamSegment call (the server bounds how many are in flight): one
        ItemResult per request, in request order; a failed item does not stop the others. ``requests``: each a
        SegmentRequest (``segment_request(image, ...)``), read as gRPC sends them. ``timeout`` bounds the whole stream
        (default: none beyond the server's own per-item deadlines). An exception raised reading ``requests`` (a
        missing file) or an item that is no SegmentRequest (TypeError) ends the stream there: it is raised after the
        results of the requests sent before it."""
        stream = RequestStream(_segment_requests(requests))
        try:
            for r in self._stub.StreamSegment(stream, timeout=timeout, metadata=self._metadata):
                yield _item(r)
        except grpc.RpcError as e:
            raise stream.error or RequestFailed.from_rpc(e) from None
        if stream.error is not None:
            raise stream.error

    def track(
        self, frames: Iterable[ImageLike | TrackInput], *, timeout: float | None = None, **start: Any
    ) -> Iterator[FrameResult]:
        """Follows objects through a video over one Track call (SAM 2's memory): one ``FrameResult`` per frame, in
        order, while frames are read from ``frames`` as gRPC sends them (the server reads at most its
        max_stream_in_flight ahead). ``start``: the keywords of ``track_requests`` (classes, texts, exemplars,
        ``regions`` placed on the first frame, detect_every, lost_after, max_objects, match_iou, score_threshold,
        request_id). A frame the server cannot use (out of order, another size, a prompt for an unknown track) comes
        back with its ``error`` set, and the session goes on as if it had not been sent. A failed call (a bad start,
        RESOURCE_EXHAUSTED beyond the server's sessions, a session closed idle, ``timeout``: seconds for the whole
        call, default none) raises RequestFailed; an exception raised reading ``frames`` or building a message (a
        missing file) is raised as itself, after the answers to the frames sent before it. Never retried: a session
        lives as long as its call and cannot be resumed. Stopping early (``break``) cancels the call."""
        requests = RequestStream(track_requests(frames, **start))
        call = self._stub.Track(
            requests, timeout=None if timeout is None else _timeout(timeout), metadata=self._metadata
        )
        try:
            for response in call:
                yield FrameResult.from_proto(response)
        except grpc.RpcError as e:
            raise requests.error or RequestFailed.from_rpc(e) from None
        finally:
            call.cancel()  # nothing once the call has ended
        if requests.error is not None:
            raise requests.error

    def encode_image(self, image: ImageLike, *, timeout: float | None = None) -> ImageHandle:
        """Encode and cache an image on the server; prompts on the handle reuse its features."""
        request = pb.EncodeImageRequest(image=image_message(image))
        return ImageHandle(self._call(self._stub.EncodeImage, request, timeout).handle)

    def list_models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        return self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)


class AsyncClient(_Channel):
    """The asyncio client (``grpc.aio``); same calls and keywords as ``Client``, awaited. Create it inside a
    running event loop."""

    @staticmethod
    def _open(target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # its channels would bind to another loop: "attached to a different loop" at the call
            raise RuntimeError(
                "AsyncClient: create it inside a running event loop (in an async function: "
                "`async with AsyncClient(target) as detseg:`); outside one, use Client"
            ) from None
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        budget = self._budget(timeout)
        while True:
            try:
                return await method(request, timeout=budget.time_left(), metadata=self._metadata)
            except grpc.RpcError as e:
                await asyncio.sleep(budget.wait_after(e))

    async def segment(self, image: ImageLike, *, timeout: float | None = None, **prompts: Any) -> Result:
        return Result.from_proto(await self._call(self._stub.Segment, segment_request(image, **prompts), timeout))

    async def segment_many(
        self, requests: Iterable[pb.SegmentRequest], *, timeout: float | None = None
    ) -> AsyncIterator[ItemResult]:
        stream = RequestStream(_segment_requests(requests))
        try:
            async for r in self._stub.StreamSegment(stream, timeout=timeout, metadata=self._metadata):
                yield _item(r)
        except grpc.RpcError as e:
            raise stream.error or RequestFailed.from_rpc(e) from None
        if stream.error is not None:
            raise stream.error

    async def track(
        self, frames: Iterable[ImageLike | TrackInput], *, timeout: float | None = None, **start: Any
    ) -> AsyncIterator[FrameResult]:
        requests = RequestStream(track_requests(frames, **start))
        call = self._stub.Track(
            requests, timeout=None if timeout is None else _timeout(timeout), metadata=self._metadata
        )
        try:
            async for response in call:
                yield FrameResult.from_proto(response)
        except grpc.RpcError as e:
            raise requests.error or RequestFailed.from_rpc(e) from None
        finally:
            call.cancel()
        if requests.error is not None:
            raise requests.error

    async def encode_image(self, image: ImageLike, *, timeout: float | None = None) -> ImageHandle:
        request = pb.EncodeImageRequest(image=image_message(image))
        return ImageHandle((await self._call(self._stub.EncodeImage, request, timeout)).handle)

    async def list_models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        return await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
