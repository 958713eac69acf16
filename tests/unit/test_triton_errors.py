"""Triton failures → detseg's domain errors (→ gRPC codes), on the exceptions tritonclient raises."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from service.api.errors import describe, status_for
from service.errors import DeadlineExceeded, ModelUnavailable, Overloaded
from service.runners.triton import _domain_error


@pytest.mark.parametrize(
    ("status", "message", "kind", "code"),
    [
        ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size", Overloaded, "RESOURCE_EXHAUSTED"),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", DeadlineExceeded, "DEADLINE_EXCEEDED"),
        ("StatusCode.UNAVAILABLE", "Request timeout expired", DeadlineExceeded, "DEADLINE_EXCEEDED"),
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses; last error: ECONNREFUSED", ModelUnavailable,
         "UNAVAILABLE"),
        ("StatusCode.UNAVAILABLE", "Request for unknown model: 'detector' is not found", ModelUnavailable,
         "UNAVAILABLE"),
    ],
)  # fmt: skip
def test_triton_errors_map_to_domain_errors(status, message, kind, code):
    error = _domain_error("detector", InferenceServerException(message, status=status))
    assert isinstance(error, kind)
    assert status_for(error).name == code
    assert "127.0.0.1" not in str(error) and "ECONNREFUSED" not in str(error)  # nothing internal leaks


def test_other_triton_failures_are_internal_errors_that_name_nothing_internal(caplog):
    error = _domain_error(
        "sam2_mask_decoder", InferenceServerException("onnxruntime: bad shape", status="StatusCode.INTERNAL")
    )
    code, message, _ = describe(error, "req-7")
    assert code.name == "INTERNAL" and message == "internal error (request id req-7)"
    assert "onnxruntime: bad shape" in caplog.text  # the detail stays in the server's log
