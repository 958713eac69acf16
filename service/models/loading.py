"""Safe loading of checkpoints into real architectures.

- Detectors: ultralytics checkpoints are pickles of the model object. We never unpickle them freely:
  ``torch.load(weights_only=True)`` runs with an allowlist of exactly the classes an ultralytics
  checkpoint may name (``torch.nn`` modules and ``ultralytics.nn`` modules); anything else is refused.
- Segmenters: SAM 2 checkpoints are state dicts; sam2's own ``build_sam2`` loads them with
  ``weights_only=True`` into the architecture its hydra config describes (official or our own overrides).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.serialization

from service.errors import ModelUnavailable, UnsafeCheckpoint
from service.models import open_vocabulary

log = logging.getLogger(__name__)

# Module prefixes whose nn.Module subclasses an ultralytics detector checkpoint may instantiate.
_ALLOWED_MODULE_PREFIXES = ("torch.nn.modules.", "ultralytics.nn.")
_ALLOWED_EXTRA = frozenset({"ultralytics.utils.IterableSimpleNamespace", "types.SimpleNamespace"})


def _resolve_allowed(name: str) -> Any | None:
    """Returns the object for an allowlisted global name, else None."""
    module, _, attr = name.rpartition(".")
    if name not in _ALLOWED_EXTRA and not name.startswith(_ALLOWED_MODULE_PREFIXES):
        return None
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None
    if name in _ALLOWED_EXTRA or (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        return obj
    return None


def safe_load_ultralytics(path: Path) -> dict[str, Any]:
    """Loads an ultralytics checkpoint dict without executing arbitrary pickled code.

    Raises:
        UnsafeCheckpoint: the file names a global outside the allowlist.
        ModelUnavailable: the file is not a readable checkpoint.
    """
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # torch raises many types for a non-checkpoint file
        raise ModelUnavailable(f"{path.name}: not a readable torch checkpoint ({type(e).__name__})") from None
    allowed: list[Any] = []
    refused: list[str] = []
    for name in names:
        obj = _resolve_allowed(name)
        if obj is None:
            refused.append(name)
        else:
            allowed.append(obj)
    if refused:
        raise UnsafeCheckpoint(
            f"{path.name}: refused, it would unpickle objects outside the allowlist: {', '.join(sorted(refused))}"
        )
    with torch.serialization.safe_globals(allowed):
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("ema") or ckpt.get("model"), torch.nn.Module):
        raise ModelUnavailable(f"{path.name}: not an ultralytics detector checkpoint")
    return ckpt


def head_output(out: Any) -> torch.Tensor:
    """The decoded (B, 4 + classes [+ extra], A) tensor of an ultralytics detector's forward: Detect heads return
    ``(y, raw)``, segmentation heads ``((y, proto), raw)``."""
    while isinstance(out, tuple | list):
        out = out[0]
    return out


@dataclasses.dataclass(frozen=True)
class LoadedDetector:
    module: torch.nn.Module  # ultralytics DetectionModel, YOLOE(Seg)Model or WorldModel; eval, float32, Conv+BN fused
    train_imgsz: int | None  # the square size it was trained at, if the checkpoint says
    text_model: str | None  # open-vocabulary: the text encoder its class embeddings come from; else None
    visual_prompts: bool  # YOLOE: example regions can become classes (SAVPE)

    def input_size(self, override: int = 0) -> int:
        """The square letterbox side to run at: ``override`` if set, else the training size, else 640."""
        return override or self.train_imgsz or 640


def load_detector_module(path: Path) -> LoadedDetector:
    """Loads an ultralytics detector checkpoint safely, ready to run as ultralytics predicts with it."""
    ckpt = safe_load_ultralytics(path)
    model = (ckpt.get("ema") or ckpt["model"]).float()
    kind = type(model).__name__
    if kind not in ("DetectionModel", *open_vocabulary.OPEN_VOCABULARY_KINDS):
        raise ModelUnavailable(f"{path.name}: a {kind}, expected a YOLO DetectionModel, YOLOE or YOLO-World model")
    is_open = open_vocabulary.is_open_vocabulary(model)
    if is_open and getattr(model.model[-1], "is_fused", False):
        raise ModelUnavailable(f"{path.name}: its class embeddings are fused into the head (a fixed vocabulary)")
    text_model = open_vocabulary.text_model_name(model) if is_open else None
    visual_prompts = open_vocabulary.takes_visual_prompts(model)
    model = model.fuse(verbose=False) if hasattr(model, "fuse") else model
    imgsz = (ckpt.get("train_args") or {}).get("imgsz")
    train_imgsz = imgsz if isinstance(imgsz, int) else None
    return LoadedDetector(model.eval().requires_grad_(False), train_imgsz, text_model, visual_prompts)


def load_segmenter_module(config: str, path: Path, overrides: tuple[str, ...] = (), device: str = "cpu") -> Any:
    """Builds SAM 2 from a sam2 package config (+ hydra overrides) and loads the state dict safely."""
    from sam2.build_sam import build_sam2  # imported late: sam2 initialises hydra on import

    try:
        model = build_sam2(config, str(path), device=device, mode="eval", hydra_overrides_extra=list(overrides))
    except RuntimeError as e:
        raise ModelUnavailable(f"{path.name}: does not match the {config} architecture ({e})") from None
    return model.requires_grad_(False)
