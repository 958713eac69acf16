"""The server's interceptors: a span and metrics per RPC (``RpcTelemetry``), the access log (``AccessLog``) and the
refusal of a unary request whose bytes do not parse (``ParseRequests``).

Both observe each call the same way, through ``observe_calls``: the handler is rebuilt so that every call, of any of
gRPC's four kinds, runs inside a context manager the interceptor gives (streams: the whole stream).

The access log: one INFO record per RPC on the ``detseg.access`` logger (``Settings.access_log``). Each record
carries, as structured fields (``service.startup`` formats them: keys of the JSON object, or ``key=value`` after
the text line): ``method`` (``detseg.v1.SegmentationService/Segment``), ``status`` (the gRPC status code's name),
``duration_ms`` (from the call reaching the server to the handler's end; streams: the whole stream),
``request_id`` and ``peer`` (gRPC's ``ipv4:10.0.0.7:51234`` form). ``request_id`` is the caller's: the request's
``request_id`` field, else the ``x-request-id`` metadata, when well-formed (``valid_request_id``: caller text never
reaches a log line raw); absent otherwise. Health checks (probes every few seconds) are not logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc._cython import cygrpc
from grpc_health.v1 import health
from opentelemetry import propagate, trace

from service.pipeline.prompts import valid_request_id
from service.telemetry import record_rpc, rpc_status

LOGGER = "detseg.access"
REQUEST_ID_HEADER = "x-request-id"
# The id the servicer answered a unary call with (the caller's, else one it made): what its access record names.
CALL_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("detseg_call_request_id", default="")
EXEMPT_PREFIXES = (f"/{health.SERVICE_NAME}/",)  # kubelet and load-balancer probes: noise, not traffic
UNTRACED = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes and API browsing: no spans, no metrics

# What a stream's context.write raises when the client went away while the write waited (gRPC's own class, in its
# private module: passed on, gRPC logged it at ERROR and the call's status was UNKNOWN).
_WRITE_FAILED = cygrpc.ExecuteBatchError
log = logging.getLogger(LOGGER)
_tracer = trace.get_tracer("detseg.api")

# Given a call's request (a stream-request call: its request iterator) and context, a context manager the call
# runs inside; it sees the exception the call ends with, if any.
CallObserver = Callable[[Any, grpc.aio.ServicerContext], contextlib.AbstractContextManager[None]]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


def observe_calls(handler: grpc.RpcMethodHandler, observer: CallObserver) -> grpc.RpcMethodHandler:
    """``handler`` rebuilt so that each of its calls runs inside ``observer(request, context)``."""
    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with observer(request, context):
                return await inner(request, context)

        make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return make(unary, **kwargs)

    inner_stream = handler.unary_stream or handler.stream_stream
    make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    if not inspect.isasyncgenfunction(inner_stream):  # it writes its answers (context.write) and returns None

        async def writing(request: Any, context: grpc.aio.ServicerContext) -> None:
            with observer(request, context):
                await inner_stream(request, context)

        return make(writing, **kwargs)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> None:
        # Written here, not yielded to gRPC: gRPC sends a generator's answers outside it, so a client gone while a send
        # waited left the generators paused, closed later by the event loop's finaliser in another task (the
        # observers then saw GeneratorExit: status UNKNOWN, and OpenTelemetry's context detach failed at ERROR).
        with observer(request, context):
            async with contextlib.aclosing(inner_stream(request, context)) as answers:
                async for response in answers:
                    try:
                        await context.write(response)
                    except _WRITE_FAILED:  # the client went away while the write waited: a cancellation
                        raise asyncio.CancelledError from None

    return make(streaming, **kwargs)


@dataclasses.dataclass(frozen=True)
class Unparsable:
    """A unary request whose bytes do not parse as ``message`` ("a detseg.v1.SegmentRequest"): what
    ``ParseRequests``' deserializer hands on instead of raising."""

    message: str


class ParseRequests(grpc.aio.ServerInterceptor):
    """A unary request that does not parse as its message (a truncated varint, a string that is not UTF-8) is
    refused INVALID_ARGUMENT, as a stream message is (StreamSegment, Track): gRPC's own deserialization answered
    UNKNOWN naming protobuf's exception class, and logged a traceback at ERROR. Innermost, so that the access log,
    telemetry and authentication see the call as any other."""

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not handler.unary_unary or handler.request_deserializer is None:
            return handler
        deserialize, inner = handler.request_deserializer, handler.unary_unary
        descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
        full_name = getattr(descriptor, "full_name", "")
        message = f"a {full_name}" if full_name else "its message type"

        def parse(data: bytes) -> Any:
            try:
                return deserialize(data)
            except DecodeError:
                return Unparsable(message)

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Unparsable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse as {message}")
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=parse, response_serializer=handler.response_serializer
        )


class RpcTelemetry(grpc.aio.ServerInterceptor):
    """A span and a latency/error record per RPC (streams: over the whole stream); ``service.telemetry``'s
    instruments."""

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(UNTRACED):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        name = details.method.lstrip("/")

        @contextlib.contextmanager
        def traced(request: Any, context: grpc.aio.ServicerContext) -> Iterator[None]:
            # The caller's trace (W3C traceparent metadata) is the parent; no exception event: record_rpc sets the
            # status, and a traceback (server paths, the caller's text in messages) is not a span's to carry.
            parent = propagate.extract({k: v for k, v in details.invocation_metadata or () if isinstance(v, str)})
            with _tracer.start_as_current_span(
                name, context=parent, kind=trace.SpanKind.SERVER, record_exception=False, set_status_on_exception=False
            ) as span:
                start, code = time.perf_counter(), grpc.StatusCode.OK
                try:
                    yield
                except BaseException as e:
                    code = rpc_status(context, e)
                    raise
                finally:
                    record_rpc(span, method, code, time.perf_counter() - start)

        return observe_calls(handler, traced)


class AccessLog(grpc.aio.ServerInterceptor):
    """Writes one access record per RPC (every handler kind), whatever status it ends with."""

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(EXEMPT_PREFIXES):
            return handler
        method = details.method.lstrip("/")
        header_id = header_request_id(details.invocation_metadata)  # type: ignore[arg-type]

        @contextlib.contextmanager
        def logged(request: Any, context: grpc.aio.ServicerContext) -> Iterator[None]:
            # The peer is read while the call is live: gRPC's core frees what ``peer()`` reads when a stream's
            # connection drops, and a stream handler's ``finally`` may run after that (the server segfaulted when a
            # client vanished mid-Track; test_cli resets connections under live streams).
            start, error, peer = time.perf_counter(), None, context.peer()
            try:
                yield
            except BaseException as e:
                error = e
                raise
            finally:
                code = _status(context, error)
                fields = {
                    "method": method,
                    "status": code.name,
                    "duration_ms": round((time.perf_counter() - start) * 1000, 1),
                    "peer": peer,
                }
                request_id = CALL_REQUEST_ID.get() or _request_id(request, header_id)
                if request_id:
                    fields["request_id"] = request_id
                log.info("%s %s %.1f ms", method, code.name, fields["duration_ms"], extra=fields)

        return observe_calls(handler, logged)


def _status(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The code the RPC ended with: the abort's (CANCELLED, UNKNOWN) on an error, else one the handler set, or OK."""
    if error is not None:
        return rpc_status(context, error)
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK


def header_request_id(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The well-formed ``x-request-id`` metadata value, else ""."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and valid_request_id(value):
            return value
    return ""


def _request_id(request: Any, header_id: str) -> str:
    """The request message's well-formed ``request_id`` (unary requests that have one), else ``header_id``."""
    given = getattr(request, "request_id", "")
    return given if isinstance(given, str) and valid_request_id(given) else header_id
