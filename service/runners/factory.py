"""Builds the runner the settings ask for: in-process OpenVINO (the CPU default), torch (the GPU default) or ONNX
Runtime, or a Triton server."""

from __future__ import annotations

import importlib.util

from service.config import Settings
from service.errors import Unsupported
from service.runners.base import Runner


def resolve_backend(settings: Settings) -> str:
    """``settings.backend``, with "auto" made concrete: the fastest in-process runtime for the device. On the CPU
    that is openvino (its int8 encoder passed the quality gate; benchmarks/RESULTS.md), when the package is
    installed and no concept model (SAM 3 runs on torch) is asked for; on a GPU, torch."""
    if settings.backend != "auto":
        return settings.backend
    cpu = settings.device == "cpu"
    if cpu and not settings.concept_model and importlib.util.find_spec("openvino") is not None:
        return "openvino"
    return "torch"


def load_runner(settings: Settings) -> Runner:
    """The runner for ``settings.backend`` (``resolve_backend``; call ``await runner.start()`` before use).

    torch: resolves and verifies (downloading if allowed) the weights and loads them here. onnx: the same,
    then exports them once to ONNX (cached) and runs them with ONNX Runtime. openvino: the same export, each graph on
    its fastest CPU runtime (OpenVINO or ONNX Runtime), SAM's image encoder optionally int8. triton: nothing
    is loaded locally; ``start`` connects to ``settings.triton_url`` and reads the models' metadata there.
    """
    settings = settings.replace(backend=resolve_backend(settings))
    if settings.concept_model and settings.backend != "torch":
        raise Unsupported(f"concept_model: SAM 3 runs with the torch backend only, not {settings.backend}")
    if settings.precision == "int8" and settings.backend != "openvino":
        raise Unsupported(f"precision int8 (SAM's image encoder) needs backend openvino, not {settings.backend}")
    if settings.backend == "torch":
        from service.models.profiles import resolve_models
        from service.runners.torch import TorchRunner  # torch import only when a runner is wanted

        return TorchRunner.load(resolve_models(settings), settings)
    if settings.backend == "onnx":
        from service.models.profiles import resolve_models
        from service.runners.onnx import OnnxRunner

        return OnnxRunner.load(resolve_models(settings), settings)
    if settings.backend == "openvino":
        from service.models.profiles import resolve_models
        from service.runners.openvino import OpenVinoRunner

        return OpenVinoRunner.load(resolve_models(settings), settings)
    from service.runners.triton import TritonRunner  # the last of Settings' BACKENDS ("auto" is resolved above)

    return TritonRunner(settings)
