"""Names of the parts of a pipeline, one enum each, and what a loaded model is.

- ``ModelRole``: what a set of weights does (ListModels' ``ModelRole``, the catalog's entries).
- ``Role``: one exported graph / Triton model, by its place in the pipeline (``model_repository/<role>/``);
  a segmenter's weights make two graphs (image encoder and mask decoder).
"""

from __future__ import annotations

import dataclasses
import enum


class ModelRole(enum.StrEnum):
    DETECTOR = "detector"
    SEGMENTER = "segmenter"
    TEXT_ENCODER = "text_encoder"
    CONCEPT_SEGMENTER = "concept_segmenter"  # texts → boxes and masks in one model (SAM 3)
    TRACKER = "tracker"  # SAM 2's memory path when it is not the segmenter's own (shares its image encoder)


class Role(enum.StrEnum):
    DETECTOR = "detector"
    SAM2_IMAGE_ENCODER = "sam2_image_encoder"
    SAM2_MASK_DECODER = "sam2_mask_decoder"
    # An open-vocabulary detector's two prompt encoders: texts → class embeddings, example regions → class
    # embeddings. The detector graph then takes the class embeddings as an input.
    TEXT_ENCODER = "text_encoder"
    VISUAL_PROMPT_ENCODER = "visual_prompt_encoder"


# The graphs every served pipeline has; an open-vocabulary detector adds its prompt encoders (graph_roles).
MODEL_ROLES: tuple[Role, ...] = (Role.DETECTOR, Role.SAM2_IMAGE_ENCODER, Role.SAM2_MASK_DECODER)


def graph_roles(open_vocabulary: bool, visual_prompts: bool = False) -> tuple[Role, ...]:
    """The graphs a pipeline is exported to and served from: MODEL_ROLES, + the text encoder for an
    open-vocabulary detector, + the visual-prompt encoder for one that takes example regions (YOLOE)."""
    if not open_vocabulary:
        return MODEL_ROLES
    return MODEL_ROLES + (Role.TEXT_ENCODER,) + ((Role.VISUAL_PROMPT_ENCODER,) if visual_prompts else ())


@dataclasses.dataclass(frozen=True)
class PrecisionGate:
    """The quality gate of a reduced-precision variant of one model (ListModels' ``PrecisionGate``): final masks of
    ``prompts`` box prompts on ``images`` held-out images (``held_out_set``, never calibration images) from the
    variant vs fp32 of the same weights, the same decoder. IoUs in [0, 1]; passed: min_mask_iou >= required."""

    precision: str  # the variant measured, e.g. "int8"
    held_out_set: str
    images: int
    prompts: int
    min_mask_iou: float
    median_mask_iou: float
    required_min_mask_iou: float

    @property
    def passed(self) -> bool:
        return self.min_mask_iou >= self.required_min_mask_iou


@dataclasses.dataclass(frozen=True)
class ModelDescriptor:
    """What a loaded model is, for ListModels and provenance."""

    role: ModelRole
    name: str
    architecture: str
    version: str
    weights_sha256: str
    input_size: int
    vocabulary: tuple[str, ...] = ()
    open_vocabulary: bool = False  # a detector whose classes come with each request
    # The numerical variant and runtime it runs in, e.g. "fp32", "bf16-autocast" (torch on a GPU), "int8" (statically
    # quantised); the runner that loads the model sets it.
    precision: str = "fp32"
    # The gate a reduced-precision variant of this model was measured against (served or not); None: none measured.
    precision_gate: PrecisionGate | None = None
