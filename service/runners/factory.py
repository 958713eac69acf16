"""Builds the runner the settings ask for: embedded torch (default) or a Triton Inference Server."""

from __future__ import annotations

from service.config import Settings
from service.errors import InvalidInput
from service.runners.base import Runner

BACKENDS = ("torch", "triton")


def load_runner(settings: Settings) -> Runner:
    """The runner for ``settings.backend`` (call ``await runner.start()`` before use).

    torch: resolves and verifies (downloading if allowed) the weights and loads them here. triton: nothing
    is loaded locally; ``start`` connects to ``settings.triton_url`` and reads the models' metadata there.
    """
    if settings.backend == "torch":
        from service.models.profiles import resolve_models
        from service.runners.torch import TorchRunner  # torch import only when a runner is wanted

        return TorchRunner.load(resolve_models(settings), settings)
    if settings.backend == "triton":
        from service.runners.triton import TritonRunner

        return TritonRunner(settings)
    raise InvalidInput(f"backend must be one of {', '.join(BACKENDS)}, got {settings.backend!r}")
