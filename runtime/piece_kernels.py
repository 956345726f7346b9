"""The torch backend's GPU kernels behind the manifest's pieces in steps that are not decode layers
(prefill chunks, mixed steps):
- attention in: the residual add + input norm in one launch, cuBLAS q/k/v, then the QK norm + RoPE
  in one launch (kernels/qk_rope.py norm_rope), rounded as the pieces' PyTorch ops round;
- MoE: the residual add, post norm and router (kernels/moe_route.py route: its one-launch kernel up
  to its token limit, the norm kernel, cuBLAS gate GEMM and a top-k kernel beyond), then the experts through the kernel the step's plan names (runtime/dispatch.py): the fused
  gather GEMVs (kernels/fused_moe.py) or the grouped GEMMs (kernels/grouped_moe.py). Every MoE form
  computes the same function, so the pieces' form only names the subgraph."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from export.model import Moe

from . import profile_ranges
from .dispatch import BackendKernels
from .kernels import fused_moe, grouped_moe, moe_route, qk_rope

GATHER_TOKENS = 64  # the fused gather kernels beat the grouped GEMMs up to here (bench/moe.py measures)


def offered(decode_tokens: int) -> BackendKernels:
    """What the torch backend offers the dispatch with these kernels (and decode layers up to
    decode_tokens, 0 for none)."""
    return BackendKernels(decode_tokens=decode_tokens, moe_kernels=True, gather_tokens=GATHER_TOKENS)


def moe(m: Moe, h: torch.Tensor, attn_out: torch.Tensor, kernel: str):
    """Moe.forward with the experts through `kernel` ("gather" or "grouped")."""
    with profile_ranges.span(profile_ranges.ROUTER):
        h, x, idx, weights = moe_route.route(h, attn_out, m.norm, m.eps, m.gate, m.bias, m.top_k)
    with profile_ranges.span(profile_ranges.EXPERTS):
        local, weights = m.local_experts(idx, weights)
        if kernel == "gather":
            return h, fused_moe.gather_moe(x, local, weights, m.w13, m.w2, out_dtype=h.dtype)
        return h, grouped_moe.grouped_moe(x, local, weights, m.w13, m.w2).to(h.dtype)


def attention_in(m, piece: str, *args):
    """The "attn" piece (export/model.py AttnBlock, TP=1: args residual, delta, positions -> h, q, k, v)
    or the "qk_rope" piece (QkRope, TP>1: args q, k, q_ssq, k_ssq, positions -> q, k)."""
    if piece == "qk_rope":
        q, k, q_ssq, k_ssq, positions = args
        return _rope(m, q, k, torch.cat([q_ssq, k_ssq], 1), positions)
    residual, delta, positions = args
    a = m.attn_in
    h, x = moe_route.add_rms_norm(residual, delta, a.norm, a.eps)
    q, k, v = F.linear(x, a.wq), F.linear(x, a.wk), F.linear(x, a.wv)
    q, k = _rope(m.qk_rope, q, k, None, positions)
    return h, q, k, v.reshape(v.shape[0], -1, a.head_dim)


def _rope(qk, q, k, ssq, positions):
    return qk_rope.norm_rope(q, k, ssq, qk.q_norm, qk.k_norm, qk.q_width, qk.k_width, qk.eps, positions,
                             qk.inv_freq, qk.rotary_dim, qk.hd)
