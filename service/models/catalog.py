"""Catalog of official checkpoints and the model profiles built from them.

sha256 values are those recorded by several independent projects for the files at these URLs
(Meta publishes none for SAM 2.1; for the ultralytics v8.4.0 assets, projects that checked them against the
GitHub release API's digests); a download that does not match is refused.
"""

from __future__ import annotations

import dataclasses

from service.models.roles import ModelRole


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    """One official weights file.

    ``architecture`` is the ultralytics model yaml (detectors), the sam2 package config (segmenters), or the
    name an open-vocabulary checkpoint records for its text encoder (``YOLOEModel.text_model``, text encoders).
    ``text_encoder``: for an open-vocabulary detector, the catalog entry of the text encoder it needs.
    """

    name: str
    role: ModelRole
    url: str
    sha256: str
    size_bytes: int
    architecture: str
    version: str
    text_encoder: str = ""

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_YOLO = "https://github.com/ultralytics/assets/releases/download/v8.3.0/"
_ASSETS = "https://github.com/ultralytics/assets/releases/download/v8.4.0/"
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
        # Open-vocabulary detectors (their segmentation variants: detseg uses their boxes and classes; SAM 2
        # makes the masks) and the text encoders their class embeddings come from.
        CatalogEntry(
            "yoloe-11s-seg",
            ModelRole.DETECTOR,
            _ASSETS + "yoloe-11s-seg.pt",
            "8e439445c87338b79d9ce21dec109f4621e26df67e94d26ea1a98c1e64dce3e3",
            27803986,
            "yoloe-11s-seg.yaml",
            "v8.4.0",
            text_encoder="mobileclip_blt",
        ),
        CatalogEntry(
            "yoloe-11l-seg",
            ModelRole.DETECTOR,
            _ASSETS + "yoloe-11l-seg.pt",
            "a993fb0fc7c8830939ae14e6434a925dd1179428158c2761482eb8a8d8a3699f",
            70982416,
            "yoloe-11l-seg.yaml",
            "v8.4.0",
            text_encoder="mobileclip_blt",
        ),
        CatalogEntry(
            "yoloe-26n-seg",
            ModelRole.DETECTOR,
            _ASSETS + "yoloe-26n-seg.pt",
            "1741c1f8da3cea47e2c01829c334a50dc0b9bbd05e685b90a3ce84fae32c8c1b",
            11710443,
            "yoloe-26n-seg.yaml",
            "v8.4.0",
            text_encoder="mobileclip2_b",
        ),
        CatalogEntry(
            "yoloe-26s-seg",
            ModelRole.DETECTOR,
            _ASSETS + "yoloe-26s-seg.pt",
            "48f24206bc8680d60cbbfa296b0140da849669b9515058b72f5a945142df0654",
            31072171,
            "yoloe-26s-seg.yaml",
            "v8.4.0",
            text_encoder="mobileclip2_b",
        ),
        CatalogEntry(
            "yolov8s-worldv2",
            ModelRole.DETECTOR,
            _ASSETS + "yolov8s-worldv2.pt",
            "9b2c17ab6124a913e9b3a5c170617920d91b0f01111a8479da69f00e2cf27792",
            25923032,
            "yolov8s-worldv2.yaml",
            "v8.4.0",
            text_encoder="clip_vit_b32",
        ),
        CatalogEntry(
            "mobileclip_blt",
            ModelRole.TEXT_ENCODER,
            _ASSETS + "mobileclip_blt.ts",
            "a67804d1b0f07b8b9a20c1761ec0847f34660f5fa338ec70e8f3fce68ed95e54",
            599764649,
            "mobileclip:blt",
            "v8.4.0",
        ),
        CatalogEntry(
            "mobileclip2_b",
            ModelRole.TEXT_ENCODER,
            _ASSETS + "mobileclip2_b.ts",
            "35d7f213e4d75f38514e4656ad3cb91158bd33e3805d8ac349f23b186f66982f",
            253794476,
            "mobileclip2:b",
            "v8.4.0",
        ),
        CatalogEntry(
            "sam3",
            ModelRole.CONCEPT_SEGMENTER,
            # Gated on Hugging Face (accept Meta's licence, then download with a token): put it in the cache folder.
            "https://huggingface.co/facebook/sam3/resolve/3c879f39826c281e95690f02c7821c4de09afae7/sam3.pt",
            "9999e2341ceef5e136daa386eecb55cb414446a00ac2b55eb2dfd2f7c3cf8c9e",
            3450062241,
            "sam3",
            "facebook/sam3 (3c879f3)",
        ),
        CatalogEntry(
            "clip_vit_b32",
            ModelRole.TEXT_ENCODER,
            # OpenAI's URL carries the file's sha256.
            "https://openaipublic.azureedge.net/clip/models/"
            "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
            "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
            353976522,
            "clip:ViT-B/32",
            "openai",
        ),
    )
}

# Profile name -> (detector, segmenter) catalog names. "test" is built locally (service.models.testing).
PROFILES: dict[str, tuple[str, str]] = {
    "official": ("yolo11n", "sam2.1_hiera_tiny"),
    # Open vocabulary: YOLOE-11S (its MobileCLIP text encoder, mobileclip_blt, is fetched with it on start).
    "official-open": ("yoloe-11s-seg", "sam2.1_hiera_tiny"),
}

# The score threshold a profile's detector was calibrated to answer at: requests without a score_threshold get it,
# unless Settings.default_score_threshold is set (profiles not named here: 0.25). demo-open: the least threshold, in
# steps of 0.05, at which every absent phrase (trained, held-out combinations, the evaluation paraphrases) drew at
# most 0.05 false positives per request on 100 validation scenes (`python -m service.training.evaluate_open
# --calibrate`; service/models/demo/SHAPES_YOLOE.md, "Operating threshold"); re-chosen with every new file.
PROFILE_SCORE_THRESHOLDS: dict[str, float] = {"demo-open": 0.35}
