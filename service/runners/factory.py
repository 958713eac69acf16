"""Builds the runner the settings ask for (embedded torch for now)."""

from __future__ import annotations

from service.config import Settings
from service.models.profiles import resolve_models
from service.runners.base import Runner


def load_runner(settings: Settings) -> tuple[Runner, str]:
    """Resolves and verifies (downloading if allowed) the weights, loads them; returns (runner, profile)."""
    from service.runners.torch import TorchRunner  # torch import only when a runner is wanted

    models = resolve_models(settings)
    return TorchRunner.load(models, settings), models.profile
