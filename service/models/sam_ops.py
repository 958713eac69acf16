"""The SAM 2 forward passes detseg runs, written once: used by the runners and by the ONNX export.

``image_features`` and ``decode`` follow ``SAM2ImagePredictor`` (set_image / _predict) step by step, with one change
that keeps them exportable: the image embedding is expanded to the prompt batch (a view) instead of
``repeat_interleave``; ``decode`` with mask inputs is the exported decoder graph.

The torch and openvino runners decode with ``PromptDecoder``: sam2's mask decoder rewritten exactly for B prompts on
one image (checked against ``MaskDecoder.predict_masks`` in the tests):

- without mask inputs (every detection) the image side of the first two-way block is the same for every prompt, so
  it is computed once per call (prompts that bring a previous mask have their own from the start);
- each attention between the image tokens (HW = 4096 at 1024², C = 256) and a prompt's T tokens (9 for a box) is
  re-associated so that no (HW, C) × (C, C/2) projection runs per prompt: the T·heads = 72 query (or key) rows are
  pulled through the projection instead (a (72, C) matrix per prompt), which halves the image-sized GEMMs; the
  positional encoding's projections depend on the weights alone and are computed once per model;
- the output upscaling is two per-pixel GEMMs in channels-last order with the high-res features permuted once per
  call, and only the mask tokens the caller reads are multiplied out (single mask: token 0 and the best-scored
  multimask token SAM 2's dynamic fallback may pick; multimask: tokens 1-3).

``DecoderPolicy`` says how a device runs it (prompts per pass, the image tokens' dtype), measured per device in
benchmarks/DECODER.md (``python -m tests.benchmarks.decoder_bench``).
"""

from __future__ import annotations

import dataclasses
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


# Bump when PromptDecoder's numerics change: stored precision-gate figures of its bf16 policy are then measured anew.
DECODER_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DecoderPolicy:
    """How ``PromptDecoder`` runs on one device.

    prompts_per_pass: prompts taken through the decoder together (None: every prompt of the call). The image side
    they share is computed once per call whatever this is; a pass holds ~9 MB (bf16) to ~16 MB (fp32) of image-sized
    activations per prompt at 1024². upscale_group: prompts upscaled to masks together within a pass (None: the whole
    pass).
    image_dtype: dtype of the image-sized tensors (image tokens, attention weights, upscaled embeddings) and of the
    GEMMs on them: float32 (sam2's numbers to float rounding) or bfloat16 (fp32 accumulation), for CPUs with bf16
    dot-product instructions, served only where the model passes its precision gate (final masks IoU >= 0.99 vs
    float32: ``service.runners.openvino.gated_decoder``; SAM 2.1-T at 1024² passes, the demo's small SAM does not).
    Token-sized work is float32.
    """

    prompts_per_pass: int | None = None
    upscale_group: int | None = None
    image_dtype: torch.dtype = torch.float32


# The one place per device type, measured with tests/benchmarks/decoder_bench.py (benchmarks/DECODER.md). CPU (2 cores
# with AVX512_BF16, SAM 2.1-T at 1024², bf16): 50 boxes cost the same per box in passes of 16 or 64 prompts (11-12 ms,
# within run-to-run noise; passes of 4: 13-14 ms), and a 64-box call peaks at +129 MB in passes of 16, +549 MB in one
# (fp32: +499 / +1243 MB), which the tuned allocator keeps: passes of 16. Upscaling 4 prompts at a time measured as
# fast as 8 or 16 (+353 MB at 16). A GPU takes every prompt of a call in one pass.
DECODER_POLICIES: dict[str, DecoderPolicy] = {
    "cpu": DecoderPolicy(prompts_per_pass=16, upscale_group=4),
    "cuda": DecoderPolicy(),
}


def decoder_policy(device: str, bf16: bool = False) -> DecoderPolicy:
    """The measured policy of ``device`` ("cpu", "cuda", "cuda:1"; other types run as a GPU does), with bfloat16
    image tokens when ``bf16`` (asked for on CPUs with native bf16 only: ``service.models.cpu``)."""
    policy = DECODER_POLICIES.get(torch.device(device).type, DECODER_POLICIES["cuda"])
    return dataclasses.replace(policy, image_dtype=torch.bfloat16) if bf16 else policy


class PromptDecoder:
    """sam2's mask decoder for B prompts on one image, rewritten for speed (module docstring).

    Built once per loaded model (it precomputes what depends on the weights alone) on the model's device; read-only
    afterwards, so concurrent calls are safe. Call under ``torch.inference_mode`` (or ``no_grad``).
    """

    def __init__(self, sam: Any, policy: DecoderPolicy | None = None) -> None:
        self._sam = sam
        self.policy = policy or DecoderPolicy()
        dec = sam.sam_mask_decoder
        self._dec, self._transformer = dec, dec.transformer
        dt = self.policy.image_dtype
        layer1, layer2 = self._transformer.layers
        heads = layer2.cross_attn_token_to_image.num_heads
        dc1, ln1, _, dc2, _ = dec.output_upscaling
        with torch.no_grad():
            pe = sam.sam_prompt_encoder.get_dense_pe().flatten(2)[0].t().contiguous()  # (HW, C)
            self._pe = pe
            # The positional encoding's projections, by head (heads, C/2/heads, HW): per model, not per image.
            self._pe_k1 = _by_head(layer1.cross_attn_token_to_image.k_proj(pe), heads).to(dt)
            self._pe_q1 = _by_head(layer1.cross_attn_image_to_token.q_proj(pe), heads).to(dt)
            self._pe_k2 = _by_head(layer2.cross_attn_token_to_image.k_proj(pe), heads).to(dt)
            self._pe_q2 = _by_head(layer2.cross_attn_image_to_token.q_proj(pe), heads).to(dt)
            self._pe_kf = _by_head(self._transformer.final_attn_token_to_image.k_proj(pe), heads).to(dt)
            # ConvTranspose2d(k=2, s=2) = a per-pixel GEMM: (C_in, 2·2·C_out) columns ordered (dy, dx, c_out).
            self._w1 = dc1.weight.permute(0, 2, 3, 1).reshape(dc1.in_channels, -1).contiguous().to(dt)
            self._w2 = dc2.weight.permute(0, 2, 3, 1).reshape(dc2.in_channels, -1).contiguous().to(dt)
            self._norms = {id(n): (n.weight.to(dt), n.bias.to(dt)) for n in (layer1.norm4, layer2.norm4, ln1)}
            weights = [dec.iou_token.weight, dec.mask_tokens.weight]
            if dec.pred_obj_scores:
                weights.insert(0, dec.obj_score_token.weight)
            self._output_tokens = torch.cat(weights)
        self._iou_token = 1 if dec.pred_obj_scores else 0
        self._no_mask = sam.sam_prompt_encoder.no_mask_embed.weight.reshape(1, -1)

    @property
    def sam(self) -> Any:
        """The SAM 2 module decoded with."""
        return self._sam

    def __call__(
        self,
        image_embed: torch.Tensor,
        high_res_0: torch.Tensor,
        high_res_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        multimask: bool,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All B prompts of one image. Features with batch 1 (``image_features``); point_coords (B, P, 2) float32 in
        SAM input pixels; point_labels (B, P) int32; mask_input: (B, 1, S/4, S/4) float32 low-res logits of the
        masks the prompts correct (sam2's ``mask_input``), or None.

        Returns (masks (B, M, S/4, S/4) float32 logits, iou (B, M) float32): multimask M = 3 (sam2's
        ``multimask_output=True``), else M = 1 with SAM 2's dynamic fallback to the best multimask output when
        token 0's mask is unstable (``predict(multimask_output=False)``)."""
        sparse, _ = self._sam.sam_prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=None)
        outputs = "multi" if multimask else "single"
        return self.decode_sparse(image_embed, high_res_0, high_res_1, sparse, outputs, mask_input)

    def decode_sparse(
        self,
        image_embed: torch.Tensor,
        high_res_0: torch.Tensor,
        high_res_1: torch.Tensor,
        sparse: torch.Tensor,
        outputs: str,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``__call__`` from the prompt encoder's sparse embeddings (B, P', C). outputs: "single" (M = 1), "multi"
        (tokens 1-3) or "all" (every mask token: sam2's ``predict_masks``, M = 1 + num_multimask_outputs)."""
        image = self._image_side(image_embed, high_res_0, high_res_1, shared=mask_input is None)
        step = self.policy.prompts_per_pass
        if step is None or sparse.shape[0] <= step:
            return self._decode(image, sparse, outputs, mask_input)
        parts = [
            self._decode(image, sparse[k : k + step], outputs, None if mask_input is None else mask_input[k : k + step])
            for k in range(0, sparse.shape[0], step)
        ]
        return torch.cat([m for m, _ in parts]), torch.cat([i for _, i in parts])

    def _image_side(self, embed: torch.Tensor, hr0: torch.Tensor, hr1: torch.Tensor, shared: bool) -> _Image:
        """What every prompt of the call shares: the high-res features permuted to the upscaling GEMMs' pixel order
        and, when ``shared`` (no prompt brings a mask), the image tokens with sam2's "no mask" embedding added and the
        first block's projections of them."""
        dt = self.policy.image_dtype
        _, _, h, w = embed.shape
        dc1, _, _, dc2, _ = self._dec.output_upscaling
        c1, c0 = hr1.shape[1], hr0.shape[1]
        # hr1 (1, C1, 2h, 2w) → (h·w, 2·2·C1) in (y, x, dy, dx, c) order; hr0 (1, C0, 4h, 4w) → (h·w·2·2, 2·2·C0) in
        # (y, x, dy, dx, ey, ex, c) order: the order in which the two GEMMs write their outputs. Biases folded in.
        hr1p = hr1[0].to(dt).reshape(c1, h, 2, w, 2).permute(1, 3, 2, 4, 0) + dc1.bias.to(dt)
        hr0p = hr0[0].to(dt).reshape(c0, h, 2, 2, w, 2, 2).permute(1, 4, 2, 5, 3, 6, 0) + dc2.bias.to(dt)
        return _Image(
            embed=embed,
            high_res_1=hr1p.reshape(h * w, -1),
            high_res_0=hr0p.reshape(h * w * 4, -1),
            size=(h, w),
            no_mask=self._no_mask_side(embed) if shared else None,
        )

    def _no_mask_side(self, embed: torch.Tensor) -> _NoMaskSide:
        """The image tokens every prompt without a mask input shares, and block 1's projections of them."""
        dt = self.policy.image_dtype
        layer1 = self._transformer.layers[0]
        src = (embed[0] + self._no_mask.reshape(-1, 1, 1)).flatten(1).t()  # (HW, C)
        with_pe = src + self._pe
        t2i, i2t = layer1.cross_attn_token_to_image, layer1.cross_attn_image_to_token
        heads = t2i.num_heads
        key = (with_pe.to(dt) @ t2i.k_proj.weight.t().to(dt) + t2i.k_proj.bias.to(dt)).float()
        value = (src.to(dt) @ t2i.v_proj.weight.t().to(dt) + t2i.v_proj.bias.to(dt)).float()
        query = with_pe.to(dt) @ i2t.q_proj.weight.t().to(dt) + i2t.q_proj.bias.to(dt)
        return _NoMaskSide(
            src=src.to(dt).contiguous(),
            key=_split_heads(key[None], heads),
            value=_split_heads(value[None], heads),
            query=_by_head(query, heads),
        )

    def _decode(
        self, image: _Image, sparse: torch.Tensor, outputs: str, mask_input: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: sam2's ``TwoWayTransformer`` + output heads for the prompts of ``sparse`` (b, P', C)."""
        layer1, layer2 = self._transformer.layers
        b = sparse.shape[0]
        tokens = torch.cat((self._output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)  # (b, T, C)
        t = tokens.shape[1]
        # Block 1 (skip_first_layer_pe): token self-attention, then tokens → image tokens.
        queries = layer1.norm1(layer1.self_attn(q=tokens, k=tokens, v=tokens))
        attn = layer1.cross_attn_token_to_image
        i2t = layer1.cross_attn_image_to_token
        shared = image.no_mask
        if shared is not None:  # every prompt's image tokens are the image's: one attention over b·T queries
            heads = attn.num_heads
            q = _split_heads(attn.q_proj(queries + tokens), heads).transpose(0, 1).reshape(1, heads, b * t, -1)
            out = F.scaled_dot_product_attention(q, shared.key, shared.value)  # (1, heads, b·T, d)
            out = out.reshape(heads, b, t, -1).permute(1, 2, 0, 3).reshape(b, t, -1)
            queries = layer1.norm2(queries + attn.out_proj(out))
            queries = layer1.norm3(queries + layer1.mlp(queries))
            # Image tokens → prompt tokens: the image side (queries) is shared, the scores are (b, heads, T, HW).
            k = self._scaled_heads(i2t.k_proj(queries + tokens), i2t)
            keys = self._image_to_token(i2t, self._by_head_scores(k, shared.query), queries, shared.src, layer1.norm4)
        else:  # each prompt's mask embedding replaces "no mask": its own image tokens from the start
            dense = self._sam.sam_prompt_encoder._embed_masks(mask_input)  # (b, C, h, w)
            src = (image.embed + dense).flatten(2).transpose(1, 2).to(self.policy.image_dtype)  # (b, HW, C)
            queries = layer1.norm2(queries + self._token_to_image(attn, queries + tokens, src, self._pe_k1))
            queries = layer1.norm3(queries + layer1.mlp(queries))
            k = self._scaled_heads(i2t.k_proj(queries + tokens), i2t)
            scores = self._scores(k, i2t.q_proj.weight, src, self._pe_q1)
            keys = self._image_to_token(i2t, scores, queries, src, layer1.norm4)
        # Block 2, and the final token → image attention.
        qpe = queries + tokens
        queries = layer2.norm1(queries + layer2.self_attn(q=qpe, k=qpe, v=queries))
        attn = layer2.cross_attn_token_to_image
        queries = layer2.norm2(queries + self._token_to_image(attn, queries + tokens, keys, self._pe_k2))
        queries = layer2.norm3(queries + layer2.mlp(queries))
        i2t = layer2.cross_attn_image_to_token
        k = self._scaled_heads(i2t.k_proj(queries + tokens), i2t)
        scores = self._scores(k, i2t.q_proj.weight, keys, self._pe_q2)
        keys = self._image_to_token(i2t, scores, queries, keys, layer2.norm4)
        attn = self._transformer.final_attn_token_to_image
        out = self._token_to_image(attn, queries + tokens, keys, self._pe_kf)
        return self._heads_out(image, self._transformer.norm_final_attn(queries + out), keys, outputs)

    def _heads_out(
        self, image: _Image, hs: torch.Tensor, keys: torch.Tensor, outputs: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The IoU head, the hypernetworks of the mask tokens asked for, the upscaling and sam2's output selection."""
        dec = self._dec
        b = hs.shape[0]
        first = self._iou_token + 1
        iou = dec.iou_prediction_head(hs[:, self._iou_token])  # (b, 1 + num_multimask_outputs)
        tokens = hs[:, first : first + dec.num_mask_tokens]
        hyper = torch.stack([mlp(tokens[:, i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
        dynamic = outputs == "single" and dec.dynamic_multimask_via_stability and not dec.training
        if outputs == "all":
            chosen = hyper
        elif outputs == "multi":
            chosen, iou = hyper[:, 1:], iou[:, 1:]
        elif dynamic:  # token 0, and the multimask output SAM 2 falls back to when token 0's mask is unstable
            best = iou[:, 1:].argmax(-1, keepdim=True) + 1  # (b, 1)
            fallback = hyper.gather(1, best[..., None].expand(-1, -1, hyper.shape[-1]))
            chosen = torch.cat((hyper[:, :1], fallback), dim=1)
        else:
            chosen, iou = hyper[:, :1], iou[:, :1]
        group = self.policy.upscale_group
        if group is None or b <= group:
            raw = self._masks(image, keys, chosen)
        else:
            raw = torch.cat(
                [self._masks(image, keys[k : k + group], chosen[k : k + group]) for k in range(0, b, group)]
            )
        if dynamic:
            single = raw[:, :1]
            delta = dec.dynamic_multimask_stability_delta
            area_i = (single > delta).sum(-1).float()
            area_u = (single > -delta).sum(-1).float()
            stable = torch.where(area_u > 0, area_i / area_u, 1.0) >= dec.dynamic_multimask_stability_thresh
            raw = torch.where(stable[..., None], single, raw[:, 1:])
            iou = torch.where(stable, iou[:, :1], iou.gather(1, best))
        h, w = image.size
        # GEMM pixel order (y, x, dy, dx, ey, ex) → rows 4y + 2dy + ey, columns 4x + 2dx + ex.
        masks = raw.view(b, -1, h, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(b, -1, 4 * h, 4 * w)
        return masks, iou

    def _masks(self, image: _Image, keys: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        """sam2's output upscaling of keys (g, HW, C) and the hypernetworks' product for hyper (g, M, C/8) →
        (g, M, 16·HW) float32 mask logits in the GEMMs' pixel order."""
        dc1, ln1, act1, dc2, act2 = self._dec.output_upscaling
        g, n, _ = keys.shape
        up = (image.high_res_1 + (keys @ self._w1).view(g, n, -1)).view(g, n * 4, -1)
        weight, bias = self._norms[id(ln1)]
        up = act1(F.layer_norm(up, weight.shape, weight, bias, ln1.eps))  # LayerNorm2d over channels
        up = act2((image.high_res_0 + (up @ self._w2).view(g, n * 4, -1)).view(g, n * 16, -1))
        return torch.bmm(hyper.to(up.dtype), up.transpose(1, 2)).float()

    @staticmethod
    def _scaled_heads(x: torch.Tensor, attn: Any) -> torch.Tensor:
        """(b, T, inner) projected tokens → (b, heads, T, d) / sqrt(d): the attention's scale folded in."""
        return _split_heads(x, attn.num_heads) * (1.0 / math.sqrt(attn.internal_dim // attn.num_heads))

    def _by_head_scores(self, k: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """k (b, heads, T, d) · projected (heads, d, HW), per head → (b, heads, T, HW) in the image dtype."""
        b, heads, t, d = k.shape
        out = torch.bmm(k.transpose(0, 1).reshape(heads, b * t, d).to(projected.dtype), projected)
        return out.view(heads, b, t, -1).transpose(0, 1)

    def _scores(self, k: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        """Attention scores between b prompts' tokens k (b, heads, T, d) and the projection ``weight`` (inner, C) of
        their image tokens + positional encoding, (keys + pe) Wᵀ + bias: re-associated as (k W) keysᵀ (a (heads·T, C)
        matrix per prompt against the image tokens) + k (pe Wᵀ + bias) (``pe``, per model) → (b, heads, T, HW)."""
        b, heads, t, d = k.shape
        kw = torch.matmul(k, weight.reshape(heads, d, -1)).reshape(b, heads * t, -1)  # (b, heads·T, C)
        scores = torch.bmm(kw.to(keys.dtype), keys.transpose(1, 2)).view(b, heads, t, -1)
        return scores.add_(self._by_head_scores(k, pe))

    def _token_to_image(self, attn: Any, q: torch.Tensor, keys: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        """sam2's ``Attention(q, keys + pe, keys)`` from prompt tokens q (b, T, C) to each prompt's image tokens keys
        (b, HW, C), re-associated: softmax((q Wq) (keys + pe) Wkᵀ) keys Wvᵀ, with the value projection applied after
        the weighted sum (the weights sum to 1, so its bias passes through) → (b, T, C)."""
        heads = attn.num_heads
        d = attn.internal_dim // heads
        b, t, _ = q.shape
        weights = self._scores(self._scaled_heads(attn.q_proj(q), attn), attn.k_proj.weight, keys, pe).softmax(-1)
        summed = torch.bmm(weights.view(b, heads * t, -1), keys).float().view(b, heads, t, -1)  # (b, heads, T, C)
        out = summed @ attn.v_proj.weight.reshape(heads, d, -1).transpose(1, 2) + attn.v_proj.bias.reshape(heads, 1, d)
        return attn.out_proj(out.transpose(1, 2).reshape(b, t, heads * d))

    def _image_to_token(
        self, attn: Any, scores: torch.Tensor, queries: torch.Tensor, base: torch.Tensor, norm: Any
    ) -> torch.Tensor:
        """sam2's ``keys = norm(keys + Attention(keys + pe, queries + query_pe, queries))`` given its scores (b, heads,
        T, HW): the output projection is applied to the prompt tokens' values first (a (heads·T, C) matrix per
        prompt, its bias split over the heads: each head's weights sum to 1) → (b, HW, C) image tokens."""
        heads = attn.num_heads
        d = attn.internal_dim // heads
        b, _, t, n = scores.shape
        weights = scores.softmax(2).reshape(b, heads * t, n)
        values = _split_heads(attn.v_proj(queries), heads)  # (b, heads, T, d)
        out_proj = attn.out_proj.weight.reshape(-1, heads, d).permute(1, 2, 0)  # (heads, d, C)
        projected = (values @ out_proj + attn.out_proj.bias / heads).reshape(b, heads * t, -1).to(weights.dtype)
        x = base + torch.bmm(weights.transpose(1, 2), projected)
        weight, bias = self._norms[id(norm)]
        return F.layer_norm(x, weight.shape, weight, bias, norm.eps)


@dataclasses.dataclass(frozen=True)
class _NoMaskSide:
    """The image side prompts without a mask input share: src (HW, C) image tokens + sam2's no-mask embedding; key,
    value (1, heads, HW, d) float32 of block 1's token→image attention; query (heads, d, HW) of its image→token one."""

    src: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    query: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _Image:
    """One call's image side (``PromptDecoder._image_side``): embed (1, C, h, w) the image embedding; high_res_1
    (HW, 4·C1), high_res_0 (4·HW, 4·C0) in GEMM pixel order (biases folded in); size (h, w); no_mask: the shared
    image tokens (None when the prompts bring masks)."""

    embed: torch.Tensor
    high_res_1: torch.Tensor
    high_res_0: torch.Tensor
    size: tuple[int, int]
    no_mask: _NoMaskSide | None


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) → (B, heads, N, C / heads)."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _by_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(HW, heads·d) → (heads, d, HW) contiguous."""
    return x.reshape(x.shape[0], heads, -1).permute(1, 2, 0).contiguous()


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
    """All B prompts of one image in one pass: the exported decoder graph.

    Inputs: features with batch 1; point_coords (B, P, 2) float32 in SAM input pixels; point_labels (B, P) int32;
    optionally mask_input (B, 1, S/4, S/4) float32 logits (a previous low-res mask) with has_mask_input (B,)
    float32 in {0, 1} choosing, per prompt, between the mask's embedding and sam2's "no mask" embedding.
    Returns (single_masks (B, 1, S/4, S/4), single_iou (B, 1), multi_masks (B, 3, S/4, S/4), multi_iou (B, 3)):
    the decoder runs once and both of sam2's output selections are applied to it (single = with
    dynamic multimask-via-stability, as ``predict(multimask_output=False)``). Without mask inputs the masks come
    from ``PromptDecoder`` (float32).
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
    """sam2's ``MaskDecoder.predict_masks`` for B prompts on one image without mask inputs, through ``PromptDecoder``
    (float32, one pass): sparse (B, P', C) → masks (B, M, 4h, 4w) logits and iou (B, M), M = 1 + num_multimask_outputs.
    """
    return PromptDecoder(sam).decode_sparse(image_embed, high_res_0, high_res_1, sparse, "all")
