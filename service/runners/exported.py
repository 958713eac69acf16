"""What the runners of exported graphs (ONNX Runtime in-process, Triton) share: specs from the repository's
parameters, and the decoder graph's feeds from the interface's types."""

from __future__ import annotations

import numpy as np

from service.models import graphs
from service.runners.base import DetectorSpec, ImageFeatures, PromptBatch, SegmenterSpec


def specs(served: graphs.ServedGraphs) -> tuple[DetectorSpec, SegmenterSpec]:
    return (
        DetectorSpec(names=served.names, imgsz=served.imgsz, stride=served.stride, class_dim=0),
        SegmenterSpec(image_size=served.image_size),
    )


def decoder_feeds(features: ImageFeatures, prompts: PromptBatch, image_size: int) -> dict[str, np.ndarray]:
    """The decoder graph's inputs for the prompts of one image (``features`` has batch size 1)."""
    return graphs.decoder_feeds(
        features.image_embed, features.high_res_feats, prompts.point_coords, prompts.point_labels, image_size
    )
