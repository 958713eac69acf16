"""gRPC's rich error model, both ways: a ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailing metadata
(what grpcio-status reads and writes), holding a ``google.rpc.BadRequest`` that names the offending field, so a
program need not parse the message (AIP-193). The server writes it (``service.api.errors``); the client reads it
(``service.client.RequestFailed.field``)."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


def bad_request(code: int, message: str, field: str) -> tuple[str, bytes]:
    """The trailing metadata entry for a failure with gRPC status ``code`` naming ``field`` (``classes[2]``)."""
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return STATUS_DETAILS_KEY, status_pb2.Status(code=code, message=message, details=[detail]).SerializeToString()


def violated_field(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The first field violation named in a call's trailing metadata, or None."""
    for key, value in trailing_metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                violations = error_details_pb2.BadRequest()
                if detail.Unpack(violations) and violations.field_violations:
                    return str(violations.field_violations[0].field)
    return None
