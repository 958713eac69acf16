"""The one domain error hierarchy of detseg.

Every layer raises these; ``service.api.errors`` maps them to gRPC status codes in one place.
Messages are written for the caller: brief, actionable, and free of paths, tracebacks and internals.
"""

from __future__ import annotations

import re


class DetsegError(Exception):
    """Base class of every error detseg reports to a caller."""


class InvalidInput(DetsegError):
    """The request is malformed or exceeds a limit (→ INVALID_ARGUMENT).

    The message names the offending field first (``regions[0].box: ...``) and, where one applies, the limit.
    ``field`` is that field's path for programs (``classes[2]``), read from the message's start where not given: a
    unary call's status carries it as a ``google.rpc.BadRequest`` field violation (``service.api.errors``); without
    it, a client could not tell which class was refused (it was given for one message of fifty).
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        named = _FIELD_FIRST.match(message) if field is None else None
        self.field = named.group(1) if named is not None else field


# A message's leading field path and ": " (``frame.prompts[2].region.box: ...``).
_FIELD_FIRST = re.compile(r"([a-z_][a-z0-9_]*(?:\[\d+\])*(?:\.[a-z_][a-z0-9_]*(?:\[\d+\])*)*): ")


class InvalidImage(InvalidInput):
    """The image cannot be accepted: unknown format, corrupt, or too large."""


class Unsupported(DetsegError):
    """The request asks for something the loaded models cannot do, e.g. a prompt kind (→ FAILED_PRECONDITION).

    The message names what was asked and what to load instead.
    """


class NotFound(DetsegError):
    """A referenced resource (e.g. an image handle) does not exist or expired (→ NOT_FOUND)."""


class ModelUnavailable(DetsegError):
    """A model cannot be loaded or reached (→ UNAVAILABLE at serve time, a clear stop at start-up)."""


class WeightsNotFound(ModelUnavailable):
    """Official weights are absent from the cache and cannot be downloaded.

    ``files``: their file names; ``reasons``: why each could not be fetched (e.g. "download failed: HTTP 404").
    """

    def __init__(
        self, message: str, files: tuple[str, ...] | list[str] = (), reasons: tuple[str, ...] | list[str] = ()
    ) -> None:
        super().__init__(message)
        self.files = tuple(files)
        self.reasons = tuple(reasons)


class ChecksumMismatch(ModelUnavailable):
    """A downloaded or cached weights file does not match the catalog's sha256."""


class UnsafeCheckpoint(ModelUnavailable):
    """A checkpoint would need arbitrary code/objects to unpickle and is refused."""


class ConfigurationError(DetsegError):
    """The server's settings cannot be used, e.g. an unreadable signing key (a clear stop at start-up)."""


class Overloaded(DetsegError):
    """The service is at capacity (→ RESOURCE_EXHAUSTED)."""


class DeadlineExceeded(DetsegError):
    """The work did not finish before the caller's deadline (→ DEADLINE_EXCEEDED)."""
