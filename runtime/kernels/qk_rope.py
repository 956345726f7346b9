"""The QK norm and RoPE outside the decode attention kernel.

- qkv_sum_squares: the sums of squares the full-width QK norm needs from every rank (tensor
  parallelism): per token, float32 sum of q^2 and of k^2 over this rank's heads, read from the q/k/v
  projection's output row in place, into one [T, 2] tensor (one all-reduce instead of two). At decode
  the norm itself and RoPE run inside the attention kernel (kernels/paged_decode.py, qkv_decode).
- norm_rope: for prefill chunks, the QK norm and RoPE of every token in one launch (a dozen PyTorch
  ops and their float32 copies otherwise)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_decode import _roped, _row_ssq


@triton.jit
def _qkv_ssq_kernel(QKV, Out, R: tl.constexpr, WQ: tl.constexpr, WK: tl.constexpr, BW: tl.constexpr):
    t, which = tl.program_id(0), tl.program_id(1)
    start = which * WQ
    width = WQ if which == 0 else WK
    acc = tl.zeros([BW], tl.float32)
    for w0 in range(0, tl.maximum(WQ, WK), BW):
        ws = w0 + tl.arange(0, BW)
        x = tl.load(QKV + t * R + start + ws, mask=ws < width, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(Out + t * 2 + which, tl.sum(acc, 0))


def qkv_sum_squares(qkv: torch.Tensor, q_width: int, k_width: int) -> torch.Tensor:
    """qkv [T, q_width + k_width + v] -> float32 [T, 2]: each token's sum of q^2 and of k^2."""
    T = qkv.shape[0]
    out = torch.empty(T, 2, dtype=torch.float32, device=qkv.device)
    _qkv_ssq_kernel[(T, 2)](qkv.contiguous(), out, R=qkv.shape[1], WQ=q_width, WK=k_width, BW=1024, num_warps=4)
    return out


@triton.jit
def _norm_rope_kernel(Q, K, SSQ, QW, KW, Pos, InvFreq, QOut, KOut, stride_q, stride_k, q_width, k_width, eps,
                      NH: tl.constexpr, NKV: tl.constexpr, HAS_SSQ: tl.constexpr, RD: tl.constexpr,
                      D: tl.constexpr, HB: tl.constexpr, BW: tl.constexpr):
    """One token: the QK norm (sums of squares of its own q and k rows, or the all-reduced ones in
    SSQ [T, 2]), then RoPE, HB heads at a time, as paged_decode's _roped rounds them."""
    t = tl.program_id(0).to(tl.int64)
    if HAS_SSQ:
        qs = tl.load(SSQ + t * 2)
        ks = tl.load(SSQ + t * 2 + 1)
    else:
        qs = _row_ssq(Q, t * stride_q, NH * D, BW)
        ks = _row_ssq(K, t * stride_k, NKV * D, BW)
    pos_f = tl.load(Pos + t).to(tl.float32)
    d = tl.arange(0, D)
    hb = tl.arange(0, HB)
    q_inv = 1.0 / tl.sqrt(qs / q_width + eps)
    k_inv = 1.0 / tl.sqrt(ks / k_width + eps)
    for h0 in range(0, NH, HB):
        heads = h0 + hb
        m = (heads < NH)[:, None] & (d < D)[None, :]
        r = _roped(Q, QW, pos_f, InvFreq, t * stride_q, heads, d, q_inv, m, D, RD)
        tl.store(QOut + t * (NH * D) + heads[:, None] * D + d[None, :], r, mask=m)
    for h0 in range(0, NKV, HB):
        heads = h0 + hb
        m = (heads < NKV)[:, None] & (d < D)[None, :]
        r = _roped(K, KW, pos_f, InvFreq, t * stride_k, heads, d, k_inv, m, D, RD)
        tl.store(KOut + t * (NKV * D) + heads[:, None] * D + d[None, :], r, mask=m)


def norm_rope(q: torch.Tensor, k: torch.Tensor, ssq: torch.Tensor | None, q_norm: torch.Tensor,
              k_norm: torch.Tensor, q_width: float, k_width: float, eps: float, positions: torch.Tensor,
              inv_freq: torch.Tensor, rotary_dim: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """export/model.py QkRope for many tokens in one launch: q [T, Hq * D], k [T, Hkv * D] (rows may
    be strided views of one q/k/v product), ssq [T, 2] float32 (the all-reduced sums with TP; None: sum
    this rank's rows, TP=1) -> q [T, Hq, D], k [T, Hkv, D] in q's dtype. D a power of two."""
    T = q.shape[0]
    nh, nkv = q.shape[1] // head_dim, k.shape[1] // head_dim
    assert q.stride(1) == 1 and k.stride(1) == 1
    q_out = torch.empty(T, nh, head_dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(T, nkv, head_dim, dtype=q.dtype, device=q.device)
    _norm_rope_kernel[(T,)](q, k, q if ssq is None else ssq.contiguous(), q_norm, k_norm, positions, inv_freq,
                            q_out, k_out, q.stride(0), k.stride(0), float(q_width), float(k_width), float(eps),
                            NH=nh, NKV=nkv, HAS_SSQ=ssq is not None, RD=rotary_dim, D=head_dim, HB=8, BW=1024,
                            num_warps=4)
    return q_out, k_out
