"""The attention's QK norm and partial RoPE at decode sizes, in two Triton kernels instead of ~40
PyTorch ops (casts, rsqrt, products, cos/sin, slices, concatenations):

- sum_squares: per token, the float32 sums of squares of this rank's q and k (what the full-width
  QK norm all-reduces across ranks with TP).
- norm_rope: per (token, head): x * rsqrt(ssq / width + eps) rounded to the activations' dtype, times
  the norm weight (rounded again), then neox RoPE on the first rotary_dim dims with cos/sin of
  position * inv_freq rounded to the activations' dtype, each product and the sum rounded as
  PyTorch rounds them (export/model.py: QkRope, apply_rope). The partner dims of the rotation are
  read again from memory rather than moved between registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TOKENS = 64  # the PyTorch ops are launch-bound below this; above, they are cheap per token


@triton.jit
def _row_sum_squares(X, Out, t, W: tl.constexpr, BW: tl.constexpr):
    acc = tl.zeros([BW], tl.float32)
    for w0 in range(0, W, BW):
        ws = w0 + tl.arange(0, BW)
        x = tl.load(X + t * W + ws, mask=ws < W, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(Out + t, tl.sum(acc, 0))


@triton.jit
def _sum_squares_kernel(Q, K, QS, KS, WQ: tl.constexpr, WK: tl.constexpr, BW: tl.constexpr):
    t, which = tl.program_id(0), tl.program_id(1)
    if which == 0:
        _row_sum_squares(Q, QS, t, WQ, BW)
    else:
        _row_sum_squares(K, KS, t, WK, BW)


@triton.jit
def _normed(X, Wn, t, head, d, inv, m, HEADS: tl.constexpr, HD: tl.constexpr):
    x = tl.load(X + (t * HEADS + head) * HD + d, mask=m, other=0.0)
    xn = (x.to(tl.float32) * inv).to(x.dtype).to(tl.float32)
    return (tl.load(Wn + head * HD + d, mask=m, other=0.0).to(tl.float32) * xn).to(x.dtype).to(tl.float32)


@triton.jit
def _norm_rope_kernel(X, SSQ, Wn, Pos, InvFreq, Out, width, eps, HEADS: tl.constexpr, HD: tl.constexpr,
                      RD: tl.constexpr, BD: tl.constexpr):
    t, head = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, BD)
    m = d < HD
    inv = 1.0 / tl.sqrt(tl.load(SSQ + t) / width + eps)
    xn = _normed(X, Wn, t, head, d, inv, m, HEADS, HD)
    half = RD // 2
    rot = d < RD
    partner = tl.where(d < half, d + half, d - half)
    other = _normed(X, Wn, t, head, partner, inv, m & rot, HEADS, HD)
    rotated = tl.where(d < half, -other, other)
    freq = tl.load(InvFreq + (d % half), mask=m & rot, other=0.0)
    angle = tl.load(Pos + t).to(tl.float32) * freq
    dt = Out.dtype.element_ty
    cos = tl.cos(angle).to(dt).to(tl.float32)
    sin = tl.sin(angle).to(dt).to(tl.float32)
    roped = ((xn * cos).to(dt).to(tl.float32) + (rotated * sin).to(dt).to(tl.float32)).to(dt)
    tl.store(Out + (t * HEADS + head) * HD + d, tl.where(rot, roped, xn.to(dt)), mask=m)


def sum_squares(q: torch.Tensor, k: torch.Tensor):
    """q [T, Wq], k [T, Wk] -> float32 sums of squares [T, 1] each."""
    T = q.shape[0]
    qs = torch.empty(T, 1, dtype=torch.float32, device=q.device)
    ks = torch.empty_like(qs)
    _sum_squares_kernel[(T, 2)](q.contiguous(), k.contiguous(), qs, ks, WQ=q.shape[1], WK=k.shape[1], BW=1024,
                                num_warps=4)
    return qs, ks


def norm_rope(x: torch.Tensor, ssq: torch.Tensor, weight: torch.Tensor, width: float, eps: float,
              positions: torch.Tensor, inv_freq: torch.Tensor, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """x [T, heads * head_dim] -> normed and rotated [T, heads, head_dim]; ssq [T, 1] float32 (summed
    over the full width with TP), weight [heads * head_dim] (this rank's heads)."""
    T = x.shape[0]
    heads = x.shape[1] // head_dim
    out = torch.empty(T, heads, head_dim, dtype=x.dtype, device=x.device)
    _norm_rope_kernel[(T, heads)](x.contiguous(), ssq.contiguous(), weight, positions.contiguous(), inv_freq, out,
                                  float(width), eps, HEADS=heads, HD=head_dim, RD=rotary_dim,
                                  BD=triton.next_power_of_2(head_dim), num_warps=1)
    return out
