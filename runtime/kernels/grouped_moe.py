"""The MoE for many tokens (prefill) at top-k cost, as two grouped-GEMM Triton kernels.

The (token, choice) pairs are ordered by expert and each expert's group is padded to a block of BM
rows, so every block belongs to one expert: one GEMM tile per (block, column block) reads that
expert's weights once for up to BM tokens, on tensor cores, accumulating in float32. Only the top-k
work is done (the dense form runs every expert on every token: E/k times the FLOPs) and nothing of
size [experts, hidden, tokens] is made. Static sizes throughout: the pair list has room for
T*k + E*(BM-1) rows, and blocks past the last used one exit at once (no host sync).

- up:   per block of pairs: a = silu(x W1^T) * (x W3^T), stored in the input dtype
- down: per block of pairs: o = weight * (a W2^T), float32, one row per pair
- the k rows of each token are summed in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _up_kernel(X, Pairs, BlockExpert, W13, A, stride_we, stride_wr, TK, H: tl.constexpr, INTER: tl.constexpr,
               K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(BlockExpert + pid_m).to(tl.int64)
    if e >= 0:
        pairs = tl.load(Pairs + pid_m * BM + tl.arange(0, BM))
        valid = pairs < TK
        tok = tl.where(valid, pairs // K, 0).to(tl.int64)
        cols = pid_n * BN + tl.arange(0, BN)
        cmask = cols < INTER
        base = W13 + e * stride_we
        acc1 = tl.zeros([BM, BN], tl.float32)
        acc3 = tl.zeros([BM, BN], tl.float32)
        for h0 in range(0, H, BK):
            hs = h0 + tl.arange(0, BK)
            hmask = hs < H
            x = tl.load(X + tok[:, None] * H + hs[None, :], mask=valid[:, None] & hmask[None, :], other=0.0)
            wm = hmask[:, None] & cmask[None, :]
            w1 = tl.load(base + cols[None, :] * stride_wr + hs[:, None], mask=wm, other=0.0)            # [BK, BN]
            w3 = tl.load(base + (cols + INTER)[None, :] * stride_wr + hs[:, None], mask=wm, other=0.0)
            if IEEE:
                acc1 += tl.dot(x, w1, input_precision="ieee")
                acc3 += tl.dot(x, w3, input_precision="ieee")
            else:
                acc1 += tl.dot(x, w1)
                acc3 += tl.dot(x, w3)
        a = acc1 * tl.sigmoid(acc1) * acc3
        rows = tl.where(valid, pairs, 0).to(tl.int64)
        tl.store(A + rows[:, None] * INTER + cols[None, :], a.to(A.dtype.element_ty),
                 mask=valid[:, None] & cmask[None, :])


@triton.jit
def _down_kernel(A, Pairs, BlockExpert, Wt, W2, O, stride_we, stride_wr, TK, H: tl.constexpr, INTER: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(BlockExpert + pid_m).to(tl.int64)
    if e >= 0:
        pairs = tl.load(Pairs + pid_m * BM + tl.arange(0, BM))
        valid = pairs < TK
        rows = tl.where(valid, pairs, 0).to(tl.int64)
        cols = pid_n * BN + tl.arange(0, BN)
        cmask = cols < H
        base = W2 + e * stride_we
        acc = tl.zeros([BM, BN], tl.float32)
        for i0 in range(0, INTER, BK):
            ks = i0 + tl.arange(0, BK)
            kmask = ks < INTER
            a = tl.load(A + rows[:, None] * INTER + ks[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
            w = tl.load(base + cols[None, :] * stride_wr + ks[:, None], mask=kmask[:, None] & cmask[None, :],
                        other=0.0)                                                                   # [BK, BN]
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        weight = tl.load(Wt + rows, mask=valid, other=0.0)
        tl.store(O + rows[:, None] * H + cols[None, :], acc * weight[:, None], mask=valid[:, None] & cmask[None, :])


def align_by_expert(experts: torch.Tensor, num_experts: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs (token * k + choice) ordered by expert, each expert's group padded to `block` rows
    with the sentinel T*k, in a buffer of T*k + E*(block-1) rows (rounded up to blocks); and each
    block's expert (-1 past the last used block). Device ops only."""
    flat = experts.reshape(-1)
    tk, dev = flat.numel(), flat.device
    # scatter_add, not bincount: a fixed output size and no host sync (capturable in a CUDA graph)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block - 1) // block * block
    starts = torch.cumsum(padded, 0) - padded                       # each expert's first row
    order = torch.argsort(flat, stable=True)
    first_of = torch.cumsum(counts, 0) - counts                     # each expert's first sorted pair
    sorted_e = flat[order]
    rank_in_group = torch.arange(tk, device=dev) - first_of[sorted_e]
    n_rows = -(-(tk + num_experts * (block - 1)) // block) * block
    pairs = torch.full((n_rows,), tk, dtype=torch.int32, device=dev)
    pairs[starts[sorted_e] + rank_in_group] = order.to(torch.int32)
    ends = torch.cumsum(padded // block, 0)                         # blocks used up to each expert
    owner = torch.searchsorted(ends, torch.arange(n_rows // block, device=dev), right=True)
    block_expert = torch.where(owner < num_experts, owner, -1).to(torch.int32)
    return pairs, block_expert


def grouped_moe(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor, block: int = 64, bn: int = 64, bk: int = 64, num_warps: int = 4,
                num_stages: int = 3) -> torch.Tensor:
    """x [T, H]; experts [T, k] local expert ids; weights [T, k] float32 (zero for experts not on
    this rank); w13 [E, 2I, H], w2 [E, H, I] -> [T, H] float32, the weighted sum of the experts."""
    T, H = x.shape
    k = experts.shape[1]
    E, inter = w13.shape[0], w2.shape[2]
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    pairs, block_expert = align_by_expert(experts, E, block)
    ieee = x.dtype == torch.float32  # float32 runs (tests) stay exact; bf16 takes the tensor cores
    a = torch.empty(T * k, inter, dtype=x.dtype, device=x.device)
    _up_kernel[(block_expert.numel(), triton.cdiv(inter, bn))](
        x, pairs, block_expert, w13, a, w13.stride(0), w13.stride(1), T * k, H=H, INTER=inter, K=k, BM=block,
        BN=bn, BK=bk, IEEE=ieee, num_warps=num_warps, num_stages=num_stages)
    o = torch.empty(T * k, H, dtype=torch.float32, device=x.device)
    _down_kernel[(block_expert.numel(), triton.cdiv(H, bn))](
        a, pairs, block_expert, weights.reshape(-1).float().contiguous(), w2, o, w2.stride(0), w2.stride(1), T * k,
        H=H, INTER=inter, BM=block, BN=bn, BK=bk, IEEE=ieee, num_warps=num_warps, num_stages=num_stages)
    return o.view(T, k, H).sum(1)
