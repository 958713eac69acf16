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


def test_a_local_triton_that_fails_to_start_is_reported_by_this_runs_error_lines(tmp_path):
    from service.runners.triton_local import LocalTriton

    server = LocalTriton(tmp_path / "repo", tmp_path / "state", grpc_port=8101)
    server.state_dir.mkdir()
    earlier = "E1207 09:23:08.794848 1 model_lifecycle.cc:642] \"failed to load 'detector': an earlier run\"\n"
    server.log_path.write_text(earlier + "I1207 ... options table\n" * 30)
    server.log_start = server.log_path.stat().st_size  # as start() records before this run writes
    reason = "x" * 1000
    with server.log_path.open("a") as log:
        log.write("I1207 +----+ a table of options\n" * 30)
        log.write(f"E1207 09:25:12.943648 2 model_lifecycle.cc:642] \"failed to load 'detector': {reason}\"\n")
        log.write("error: creating server: Internal - failed to load all models\n")
    lines = server.log_errors().splitlines()
    assert len(lines) == 2 and "an earlier run" not in lines[0] and "failed to load 'detector'" in lines[0]
    assert len(lines[0]) == 404 and lines[0].endswith(" ...")  # cut to its first 400 characters
    assert lines[1] == "error: creating server: Internal - failed to load all models"
    with server.log_path.open("a") as log:
        server.log_start = log.tell()
        log.write("I1207 nothing went wrong yet\n")
    assert server.log_errors() == server.log_tail()  # no error line: the tail
