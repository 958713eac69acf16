"""Builds the runner the settings ask for: in-process torch (default) or ONNX Runtime, or a Triton server."""

from __future__ import annotations

from service.config import Settings
from service.errors import InvalidInput, Unsupported
from service.runners.base import Runner

BACKENDS = ("torch", "onnx", "triton")


def load_runner(settings: Settings) -> Runner:
    """The runner for ``settings.backend`` (call ``await runner.start()`` before use).

    torch: resolves and verifies (downloading if allowed) the weights and loads them here. onnx: the same,
    then exports them once to ONNX (cached) and runs them with ONNX Runtime. triton: nothing
    is loaded locally; ``start`` connects to ``settings.triton_url`` and reads the models' metadata there.
    """
    if settings.concept_model and settings.backend != "torch":
        raise Unsupported(f"concept_model: SAM 3 runs with the torch backend only, not {settings.backend}")
    if settings.backend == "torch":
        from service.models.profiles import resolve_models
        from service.runners.torch import TorchRunner  # torch import only when a runner is wanted

        return TorchRunner.load(resolve_models(settings), settings)
    if settings.backend == "onnx":
        from service.models.profiles import resolve_models
        from service.runners.onnx import OnnxRunner

        return OnnxRunner.load(resolve_models(settings), settings)
    if settings.backend == "triton":
        from service.runners.triton import TritonRunner

        return TritonRunner(settings)
    raise InvalidInput(f"backend must be one of {', '.join(BACKENDS)}, got {settings.backend!r}")
