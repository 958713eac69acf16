"""What a labeling run keeps of the service's answer for one image: plain dataclasses, no gRPC types.

Frames: boxes are original-image pixels, XYXY (float); masks are COCO RLE of the whole image (H x W), the
service's own encoding, decoded to numpy on demand.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class LabeledInstance:
    """One labeled instance. ``rle``: {"size": [H, W], "counts": str} (COCO compressed RLE, as pycocotools
    encodes it); ``source``: how it was found ("detector", "region_prompt", "text", "exemplar", "concept")."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    rle: dict[str, Any]
    mask_score: float
    source: str = "detector"
    needs_review: bool = False
    review_reasons: tuple[str, ...] = ()

    def mask(self) -> np.ndarray:
        """(H, W) bool, original image size."""
        from pycocotools import mask as mask_utils

        counts = self.rle["counts"]
        rle = {"size": list(self.rle["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
        return mask_utils.decode(rle).astype(bool)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["box"], out["review_reasons"] = list(self.box), list(self.review_reasons)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabeledInstance:
        return cls(**{**data, "box": tuple(data["box"]), "review_reasons": tuple(data["review_reasons"])})


@dataclasses.dataclass(frozen=True)
class LabeledImage:
    """The service's answer for one image. ``file_name``: path relative to the labeled folder (POSIX
    separators); ``sha256``: hex digest of the image file's bytes."""

    file_name: str
    width: int
    height: int
    sha256: str
    instances: tuple[LabeledInstance, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "file_name": self.file_name,
            "width": self.width,
            "height": self.height,
            "sha256": self.sha256,
            "instances": [i.to_json() for i in self.instances],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabeledImage:
        instances = tuple(LabeledInstance.from_json(i) for i in data["instances"])
        return cls(data["file_name"], int(data["width"]), int(data["height"]), data["sha256"], instances)
