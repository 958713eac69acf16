"""Triton failures → detseg's domain errors (→ gRPC codes), on the exceptions tritonclient raises."""

from __future__ import annotations

import numpy as np
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
        # a python-backend model whose process died (Triton restarts it): was INTERNAL, which clients do not retry
        ("StatusCode.INTERNAL", "Failed to process the request(s) for model instance 'detector_0_0', message: Stub "
         "process 'detector_0_0' is not healthy.", ModelUnavailable, "UNAVAILABLE"),
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


class _Triton:
    """What ``TritonRunner.ready`` asks of tritonclient's aio client, answering from ``configs`` (role: params)."""

    def __init__(self, configs: dict[str, dict[str, str]]) -> None:
        self.configs = configs

    async def is_server_ready(self, client_timeout: float) -> bool:
        return True

    async def is_model_ready(self, role: str, client_timeout: float) -> bool:
        return role in self.configs

    async def get_model_config(self, role: str, as_json: bool, client_timeout: float) -> dict:
        params = {k: {"string_value": v} for k, v in self.configs[role].items()}
        return {"config": {"parameters": params}}


async def test_a_triton_restarted_with_other_models_is_not_ready_for_this_server(caplog):
    """Names, input sizes and the models' identity (provenance, cache keys) are read once, at start: a Triton that came
    back with other models was served under the first ones' names and sha256 (health SERVING again)."""
    from service.config import Settings
    from service.models.roles import MODEL_ROLES
    from service.runners.triton import TritonRunner

    loaded = {role: {"detseg_input_size": "320", "detseg_sha256": "a" * 64} for role in MODEL_ROLES}
    runner = TritonRunner(Settings(text_encoder="none"))
    runner._client, runner._params = _Triton(loaded), loaded
    assert await runner.ready()
    replaced = {role: {**params, "detseg_sha256": "b" * 64} for role, params in loaded.items()}
    runner._client = _Triton(replaced)
    assert not await runner.ready() and not await runner.ready()
    assert caplog.text.count("Triton now serves other models") == 1
    with pytest.raises(ModelUnavailable, match="now serves other models"):  # not only health: no answer from them
        await runner.encode(np.zeros((1, 3, 320, 320), np.float32))
    runner._client = _Triton(loaded)  # the same models again
    assert await runner.ready()


def test_a_local_triton_refuses_to_start_on_a_port_another_program_listens_on(tmp_path):
    """Another Triton on the port answered ``wait_ready`` for this one (`triton up` said ready, saved a pid that
    then died, and `status`/`down` knew no Triton)."""
    import socket

    from service.errors import ConfigurationError
    from service.runners.triton_local import LocalTriton

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        server = LocalTriton(tmp_path / "repo", tmp_path / "state", grpc_port=port)
        with pytest.raises(ConfigurationError, match=f"Triton's gRPC port {port} is in use on 127.0.0.1"):
            server.start()
    assert server.process is None and not server.state_dir.exists()
