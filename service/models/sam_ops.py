"""The SAM 2 forward passes detseg runs, written once: used by the torch runner and by the ONNX export.

Both follow ``SAM2ImagePredictor`` (set_image / _predict) step by step, with one change that keeps them
exportable: the image embedding is expanded to the prompt batch (a view) instead of ``repeat_interleave``.

Without a mask input (every request detseg serves), ``decode`` runs an exact rewrite of sam2's mask decoder that
shares the image side of the first two-way block between the B prompts of an image (``_predict_masks_shared``):
the same numbers to float rounding (checked against ``MaskDecoder.predict_masks`` in the tests), a quarter to a third
less work per prompt on CPU.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


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
    decoder = sam.sam_mask_decoder
    if mask_input is None or has_mask_input is None:
        masks, iou = _predict_masks_shared(sam, image_embed, high_res_0, high_res_1, sparse)
    else:  # the exported graph: each prompt may bring a mask, so each has its own image side
        with_mask = sam.sam_prompt_encoder._embed_masks(mask_input)
        dense = torch.where(has_mask_input.reshape(-1, 1, 1, 1) > 0.5, with_mask, dense)
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


def _predict_masks_shared(
    sam: Any, image_embed: torch.Tensor, high_res_0: torch.Tensor, high_res_1: torch.Tensor, sparse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """sam2's ``MaskDecoder.predict_masks`` for B prompts on one image without mask inputs, rewritten exactly.

    Without a mask input every prompt's dense embedding is sam2's ``no_mask_embed``, so the image tokens entering the
    two-way transformer are the same for all B prompts: the first block's image-side work (the key and value
    projections of token→image attention, the query projection of image→token attention, the positional adds) is done
    once per image, on (1, HW, C) tensors, instead of once per prompt on (B, HW, C). From the first block's
    image→token attention on, the image tokens depend on the prompt and the computation is sam2's.

    image_embed (1, C, h, w), high_res_0 (1, C/8, 4h, 4w), high_res_1 (1, C/4, 2h, 2w), sparse (B, P', C) float32
    sparse prompt embeddings → masks (B, M, 4h, 4w) logits and iou (B, M), M = 1 + num_multimask_outputs.
    """
    decoder = sam.sam_mask_decoder
    prompt_encoder = sam.sam_prompt_encoder
    b = sparse.shape[0]
    weights = [decoder.iou_token.weight, decoder.mask_tokens.weight]
    if decoder.pred_obj_scores:
        weights.insert(0, decoder.obj_score_token.weight)
    first = 1 if decoder.pred_obj_scores else 0  # index of the IoU token
    tokens = torch.cat((torch.cat(weights).unsqueeze(0).expand(b, -1, -1), sparse), dim=1)  # (B, T, C)
    src = image_embed + prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    _, c, h, w = src.shape
    keys = src.flatten(2).permute(0, 2, 1)  # (1, HW, C) until the first block's image→token attention
    key_pe = prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1)
    transformer = decoder.transformer
    queries = tokens
    for layer in transformer.layers:
        queries, keys = _two_way_block(layer, queries, keys, tokens, key_pe)
    attn = _attend(transformer.final_attn_token_to_image, queries + tokens, keys + key_pe, keys)
    hs = transformer.norm_final_attn(queries + attn)

    dc1, ln1, act1, dc2, act2 = decoder.output_upscaling
    upscaled = act1(_layer_norm_2d(ln1, dc1(keys.transpose(1, 2).reshape(b, c, h, w)) + high_res_1))
    upscaled = act2(dc2(upscaled) + high_res_0)
    mask_tokens = hs[:, first + 1 : first + 1 + decoder.num_mask_tokens]
    hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    _, cu, hu, wu = upscaled.shape
    masks = (hyper @ upscaled.reshape(b, cu, hu * wu)).reshape(b, -1, hu, wu)
    return masks, decoder.iou_prediction_head(hs[:, first])


def _two_way_block(
    layer: Any, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """sam2's ``TwoWayAttentionBlock.forward`` with the image tokens ``keys`` (1, HW, C) shared by every prompt or
    (B, HW, C) per prompt; queries (B, T, C). Returns (queries (B, T, C), keys (B, HW, C))."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)
    k = keys + key_pe
    queries = layer.norm2(queries + _attend(layer.cross_attn_token_to_image, queries + query_pe, k, keys))
    queries = layer.norm3(queries + layer.mlp(queries))
    attn = _attend(layer.cross_attn_image_to_token, k, queries + query_pe, queries)
    return queries, layer.norm4(keys + attn)


def _attend(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sam2's ``Attention.forward`` where either side may be shared by the B prompts.

    q (Bq, Nq, C), k and v (Bk, Nk, C) with Bq, Bk in {1, B} → (max(Bq, Bk), Nq, C). Shared keys: the B prompts'
    queries attend as one sequence of B·Nq queries (each query's softmax is over the keys alone, so this is the
    same attention). Shared queries: the projection is done once and broadcast against each prompt's keys.
    """
    qp, kp, vp = attn.q_proj(q), attn.k_proj(k), attn.v_proj(v)
    heads = attn.num_heads
    bq, nq, inner = qp.shape
    bk = kp.shape[0]
    if bq > 1 and bk == 1:
        out = F.scaled_dot_product_attention(
            _heads(qp.reshape(1, bq * nq, inner), heads), _heads(kp, heads), _heads(vp, heads)
        )
    elif bq == 1 and bk > 1:  # a broadcast matmul: the queries are never copied per prompt
        scores = torch.matmul(_heads(qp, heads), _heads(kp, heads).transpose(-1, -2)) / math.sqrt(inner // heads)
        out = torch.matmul(scores.softmax(-1), _heads(vp, heads))
    else:
        out = F.scaled_dot_product_attention(_heads(qp, heads), _heads(kp, heads), _heads(vp, heads))
    return attn.out_proj(out.transpose(1, 2).reshape(max(bq, bk), nq, inner))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) → (B, heads, N, C / heads)."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _layer_norm_2d(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """sam2's ``LayerNorm2d`` (normalise over channels of (B, C, H, W)) as one fused ``layer_norm`` kernel."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
