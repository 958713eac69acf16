"""Open-vocabulary detectors (YOLOE, YOLO-World) run with their class embeddings as an INPUT.

ultralytics keeps an open-vocabulary model's classes on the module (``set_classes``, and the head's ``nc``,
which even ``YOLOEModel.predict`` rewrites on every call): shared by concurrent requests, that is a race. These
functions compute the same outputs from ultralytics' own layers with the class embeddings passed in and the
class count read from their shape, so nothing is written to the module per call, and the same code traces to
an ONNX graph whose class count is dynamic (``service.models.export``). The torch runner and the export both
use them; tests check them against ultralytics' own ``predict`` on the same weights.

Class embeddings are what the detector's head compares image features with: (B, C, D) float32, D the
model's embedding width (512), from ``class_embeddings_from_text`` (texts) or ``visual_prompt_embeddings``
(example regions, YOLOE only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# ultralytics model classes whose classes come with each call (segmentation variants: boxes and classes only).
YOLOE_KINDS = ("YOLOEModel", "YOLOESegModel")
WORLD_KINDS = ("WorldModel",)
OPEN_VOCABULARY_KINDS = YOLOE_KINDS + WORLD_KINDS
# The text encoder a YOLO-World checkpoint was trained with when it does not name one (ultralytics' default).
WORLD_TEXT_MODEL = "clip:ViT-B/32"


def is_open_vocabulary(model: torch.nn.Module) -> bool:
    return type(model).__name__ in OPEN_VOCABULARY_KINDS


def takes_visual_prompts(model: Any) -> bool:
    """Whether example regions can become classes (YOLOE's SAVPE); YOLO-World takes texts only."""
    return type(model).__name__ in YOLOE_KINDS and getattr(model.model[-1], "savpe", None) is not None


def text_model_name(model: torch.nn.Module) -> str:
    """The text encoder the checkpoint's class embeddings come from (e.g. "mobileclip:blt", "minilm-512:seed0")."""
    return str(getattr(model, "text_model", "") or WORLD_TEXT_MODEL)


def class_embeddings_from_text(model: Any, features: torch.Tensor) -> torch.Tensor:
    """(B, C, D) text-encoder features → (B, C, D) class embeddings: YOLOE's text head (``get_tpe``: RepRTA +
    L2 norm), or for YOLO-World the L2 norm its CLIP ``encode_text`` applies."""
    if type(model).__name__ in WORLD_KINDS:
        return F.normalize(features, dim=-1, p=2)
    return model.model[-1].get_tpe(features)


def _head_inputs(model: Any, images: torch.Tensor, text: torch.Tensor | None) -> list[torch.Tensor]:
    """The feature maps the last layer (the head) takes, routed as ultralytics' ``predict`` routes them.
    ``text``: (B, C, D) class embeddings for YOLO-World's text-attending neck (C2fAttn, ImagePoolingAttn)."""
    from ultralytics.nn.modules import C2fAttn, ImagePoolingAttn

    y: list[Any] = []
    x: Any = images
    for m in model.model[:-1]:
        if m.f != -1:
            x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
        if isinstance(m, C2fAttn):
            x = m(x, text)
        elif isinstance(m, ImagePoolingAttn):
            text = m(x, text)  # updates the neck's text features; the head gets the original ones
        else:
            x = m(x)
        y.append(x if m.i in model.save else None)
    return [x if j == -1 else y[j] for j in model.model[-1].f]


def detect(model: Any, images: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """images (B, 3, S, S) float32 letterboxed RGB in [0, 1], class_embeddings (B or 1, C, D) →
    (B, 4 + C, A) float32: boxes XYWH in letterboxed pixels, then per-class scores (the one-to-many branch)."""
    from ultralytics.nn.modules.head import Detect

    bs = images.shape[0]
    classes = class_embeddings.type_as(images).expand(bs, -1, -1)
    feats = _head_inputs(model, images, classes)
    head: Any = model.model[-1]
    boxes = torch.cat([head.cv2[i](feats[i]).view(bs, 4 * head.reg_max, -1) for i in range(head.nl)], dim=-1)
    scores = torch.cat([head.cv4[i](head.cv3[i](feats[i]), classes).flatten(2) for i in range(head.nl)], dim=-1)
    preds: dict[str, Any] = {"boxes": boxes, "scores": scores, "feats": feats}
    # Detect's decoding; a segmentation head's own would append mask coefficients, which detseg does not use.
    return Detect._inference(head, preds)


def visual_prompt_embeddings(model: Any, images: torch.Tensor, visuals: torch.Tensor) -> torch.Tensor:
    """YOLOE's SAVPE: images (B, 3, S, S) + region masks (B, K, S/8, S/8) float32 → (B, K, D) class embeddings."""
    return model.model[-1].savpe(_head_inputs(model, images, None), visuals)
