"""The torch backend's GPU kernels behind the manifest's MoE pieces (steps that are not decode layers):
the residual add, post norm and router (its fused kernel up to its token limit, PyTorch's ops beyond),
then the experts through the kernel the step's plan names (runtime/dispatch.py): the fused gather
GEMVs (kernels/fused_moe.py) or the grouped GEMMs (kernels/grouped_moe.py). Every MoE form computes
the same function, so the pieces' form only names the subgraph."""
from __future__ import annotations

import torch

from export.model import Moe, rms_norm

from . import profile_ranges
from .dispatch import BackendKernels
from .kernels import fused_moe, grouped_moe, moe_route

GATHER_TOKENS = 64  # the fused gather kernels beat the grouped GEMMs up to here (bench/moe.py measures)


def offered(decode_tokens: int) -> BackendKernels:
    """What the torch backend offers the dispatch with these kernels (and decode layers up to
    decode_tokens, 0 for none)."""
    return BackendKernels(decode_tokens=decode_tokens, moe_kernels=True, gather_tokens=GATHER_TOKENS)


def moe(m: Moe, h: torch.Tensor, attn_out: torch.Tensor, kernel: str):
    """Moe.forward with the experts through `kernel` ("gather" or "grouped")."""
    if h.shape[0] <= moe_route.MAX_TOKENS:
        with profile_ranges.span(profile_ranges.ROUTER):
            h, x, idx, weights = moe_route.route_top_k(h, attn_out, m.norm, m.eps, m.gate, m.bias, m.top_k)
    else:  # the gate's cuBLAS GEMM reads it once for all tokens
        h = h + attn_out
        x = rms_norm(h, m.norm, m.eps)
        with profile_ranges.span(profile_ranges.ROUTER):
            idx, weights = m.route(x)
    with profile_ranges.span(profile_ranges.EXPERTS):
        local, weights = m.local_experts(idx, weights)
        if kernel == "gather":
            return h, fused_moe.gather_moe(x, local, weights, m.w13, m.w2, out_dtype=h.dtype)
        return h, grouped_moe.grouped_moe(x, local, weights, m.w13, m.w2).to(h.dtype)
