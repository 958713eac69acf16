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


class Role(enum.StrEnum):
    DETECTOR = "detector"
    SAM2_IMAGE_ENCODER = "sam2_image_encoder"
    SAM2_MASK_DECODER = "sam2_mask_decoder"


# Every graph a served pipeline needs (export writes them all; the Triton runner waits for them all).
MODEL_ROLES: tuple[Role, ...] = tuple(Role)


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
