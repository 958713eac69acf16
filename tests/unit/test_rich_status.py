"""The offending field travels in the status details (google.rpc.BadRequest), written and read by one module."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from service.api.errors import describe, status_details
from service.errors import InvalidInput, NotFound
from service.rich_status import STATUS_DETAILS_KEY, violated_field


def test_an_invalid_input_that_names_its_field_carries_it_as_a_field_violation():
    failure = describe(InvalidInput("texts[1]: 'x' cannot be read", field="texts[1]"), "req-1")
    [(key, value)] = status_details(failure)
    assert key == STATUS_DETAILS_KEY == "grpc-status-details-bin"
    status = status_pb2.Status.FromString(value)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and status.message == failure.message
    violations = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(violations)
    assert [(v.field, v.description) for v in violations.field_violations] == [("texts[1]", failure.message)]
    assert violated_field([("x-other", "1"), (key, value)]) == "texts[1]"


def test_errors_without_a_field_carry_no_details():
    assert status_details(describe(InvalidInput("image.encoded: empty"), "req-2")) == ()
    assert status_details(describe(NotFound("image_handle: unknown"), "req-3")) == ()
    assert status_details(describe(RuntimeError("boom"), "req-4")) == ()
    assert violated_field(None) is None and violated_field([("x-other", "1")]) is None
