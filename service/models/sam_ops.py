"""The SAM 2 forward passes detseg runs, written once: used by the torch runner and by the ONNX export.

Both follow ``SAM2ImagePredictor`` (set_image / _predict) step by step, with one change that keeps them
exportable: the image embedding is expanded to the prompt batch (a view) instead of ``repeat_interleave``.
"""

from __future__ import annotations

from typing import Any

import torch


def image_features(sam: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """images (N, 3, S, S) float32 normalised → image_embed (N, C, S/16, S/16), high-res (N, C/8, S/4, S/4),
    (N, C/4, S/8, S/8)."""
    backbone_out = sam.forward_image(images)
    _, vision_feats, _, feat_sizes = sam._prepare_backbone_features(backbone_out)
    if sam.directly_add_no_mem_embed:
        vision_feats[-1] = vision_feats[-1] + sam.no_mem_embed
    n = images.shape[0]
    # (HW, N, C) sequences -> (N, C, H, W) maps, finest level first.
    maps = [f.permute(1, 2, 0).reshape(n, -1, h, w) for f, (h, w) in zip(vision_feats, feat_sizes, strict=True)]
    return maps[2], maps[0], maps[1]


def decode(
    sam: Any,
    image_embed: torch.Tensor,
    high_res_0: torch.Tensor,
    high_res_1: torch.Tensor,
    point_coords: torch.Tensor,
    point_labels: torch.Tensor,
    mask_input: torch.Tensor | None = None,
    has_mask_input: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All B prompts of one image in one pass.

    Inputs: features with batch 1; point_coords (B, P, 2) float32 in SAM input pixels; point_labels (B, P) int32;
    optionally mask_input (B, 1, S/4, S/4) float32 logits (a previous low-res mask) with has_mask_input (B,)
    float32 in {0, 1} choosing, per prompt, between the mask's embedding and sam2's "no mask" embedding.
    Returns (single_masks (B, 1, S/4, S/4), single_iou (B, 1), multi_masks (B, 3, S/4, S/4), multi_iou (B, 3)):
    the decoder runs once and both of sam2's output selections are applied to it (single = with
    dynamic multimask-via-stability, as ``predict(multimask_output=False)``).
    """
    b = point_coords.shape[0]
    sparse, dense = sam.sam_prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=None)
    if mask_input is not None and has_mask_input is not None:
        with_mask = sam.sam_prompt_encoder._embed_masks(mask_input)
        dense = torch.where(has_mask_input.reshape(-1, 1, 1, 1) > 0.5, with_mask, dense)
    decoder = sam.sam_mask_decoder
    masks, iou, _, _ = decoder.predict_masks(
        image_embeddings=image_embed.expand(b, -1, -1, -1),
        image_pe=sam.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        repeat_image=False,
        high_res_features=[high_res_0.expand(b, -1, -1, -1), high_res_1.expand(b, -1, -1, -1)],
    )
    multi_masks, multi_iou = masks[:, 1:], iou[:, 1:]
    if decoder.dynamic_multimask_via_stability and not decoder.training:
        single_masks, single_iou = decoder._dynamic_multimask_via_stability(masks, iou)
    else:
        single_masks, single_iou = masks[:, 0:1], iou[:, 0:1]
    return single_masks, single_iou, multi_masks, multi_iou
