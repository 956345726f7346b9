"""The sums of squares the full-width QK norm needs from every rank (tensor parallelism): per token,
float32 sum of q^2 and of k^2 over this rank's heads, read from the q/k/v projection's output row
in place, into one [T, 2] tensor (one all-reduce instead of two). The norm itself and RoPE run inside
the decode attention kernel (kernels/paged_decode.py, qkv_decode)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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
