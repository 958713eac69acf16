"""The exported graphs' contract: tensor names per role, and the ``detseg_*`` parameters of their configs.

``detseg export`` writes the graphs and, into each role's config, the parameters a front end needs to serve
them without weights (class names, input sizes, model identity); the ONNX and Triton runners read them back
here. Writer, reader and tensor names live together so they cannot drift.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import numpy as np

from service.models.roles import ModelDescriptor, ModelRole, Role, graph_roles


@dataclasses.dataclass(frozen=True)
class GraphIO:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


IO: dict[Role, GraphIO] = {
    # images (B, 3, S, S) float32 letterboxed RGB in [0, 1] → output0 (B, 4 + nc, A), the raw head. An
    # open-vocabulary detector takes OPEN_DETECTOR_IO instead.
    Role.DETECTOR: GraphIO(("images",), ("output0",)),
    # images (B, 3, S, S) float32 SAM-normalised → image_embed, high_res_0, high_res_1 (ImageFeatures).
    Role.SAM2_IMAGE_ENCODER: GraphIO(("images",), ("image_embed", "high_res_0", "high_res_1")),
    # one image's features (batch 1) + B prompts of P points → masks and IoU predictions (see sam_ops.decode).
    Role.SAM2_MASK_DECODER: GraphIO(
        ("image_embed", "high_res_0", "high_res_1", "point_coords", "point_labels", "mask_input", "has_mask_input"),
        ("single_masks", "single_iou", "multi_masks", "multi_iou"),
    ),
    # N texts as MiniLM token ids (N, L) int64 + attention mask (N, L) int64 → (N, D) float32 class embeddings.
    Role.TEXT_ENCODER: GraphIO(("input_ids", "attention_mask"), ("text_embeddings",)),
    # images as the detector takes them + (B, K, S/8, S/8) float32 region masks → (B, K, D) class embeddings.
    Role.VISUAL_PROMPT_ENCODER: GraphIO(("images", "visuals"), ("visual_embeddings",)),
}
# An open-vocabulary detector: images + (B, C, D) float32 class embeddings → output0 (B, 4 + C, A); C is dynamic.
OPEN_DETECTOR_IO = GraphIO(("images", "class_embeddings"), ("output0",))


def detector_io(open_vocabulary: bool) -> GraphIO:
    return OPEN_DETECTOR_IO if open_vocabulary else IO[Role.DETECTOR]


def decoder_outputs(multimask: bool) -> tuple[str, str]:
    """The decoder's (masks, iou) output names for one or three candidates per prompt."""
    return ("multi_masks", "multi_iou") if multimask else ("single_masks", "single_iou")


def decoder_feeds(
    image_embed: np.ndarray,
    high_res: tuple[np.ndarray, ...],
    point_coords: np.ndarray,
    point_labels: np.ndarray,
    image_size: int,
    mask_input: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The decoder graph's inputs for B prompts on one image.

    image_embed (1, 256, S/16, S/16), high_res ((1, 32, S/4, S/4), (1, 64, S/8, S/8)) float32; point_coords
    (B, P, 2) float32 in SAM input pixels; point_labels (B, P) int32; image_size: S; mask_input: (B, 1, S/4, S/4)
    float32 low-res logits of the masks the prompts correct, or None for none.
    """
    b, side = len(point_coords), image_size // 4
    hr0, hr1 = high_res
    has_mask = mask_input is not None
    return {
        "image_embed": image_embed,
        "high_res_0": hr0,
        "high_res_1": hr1,
        "point_coords": point_coords,
        "point_labels": point_labels,
        "mask_input": mask_input if mask_input is not None else np.zeros((b, 1, side, side), np.float32),
        "has_mask_input": np.full((b,), float(has_mask), np.float32),
    }


@dataclasses.dataclass(frozen=True)
class WeightsIdentity:
    """Which weights a graph came from (ModelDescriptor's identity fields)."""

    name: str
    architecture: str
    version: str
    sha256: str


@dataclasses.dataclass(frozen=True)
class ServedGraphs:
    """What the parameters of an exported repository say about its models.

    names: detector vocabulary (index = class id; an open-vocabulary detector's calibration classes); imgsz:
    detector letterbox side (px); stride: detector stride; image_size: SAM input side (px); class_dim: the width
    of an open-vocabulary detector's class embeddings (0: closed); tokenizer_sha256: the sentence encoder whose
    tokenizer the text-encoder graph expects (its weights' sha256; "" without one).
    """

    names: tuple[str, ...]
    imgsz: int
    stride: int
    image_size: int
    models: tuple[ModelDescriptor, ...]
    profile: str
    class_dim: int = 0
    visual_prompts: bool = False  # example regions become classes (the visual_prompt_encoder graph exists)
    tokenizer_sha256: str = ""

    @property
    def roles(self) -> tuple[Role, ...]:
        return graph_roles(self.class_dim > 0, self.visual_prompts)


@dataclasses.dataclass(frozen=True)
class OpenVocabulary:
    """What an open-vocabulary detector's graphs record: class_dim, the class-text encoder's name (a
    checkpoint's ``text_model``, e.g. "minilm-512:seed0") and the sentence encoder whose tokenizer feeds it."""

    class_dim: int
    text_model: str
    tokenizer: WeightsIdentity
    max_tokens: int
    visual_prompts: bool  # YOLOE: a visual_prompt_encoder graph too


def write_parameters(
    detector: WeightsIdentity,
    segmenter: WeightsIdentity,
    profile: str,
    names: tuple[str, ...],
    imgsz: int,
    stride: int,
    image_size: int,
    open_vocabulary: OpenVocabulary | None = None,
) -> dict[Role, dict[str, str]]:
    """The ``detseg_*`` parameters of every role's config (the open-vocabulary roles' too, when given)."""

    def ident(w: WeightsIdentity) -> dict[str, str]:
        return {
            "detseg_model": w.name,
            "detseg_architecture": w.architecture,
            "detseg_version": w.version,
            "detseg_sha256": w.sha256,
            "detseg_profile": profile,
        }

    params = {
        Role.DETECTOR: {
            **ident(detector),
            "detseg_names": json.dumps(list(names)),
            "detseg_input_size": str(imgsz),
            "detseg_stride": str(stride),
        },
        Role.SAM2_IMAGE_ENCODER: {**ident(segmenter), "detseg_input_size": str(image_size)},
        Role.SAM2_MASK_DECODER: {**ident(segmenter), "detseg_input_size": str(image_size)},
    }
    if open_vocabulary is not None:  # a closed detector's configs carry none of these (class_dim 0)
        params[Role.DETECTOR]["detseg_class_dim"] = str(open_vocabulary.class_dim)
        params[Role.DETECTOR]["detseg_visual_prompts"] = str(int(open_vocabulary.visual_prompts))
        tokenizer = open_vocabulary.tokenizer
        params[Role.TEXT_ENCODER] = {
            **ident(detector),
            "detseg_input_size": str(open_vocabulary.max_tokens),
            "detseg_text_model": open_vocabulary.text_model,
            "detseg_tokenizer": tokenizer.name,
            "detseg_tokenizer_sha256": tokenizer.sha256,
        }
        if open_vocabulary.visual_prompts:
            params[Role.VISUAL_PROMPT_ENCODER] = {**ident(detector), "detseg_input_size": str(imgsz)}
    return params


def read_parameters(params: Mapping[Role, Mapping[str, str]]) -> ServedGraphs:
    """The inverse of ``write_parameters`` (the detector's, the image encoder's and, for an open-vocabulary
    detector, the text encoder's parameters are read).

    Raises KeyError for parameters that are missing (a repository not written by ``detseg export``).
    """
    detector, encoder = params[Role.DETECTOR], params[Role.SAM2_IMAGE_ENCODER]
    names = tuple(json.loads(detector["detseg_names"]))
    class_dim = int(detector.get("detseg_class_dim", "0"))
    tokenizer = params[Role.TEXT_ENCODER]["detseg_tokenizer_sha256"] if class_dim else ""

    def describe(role: ModelRole, p: Mapping[str, str], vocabulary: tuple[str, ...]) -> ModelDescriptor:
        return ModelDescriptor(
            role=role,
            name=p.get("detseg_model", ""),
            architecture=p.get("detseg_architecture", ""),
            version=p.get("detseg_version", ""),
            weights_sha256=p.get("detseg_sha256", ""),
            input_size=int(p["detseg_input_size"]),
            vocabulary=vocabulary,
            open_vocabulary=role == ModelRole.DETECTOR and class_dim > 0,
        )

    return ServedGraphs(
        names=names,
        imgsz=int(detector["detseg_input_size"]),
        stride=int(detector["detseg_stride"]),
        image_size=int(encoder["detseg_input_size"]),
        models=(describe(ModelRole.DETECTOR, detector, names), describe(ModelRole.SEGMENTER, encoder, ())),
        profile=detector.get("detseg_profile", "custom"),
        class_dim=class_dim,
        visual_prompts=detector.get("detseg_visual_prompts", "0") == "1",
        tokenizer_sha256=tokenizer,
    )
