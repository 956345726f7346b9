"""One decoder layer of a decode step (one new token per sequence) in a handful of GPU kernels: the
torch backend's fast path for CUDA-graph buckets, in place of the manifest's per-piece steps.

    norm_linear     residual + delta, input RMSNorm, q/k/v as one product over one concatenated
                    weight (kernels/gemv.py)
      [TP > 1: sums of squares of q and k (one small kernel), all-reduced as one [B, 2] tensor]
    qkv_decode      QK norm + RoPE + the new k/v written into the paged cache + decode attention
                    over each sequence's blocks (two launches: partitions, merge; kernels/paged_decode.py)
    linear          o_proj (kernels/gemv.py)
      [TP > 1: all-reduce of the attention output]
    route           residual add, post RMSNorm, float32 router + sigmoid, biased top-k and
                    renormalisation (kernels/moe_route.py: one launch up to 32 tokens; beyond, the
                    norm, the gate as one cuBLAS GEMM and a top-k launch)
    gather_moe      the chosen experts' up projection + SiLU, then down + the weighted sum, rounded
                    once to the activations' dtype (two launches; kernels/fused_moe.py)
      [TP > 1: all-reduce of the MoE output]

Seven kernels a layer at TP = 1 and one token a sequence, nine from two sequences (cuBLAS and its
split-K reduce), twelve from 33 (route_many's four launches); one more and three all-reduces with
TP: the all-reduces stay where the manifest puts them (their fused one-shot forms need two GPUs to
test). Same arithmetic as the pieces (export/model.py) up to float32 summation order; rounding where
PyTorch rounds. The layer holds no weights of its own: it reads the pieces' parameters, and the
q/k/v weights become views of one concatenated tensor that the pieces use too (made once at load).
"""
from __future__ import annotations

import torch
from torch import nn

from export.manifest import AttentionStep, Manifest
from export.model import AttnIn, Moe, OProj, QkRope

from .dispatch import step_kind, step_layers
from .kernels import fused_moe, gemv, moe_route, paged_decode, qk_rope

MAX_TOKENS = 64  # decode layers' limit (gather_moe's GEMVs; route_top_k's counters up to 32 of them): larger
                 # steps run the manifest's steps


def layer_pattern(manifest: Manifest, n: int) -> list[str]:
    """The kinds of the manifest's steps of layer n, in order (what a decode layer replaces)."""
    return [step_kind(manifest, step) for step, layer in zip(manifest.steps, step_layers(manifest)) if layer == n]


# What a decode layer implements: the layout's steps of one layer (export/layout.py), per TP.
PATTERN_TP1 = ["attn", "attention", "post"]
PATTERN_TP = ["attn_in", "all_reduce:q_ssq,k_ssq", "qk_rope", "attention", "o_proj", "all_reduce:attn_out", "moe",
              "all_reduce:delta"]


class DecodeLayer:
    def __init__(self, attn_in: AttnIn, qk: QkRope, o: OProj, moe: Moe, attention: AttentionStep, tp: int):
        self.attn_in, self.qk, self.moe, self.tp = attn_in, qk, moe, tp
        self.wo = o.wo
        self.step = attention
        wq, wk, wv = attn_in.wq, attn_in.wk, attn_in.wv
        self.nq, self.nk = wq.shape[0], wk.shape[0]
        # One [q + k + v, H] weight; the pieces keep working on views of it (no second copy).
        self.w_qkv = torch.cat([wq, wk, wv])
        for name, view in (("wq", self.w_qkv[:self.nq]), ("wk", self.w_qkv[self.nq:self.nq + self.nk]),
                           ("wv", self.w_qkv[self.nq + self.nk:])):
            setattr(attn_in, name, nn.Parameter(view, requires_grad=False))
        self.expert_parallel = moe.w13.shape[0] != moe.num_experts

    @staticmethod
    def supported(cfg, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this config cannot take decode layers, or None."""
        if device.type != "cuda" or dtype != torch.bfloat16:
            return "decode layers run on a GPU in bfloat16"
        if cfg.head_dim & (cfg.head_dim - 1) or cfg.head_dim < 16:
            return f"head_dim {cfg.head_dim} is not a power of two >= 16 (the attention kernel's tiles)"
        if cfg.rotary_dim % 2:
            return f"rotary_dim {cfg.rotary_dim} is odd"
        return None

    def __call__(self, residual, delta, positions, slots, tables, context_lens, k_cache, v_cache, comm):
        a, qk = self.attn_in, self.qk
        h, qkv = gemv.norm_linear(residual, delta, a.norm, a.eps, self.w_qkv)
        ssq = None
        if self.tp > 1:  # the full-width QK norm needs every rank's sums of squares
            ssq = comm.all_reduce(qk_rope.qkv_sum_squares(qkv, self.nq, self.nk))
        attn = paged_decode.qkv_decode(qkv, ssq, qk.q_norm, qk.k_norm, qk.q_width, qk.k_width, qk.eps, positions,
                                 qk.inv_freq, qk.rotary_dim, slots, k_cache, v_cache, tables, context_lens,
                                 self.step.scale, self.step.num_heads)
        attn_out = gemv.linear(attn, self.wo)
        if self.tp > 1:
            attn_out = comm.all_reduce(attn_out)
        m = self.moe
        h, x, ids, weights = moe_route.route(h, attn_out, m.norm, m.eps, m.gate, m.bias, m.top_k)
        if self.expert_parallel:
            ids, weights = m.local_experts(ids, weights)
        out = fused_moe.gather_moe(x, ids, weights, m.w13, m.w2, out_dtype=h.dtype)
        if self.tp > 1:
            out = comm.all_reduce(out)
        return h, out


def build(manifest: Manifest, modules: dict[str, nn.Module], layer: int, tp: int) -> DecodeLayer | None:
    """A decode layer from one layer's pieces (the torch backend's modules by subgraph name), or None
    when the manifest lays the layer out otherwise than a decode layer computes."""
    pattern = layer_pattern(manifest, layer)
    p = f"layers.{layer}."
    attention = next(s for s in manifest.steps if isinstance(s, AttentionStep) and s.layer == layer)
    gather = [name for name, sg in manifest.subgraphs.items() if sg.layer == layer and sg.form is not None]
    if not gather:
        return None
    post = modules[gather[0]]  # any form: every form's module shares the layer's experts
    if tp == 1 and pattern == PATTERN_TP1:
        block = modules[p + "attn"]
        return DecodeLayer(block.attn_in, block.qk_rope, post.o_proj, post.moe, attention, tp)
    if tp > 1 and pattern == PATTERN_TP:
        return DecodeLayer(modules[p + "attn_in"], modules[p + "qk_rope"], modules[p + "o_proj"], post, attention, tp)
    return None
