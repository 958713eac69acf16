"""Catalog of official checkpoints and the model profiles built from them.

sha256 values are those recorded by several independent projects for the files at these URLs
(Meta publishes none for SAM 2.1); a download that does not match is refused.
"""

from __future__ import annotations

import dataclasses

from service.models.roles import ModelRole


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    """One official weights file.

    ``architecture`` is the ultralytics model yaml (detectors) or the sam2 package config (segmenters).
    """

    name: str
    role: ModelRole
    url: str
    sha256: str
    size_bytes: int
    architecture: str
    version: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_YOLO = "https://github.com/ultralytics/assets/releases/download/v8.3.0/"
_SAM21 = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"

CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            "yolo11n",
            ModelRole.DETECTOR,
            _YOLO + "yolo11n.pt",
            "0ebbc80d4a7680d14987a577cd21342b65ecfd94632bd9a8da63ae6417644ee1",
            5613764,
            "yolo11n.yaml",
            "v8.3.0",
        ),
        CatalogEntry(
            "yolo11s",
            ModelRole.DETECTOR,
            _YOLO + "yolo11s.pt",
            "85a76fe86dd8afe384648546b56a7a78580c7cb7b404fc595f97969322d502d5",
            19313732,
            "yolo11s.yaml",
            "v8.3.0",
        ),
        CatalogEntry(
            "sam2.1_hiera_tiny",
            ModelRole.SEGMENTER,
            _SAM21 + "sam2.1_hiera_tiny.pt",
            "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",
            156008466,
            "configs/sam2.1/sam2.1_hiera_t.yaml",
            "2.1 (092824)",
        ),
        CatalogEntry(
            "sam2.1_hiera_small",
            ModelRole.SEGMENTER,
            _SAM21 + "sam2.1_hiera_small.pt",
            "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
            184416285,
            "configs/sam2.1/sam2.1_hiera_s.yaml",
            "2.1 (092824)",
        ),
        CatalogEntry(
            "sam2.1_hiera_base_plus",
            ModelRole.SEGMENTER,
            _SAM21 + "sam2.1_hiera_base_plus.pt",
            "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5",
            323606802,
            "configs/sam2.1/sam2.1_hiera_b+.yaml",
            "2.1 (092824)",
        ),
        CatalogEntry(
            "sam2.1_hiera_large",
            ModelRole.SEGMENTER,
            _SAM21 + "sam2.1_hiera_large.pt",
            "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318",
            898083611,
            "configs/sam2.1/sam2.1_hiera_l.yaml",
            "2.1 (092824)",
        ),
    )
}

# Profile name -> (detector, segmenter) catalog names. "test" is built locally (service.models.testing).
PROFILES: dict[str, tuple[str, str]] = {
    "official": ("yolo11n", "sam2.1_hiera_tiny"),
}
