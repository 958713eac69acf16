"""Domain errors → canonical gRPC status codes, in one place (AIP-193).

Every failure is logged with the request id as a structured field (``service.startup`` formats it; ids reaching
here were validated or generated). Unexpected exceptions are logged with their traceback server-side; the caller
sees INTERNAL with the request id only, never paths or internals.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import NamedTuple, TypeVar

import grpc

from service.errors import (
    DeadlineExceeded,
    DetsegError,
    InvalidInput,
    ModelUnavailable,
    NotFound,
    Overloaded,
    Unsupported,
)
from service.rich_status import bad_request

log = logging.getLogger(__name__)
T = TypeVar("T")

_CODES: tuple[tuple[type[DetsegError], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Unsupported, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelUnavailable, grpc.StatusCode.UNAVAILABLE),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def status_for(error: DetsegError) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


class Failure(NamedTuple):
    """How a failed call is answered: its status code, a caller-safe message and, for InvalidInput that names
    one, the offending field's path."""

    code: grpc.StatusCode
    message: str
    field: str | None = None


def status_details(failure: Failure) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata for a unary call's failure: the field it names as a ``google.rpc.BadRequest``
    (``service.rich_status``); none without a field."""
    return () if failure.field is None else (bad_request(failure.code.value[0], failure.message, failure.field),)


def describe(error: Exception, request_id: str) -> Failure:
    """The status code and caller-safe message for any failure; unexpected ones are logged with their traceback."""
    if isinstance(error, DetsegError):
        code = status_for(error)
        log.info("request %s: %s: %s", request_id, code.name, error, extra={"request_id": request_id})
        return Failure(code, str(error), error.field if isinstance(error, InvalidInput) else None)
    log.error("request %s failed", request_id, exc_info=error, extra={"request_id": request_id})
    return Failure(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")


async def guarded(context: grpc.aio.ServicerContext, request_id: str, work: Awaitable[T]) -> T:
    """Awaits ``work``; turns any failure into a clean status on ``context``."""
    try:
        return await work
    except Exception as e:
        failure = describe(e, request_id)
        await context.abort(failure.code, failure.message, status_details(failure))
    raise AssertionError("unreachable: context.abort raises")
