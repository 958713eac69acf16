"""The demo profile: the shapes-trained models shipped in this folder, with their architectures."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).parent
VERSION = "shapes-1"
SHAPES_YOLO = DEMO_DIR / "shapes-yolo11n.pt"
SHAPES_SAM2 = DEMO_DIR / "shapes-sam2-mini.pt"
SHAPES_YOLO_ARCH = "yolo11n.yaml"
# The open-vocabulary demo detector: YOLOE-11n trained on the attribute shapes world with MiniLM phrases
# (SHAPES_YOLOE.md); profile "demo-open".
SHAPES_YOLOE = DEMO_DIR / "shapes-yoloe.pt"
SHAPES_YOLOE_ARCH = "yoloe-11n.yaml"
SHAPES_SAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
# A reduced SAM 2 built from the official config by overrides alone (2.4 M parameters, 256² input).
SHAPES_SAM2_OVERRIDES = (
    "++model.image_size=256",
    "++model.image_encoder.trunk.embed_dim=32",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "++model.image_encoder.neck.d_model=64",
    "++model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
    "++model.memory_attention.d_model=64",
    "++model.memory_attention.layer.d_model=64",
    "++model.memory_attention.layer.dim_feedforward=256",
    "++model.memory_attention.layer.self_attention.embedding_dim=64",
    "++model.memory_attention.layer.cross_attention.embedding_dim=64",
    "++model.memory_attention.num_layers=1",
    "++model.memory_encoder.out_dim=64",
    "++model.memory_encoder.fuser.layer.dim=64",
)
# The demo's video tracker (SHAPES_SAM2_VIDEO.md): the same reduced SAM 2 with its memory path as wide as its image
# path (the overrides above leave the top level's position encoding and the memory encoder's input at SAM 2.1-T's
# 256, so that only the image path works). Its image encoder and no-memory embedding are the image module's, bit for
# bit (frozen in training): the server computes frame features with SHAPES_SAM2 and tracks with this module.
SHAPES_SAM2_VIDEO = DEMO_DIR / "shapes-sam2-mini-video.pt"
SHAPES_SAM2_VIDEO_OVERRIDES = (
    *SHAPES_SAM2_OVERRIDES,
    "++model.image_encoder.neck.position_encoding.num_pos_feats=64",
    "++model.memory_encoder.in_dim=64",
    "++model.memory_encoder.mask_downsampler.embed_dim=64",
)
