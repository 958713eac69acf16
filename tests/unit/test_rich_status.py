"""The offending field travels in the status details (google.rpc.BadRequest), written and read by one module."""

from __future__ import annotations

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2

from service.api.errors import describe, status_details
from service.client import RequestFailed
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
    assert status_details(describe(InvalidInput("classes, texts: give one or the other"), "req-2")) == ()
    assert status_details(describe(NotFound("image_handle: unknown"), "req-3")) == ()
    assert status_details(describe(RuntimeError("boom"), "req-4")) == ()
    assert violated_field(None) is None and violated_field([("x-other", "1")]) is None


def test_an_invalid_input_names_the_field_its_message_starts_with():
    """Every INVALID_ARGUMENT message starts with its field, but the field was given for programs in one case of
    fifty: a client (`detseg label`, `detseg eval`) could not tell that `classes[1]` was the unknown class."""
    for message, field in (("classes[1]: unknown class 'cirlce'", "classes[1]"),
                           ("frame.prompts[2].region.box: corners reversed", "frame.prompts[2].region.box"),
                           ("image.encoded: empty", "image.encoded"), ("The image cannot be read", None),
                           ("classes, texts: give one or the other", None)):  # fmt: skip
        assert InvalidInput(message).field == field, message
        (key, value), *_ = status_details(describe(InvalidInput(message), "req-6")) or [(None, None)]
        assert violated_field([(key, value)] if key else None) == field
    assert InvalidInput("regions[0]: bad", field="regions[0].box").field == "regions[0].box"  # given wins


def test_both_clients_read_the_field_from_a_failed_call():
    """The sync stub's error is a grpc.Call; the asyncio one (AsyncClient) is an AioRpcError, which is not."""
    failure = describe(InvalidInput("classes[2]: 'x' cannot be read", field="classes[2]"), "req-5")
    trailing = grpc.aio.Metadata(*status_details(failure))
    error = grpc.aio.AioRpcError(failure.code, grpc.aio.Metadata(), trailing, failure.message)
    failed = RequestFailed.from_rpc(error)
    assert (failed.code, failed.message, failed.field) == (failure.code, failure.message, "classes[2]")
    plain = grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
    assert RequestFailed.from_rpc(plain).field is None
