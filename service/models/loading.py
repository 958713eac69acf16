"""Safe loading of checkpoints into real architectures.

- Detectors: ultralytics checkpoints are pickles of the model object. We never unpickle them freely:
  ``torch.load(weights_only=True)`` runs with an allowlist of exactly the classes an ultralytics
  checkpoint may name (``torch.nn`` modules, ``ultralytics.nn.modules`` layers and ``ultralytics.nn.tasks``
  models); anything else is refused. A pickle may only *rebuild* such a class (``NEWOBJ``: ``cls.__new__``,
  then its state), never *call* it (``REDUCE``): ``weights_only`` would run the constructor with the pickle's
  arguments, and constructors read files or download (ultralytics' ``TorchVision`` layer fetches weights;
  ``AutoBackend`` unpickles another file freely). ``_called_classes`` reads the pickle's opcodes first.
- Segmenters: SAM 2 checkpoints are state dicts; sam2's own ``build_sam2`` loads them with
  ``weights_only=True`` into the architecture its hydra config describes (official or our own overrides).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.serialization

from service.errors import ModelUnavailable, UnsafeCheckpoint
from service.models import open_vocabulary

log = logging.getLogger(__name__)

# Modules whose nn.Module subclasses (defined there, not imported) an ultralytics detector checkpoint may rebuild.
_ALLOWED_MODULE_PREFIXES = ("torch.nn.modules.", "ultralytics.nn.modules.", "ultralytics.nn.tasks")
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
    if name in _ALLOWED_EXTRA:
        return obj
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and f"{obj.__module__}.{obj.__qualname__}" == name:
        return obj
    return None


_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def _called_classes(path: Path, classes: set[str]) -> set[str]:
    """The names in ``classes`` that the checkpoint's pickle calls (``REDUCE``) rather than rebuilds.

    Follows the unpickler's stack through the opcodes, tracking only which entries are global names
    (``GLOBAL``, ``STACK_GLOBAL`` of pushed strings) and string constants; memo gets return what was put.
    """
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[Any, Any] = {}
    called: set[str] = set()
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name == "MARK":
            marks.append(len(stack))
            continue
        if name in _PUT_OPS:
            memo[arg] = stack[-1]
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
            continue
        if name in _GET_OPS:
            stack.append(memo.get(arg))
            continue
        if name == "DUP":
            stack.append(stack[-1])
            continue
        if name == "REDUCE" and isinstance(stack[-2], _Global) and stack[-2].name in classes:
            called.add(stack[-2].name)
        if name == "GLOBAL":
            pushed: Any = _Global(str(arg).replace(" ", "."))
        elif name == "STACK_GLOBAL":
            pushed = _Global(f"{stack[-2]}.{stack[-1]}")
        elif isinstance(arg, str) and op.stack_after == [pickletools.pyunicode]:
            pushed = arg
        else:
            pushed = None
        for before in reversed(op.stack_before):
            if before is pickletools.stackslice:
                continue
            if before is pickletools.markobject:
                del stack[marks.pop() :]
            else:
                stack.pop()
        stack.extend(pushed for _ in op.stack_after)
    return called


@dataclasses.dataclass(frozen=True)
class _Global:
    name: str


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
    try:
        called = _called_classes(path, set(names))
    except Exception as e:  # a pickle the scan cannot follow is not loaded
        raise UnsafeCheckpoint(f"{path.name}: refused, its pickle could not be read ({type(e).__name__})") from None
    if called:
        raise UnsafeCheckpoint(
            f"{path.name}: refused, it would call (not rebuild) these classes: {', '.join(sorted(called))}"
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
