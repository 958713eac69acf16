"""SAM 3 (Meta's Segment Anything 3) for concept prompts: texts in, boxes + masks per text out, in one model.

The architecture is ultralytics' ``build_sam3_image_model`` (``SAM3SemanticModel``: a ViT-L image encoder, a
CLIP-style text encoder, a DETR-style grounding decoder and a mask head; 848 M parameters). detseg calls its
pieces directly instead of ultralytics' ``SAM3SemanticPredictor``, because the predictor writes per-call state
onto the model (``set_classes`` stores the texts on it, ``set_image`` rewrites the ViT's position encodings):
shared by concurrent requests, that is a race. ``Sam3Concepts`` passes the texts with each call and sets the
input size once, at load; tests check it against the predictor on the same weights.

- Weights: the official ``sam3.pt`` (catalog ``sam3``, sha256-checked; gated on Hugging Face, so it must be
  put into the cache folder by hand) is loaded with ``torch.load(weights_only=True)`` — never ultralytics'
  own loader, which unpickles freely.
- Tokenizer: the model's text encoder calls CLIP's BPE tokenizer as ultralytics' CLIP fork defines it
  (``tokenizer(texts, context_length)``): ``service.models.clip_text.clip_tokenizer``.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import threading
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from service.errors import ModelUnavailable
from service.models.clip_text import clip_tokenizer

ARCHITECTURE = "sam3 (ultralytics build_sam3_image_model)"
PATCH = 14  # the ViT's patch side: input sides are multiples of it (Settings.concept_imgsz, 1008 as trained)
_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def _clip_module(tokenizer: Any) -> Iterator[None]:
    """While ultralytics' builder runs: ``import clip; clip.simple_tokenizer.SimpleTokenizer()`` gives
    ``tokenizer`` (the builder would otherwise pip-install ultralytics' CLIP fork from GitHub)."""
    previous = sys.modules.get("clip")
    fake = types.ModuleType("clip")
    fake.simple_tokenizer = types.SimpleNamespace(SimpleTokenizer=lambda: tokenizer)  # type: ignore[attr-defined]
    sys.modules["clip"] = fake
    try:
        yield
    finally:
        if previous is None:
            sys.modules.pop("clip", None)
        else:
            sys.modules["clip"] = previous


def build(image_size: int, state_dict: dict[str, torch.Tensor] | None = None, seed: int = 0) -> Any:
    """SAM3SemanticModel (eval, fp32, no grad) set up once for ``image_size`` (a multiple of 14).

    ``state_dict``: weights under SAM 3's checkpoint names (``load_checkpoint``); None = seeded random init
    (``seed``), for tests: two tensors ultralytics leaves uninitialised (``torch.empty``) get seeded values too.
    """
    if image_size % PATCH:
        raise ModelUnavailable(f"concept_imgsz must be a multiple of {PATCH} (SAM 3's patch size), got {image_size}")
    from ultralytics.models.sam.build_sam3 import build_sam3_image_model

    tokenizer = clip_tokenizer()
    with _BUILD_LOCK, tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pt"
        torch.save({}, empty)  # the builder loads a checkpoint file; an empty one keeps every initial value
        torch.manual_seed(seed)
        with _clip_module(tokenizer):
            model = build_sam3_image_model(str(empty))
    encoder = model.backbone.language_backbone.encoder
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # open_clip's initialisation of the two tensors ultralytics creates with torch.empty
        encoder.positional_embedding.copy_(torch.randn(encoder.positional_embedding.shape, generator=generator) * 0.01)
        encoder.text_projection.copy_(
            torch.randn(encoder.text_projection.shape, generator=generator) * encoder.width**-0.5
        )
    if state_dict is not None:
        result = model.load_state_dict(state_dict, strict=False)
        if len(result.missing_keys) > 0.01 * len(model.state_dict()):
            raise ModelUnavailable(
                f"the SAM 3 checkpoint does not fit the architecture ({len(result.missing_keys)} tensors missing)"
            )
    model.set_imgsz([image_size, image_size])  # once, here: it rewrites the ViT's position encodings
    return model.eval().requires_grad_(False)


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The image model's tensors of an official SAM 3 (or 3.1) checkpoint, loaded with ``weights_only=True`` and
    renamed as ultralytics' ``_load_checkpoint`` renames them (its ``detector.`` part)."""
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a pickle naming anything but tensors and containers, or not a checkpoint
        raise ModelUnavailable(f"{path.name}: not a loadable SAM 3 state dict ({type(e).__name__})") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict):
        raise ModelUnavailable(f"{path.name}: not a SAM 3 state dict")
    out = {}
    for key, value in ckpt.items():
        key = key.replace("tracker.model.interactive_", "tracker.").replace("tracker.model.interactivity_", "tracker.")
        key = key.replace("interactive_convs", "sam2_convs")
        if "detector" in key:
            out[key.replace("detector.", "")] = value
    if not out:
        raise ModelUnavailable(f"{path.name}: holds no SAM 3 detector tensors")
    return out


class Sam3Concepts:
    """Texts → SAM 3's grounding outputs on a shared, read-only model (nothing is written on it per call)."""

    def __init__(self, model: Any, image_size: int) -> None:
        if getattr(model, "text_embeddings", None):
            raise ValueError("this SAM 3 model has classes set on it (set_classes); they would override the texts")
        self.model = model
        self.image_size = image_size
        self.mask_threshold = float(model.mask_threshold)  # mask logit above which a pixel is in

    @torch.inference_mode()
    def ground(
        self, images: torch.Tensor, texts: Sequence[str], exemplars: Sequence[torch.Tensor] = ()
    ) -> dict[str, torch.Tensor]:
        """images: (1, 3, S, S) float32 RGB in [-1, 1], stretched to S x S (no padding); ``exemplars``: one (K, 4)
        float32 tensor per exemplar class, its example boxes as normalised cxcywh (fractions of the image).

        Returns, for the T texts then the E exemplar classes, Q = 200 queries each: pred_boxes (T + E, Q, 4)
        normalised cxcywh, pred_logits (T + E, Q, 1), presence_logit_dec (T + E, 1), pred_masks (T + E, Q, 4S/14,
        4S/14) mask logits. The image is encoded once; the texts go in one pass (one batch item each), each
        exemplar class in its own (as ultralytics' predictor runs boxes: with the text "visual")."""
        from ultralytics.models.sam.sam3.geometry_encoders import Prompt

        features = self.model.backbone.forward_image(images)
        passes: list[tuple[list[str], Any]] = []
        if texts:
            passes.append((list(texts), None))
        for boxes in exemplars:
            prompt = Prompt(
                box_embeddings=torch.zeros(0, 1, 4, device=boxes.device),
                box_mask=torch.zeros(1, 0, device=boxes.device, dtype=torch.bool),
            )
            for box in boxes:
                prompt.append_boxes(box.view(1, 1, 4), torch.ones(1, 1, dtype=torch.int32, device=boxes.device))
            passes.append((["visual"], prompt))
        outputs = []
        for prompt_texts, geometric in passes:
            text = self.model.backbone.forward_text(prompt_texts)
            outputs.append(
                self.model.forward_grounding(
                    backbone_out={**features, **text},  # a fresh dict: forward_grounding may add to it
                    text_ids=torch.arange(len(prompt_texts), dtype=torch.long),
                    geometric_prompt=geometric,
                )
            )
        keys = ("pred_boxes", "pred_logits", "presence_logit_dec", "pred_masks")
        return {k: torch.cat([o[k] for o in outputs]) for k in keys}
