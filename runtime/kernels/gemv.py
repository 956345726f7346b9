"""The products of one-token decode steps against a stored [out, in] weight, as one Triton GEMV,
optionally with the residual add and RMSNorm before it:

    linear(x, w)                  -> x @ w.T                       (o_proj)
    norm_linear(a, b, norm, w)    -> (h = a + b, rms_norm(h) @ w.T) (the attention's input norm + q/k/v)

Memory-bound: each program reads a block of weight rows once, float32 accumulation. With the norm,
one pass: every program sums h's squares while it multiplies (a few KB of reloads next to its
weight rows) and scales its sums by 1/rms at the end, so the norm costs neither a launch nor a
pass before the weights stream; the first block of rows writes h. The normed activations are not
rounded to bf16 before the product, as the reference does twice: their relative rounding (2^-9 per
element, random) moves a sum of K such products far less than the output's own rounding (2^-8).
h is rounded as PyTorch rounds it (bit-equal).

Steps of more than one token take cuBLAS (with moe_route.add_rms_norm, one launch, before it): a sweep on an
H200 found it faster from two tokens on than Triton tiles of tokens or a program per token.
Block sizes come from the shapes and the SM count alone, never from timing: with tensor
parallelism every rank must compute its replicated values the same way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import moe_route, sm_count


@triton.jit
def _gemv_kernel(A, B, Wn, W, Out, Hout, eps, N: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr):
    nb = tl.program_id(0)
    ns = nb * BN + tl.arange(0, BN)
    nmask = ns < N
    acc = tl.zeros([BN], tl.float32)
    ssq = tl.zeros([BK], tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        a = tl.load(A + ks, mask=kmask, other=0.0)
        x = a.to(tl.float32)
        if NORM:
            h = (x + tl.load(B + ks, mask=kmask, other=0.0).to(tl.float32)).to(a.dtype)
            if nb == 0:
                tl.store(Hout + ks, h, mask=kmask)
            x = h.to(tl.float32)
            ssq += x * x
            x = x * tl.load(Wn + ks, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(W + ns[:, None] * K + ks[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], 1)
    if NORM:
        acc = acc / tl.sqrt(tl.sum(ssq, 0) / K + eps)
    tl.store(Out + ns, acc.to(Out.dtype.element_ty), mask=nmask)


def blocks(N: int, K: int, device: torch.device) -> tuple[int, int, int]:
    """(rows, columns a load, warps): 2 rows a program; where that gives few programs (at most 8 per
    SM) all of a row's columns in one load (up to 4096) and 8 warps, so each program has its whole
    share in flight, else 1024 columns and 4 warps. A sweep on an H200 with cold weights (2/4/8 rows,
    1024..4096 columns, 4/8 warps) at N x K = 1024 x 3072, 3072 x 768, 8192 x 3072, 3072 x 6144 found
    this the best at each: 4.2, 3.1, 13.6, 11.3 us, against 5.2, 3.8, 18.4, 15.7 for the rule before
    (2-8 rows for two programs per SM, 1024 columns, 8 warps)."""
    bn = 2
    if N // bn <= 8 * sm_count(device):
        return bn, min(4096, triton.next_power_of_2(K)), 8
    return bn, min(1024, triton.next_power_of_2(K)), 4


def _gemv(a, b, norm, w, eps, out_dtype, config):
    K = a.shape[1]
    N = w.shape[0]
    out = torch.empty(1, N, dtype=out_dtype or a.dtype, device=a.device)
    h = torch.empty_like(a) if norm is not None else out
    BN, BK, warps = config or blocks(N, K, a.device)
    a = a.contiguous()
    _gemv_kernel[(triton.cdiv(N, BN),)](a, a if b is None else b.contiguous(), w if norm is None else norm, w, out,
                                        h, float(eps), N=N, K=K, NORM=norm is not None, BN=BN, BK=BK,
                                        num_warps=warps)
    return h, out


def linear(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None = None, config=None) -> torch.Tensor:
    """x [T, K] @ w[N, K].T -> [T, N] (F.linear). config: blocks() to use instead."""
    if x.shape[0] != 1:
        return F.linear(x, w) if out_dtype in (None, x.dtype) else F.linear(x, w).to(out_dtype)
    return _gemv(x, None, None, w.contiguous(), 0.0, out_dtype, config)[1]


def norm_linear(a: torch.Tensor, b: torch.Tensor, norm: torch.Tensor, eps: float, w: torch.Tensor, config=None):
    """h = a + b and rms_norm(h) * norm @ w.T: (h [T, K], [T, N]) in a's dtype."""
    if a.shape[0] != 1:
        h, x = moe_route.add_rms_norm(a, b, norm, eps)
        return h, F.linear(x, w)
    return _gemv(a, b, norm, w.contiguous(), eps, None, config)
