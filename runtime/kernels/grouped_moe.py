"""The MoE for many tokens (prefill) at top-k cost, as two grouped-GEMM Triton kernels.

The (token, choice) pairs are ordered by expert and each expert's group is padded to a block of BM
rows, so every block belongs to one expert: one GEMM tile per (block, column block) reads that
expert's weights once for up to BM tokens, on tensor cores, accumulating in float32. Only the top-k
work is done (the dense form runs every expert on every token: E/k times the FLOPs) and nothing of
size [experts, hidden, tokens] is made. Static sizes throughout: the pair list has room for
T*k + E*(BM-1) rows, and blocks past the last used one exit at once (no host sync).

- up:   per block of pairs: a = silu(x W1^T) * (x W3^T), stored in the input dtype
- down: per block of pairs: o = weight * (a W2^T), one row per pair in the input dtype (the model's
  own combine adds bf16 weighted expert outputs; half the bytes of float32 rows)
- the k rows of each token are summed in float32 in a fixed order (deterministic, no atomics).
The pairs are ordered by expert with three small kernels (count per chunk, offsets, place), not a
sort: a handful of launches instead of a dozen PyTorch ops.
"""
from __future__ import annotations

from dataclasses import dataclass

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
        tl.store(O + rows[:, None] * H + cols[None, :], (acc * weight[:, None]).to(O.dtype.element_ty), mask=valid[:, None] & cmask[None, :])


@triton.jit
def _count_kernel(Experts, Counts, P, EP: tl.constexpr, CH: tl.constexpr, SUB: tl.constexpr):
    """Counts[c, e]: the pairs of chunk c (CH pairs) on expert e."""
    c = tl.program_id(0)
    es = tl.arange(0, EP)
    n = tl.zeros([EP], tl.int32)
    for s0 in range(0, CH, SUB):
        i = c * CH + s0 + tl.arange(0, SUB)
        e = tl.load(Experts + i, mask=i < P, other=EP)         # past the end: no expert's bin
        n += tl.sum((e[:, None] == es[None, :]).to(tl.int32), 0)
    tl.store(Counts + c * EP + es, n)


@triton.jit
def _offsets_kernel(Counts, Offsets, BlockExpert, NCHUNKS, NBLOCKS, E, EP: tl.constexpr, B: tl.constexpr,
                    CB: tl.constexpr):
    """One program: each expert's first row (its group padded to B rows, experts in order), each
    chunk's first row within its experts' groups (Offsets[c, e]), and each block's expert."""
    es = tl.arange(0, EP)
    total = tl.zeros([EP], tl.int32)
    for c in range(0, NCHUNKS):
        total += tl.load(Counts + c * EP + es)
    padded = (total + B - 1) // B * B
    ends = tl.cumsum(padded, 0)
    run = ends - padded                                        # each expert's first row
    for c in range(0, NCHUNKS):
        tl.store(Offsets + c * EP + es, run)
        run += tl.load(Counts + c * EP + es)
    ends = tl.where(es < E, ends, 2147483647)                  # padding bins own no block
    for b0 in range(0, NBLOCKS, CB):
        b = b0 + tl.arange(0, CB)
        owner = tl.sum((ends[None, :] <= (b * B)[:, None]).to(tl.int32), 1)
        tl.store(BlockExpert + b, tl.where(owner < E, owner, -1), mask=b < NBLOCKS)


@triton.jit
def _place_kernel(Experts, Offsets, Pairs, P, EP: tl.constexpr, CH: tl.constexpr, SUB: tl.constexpr):
    """Pairs[row] = pair for every pair of chunk c, in pair order within each expert's group (the
    order of a stable sort by expert)."""
    c = tl.program_id(0)
    es = tl.arange(0, EP)
    base = tl.load(Offsets + c * EP + es)
    for s0 in range(0, CH, SUB):
        i = c * CH + s0 + tl.arange(0, SUB)
        e = tl.load(Experts + i, mask=i < P, other=EP)
        onehot = (e[:, None] == es[None, :]).to(tl.int32)     # [SUB, EP]
        before = tl.cumsum(onehot, 0) - onehot                 # same-expert pairs before it in the tile
        row = tl.sum(onehot * (before + base[None, :]), 1)
        tl.store(Pairs + row, i, mask=i < P)
        base += tl.sum(onehot, 0)


def align_by_expert(experts: torch.Tensor, num_experts: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs (token * k + choice) ordered by expert (stably), each expert's group padded to `block`
    rows with the sentinel T*k, in a buffer of T*k + E*(block-1) rows (rounded up to blocks); and each
    block's expert (-1 past the last used block). Three small kernels and a fill, fixed sizes, no host
    sync (capturable in a CUDA graph)."""
    flat = experts.reshape(-1).to(torch.int32).contiguous()
    tk, dev = flat.numel(), flat.device
    n_rows = -(-(tk + num_experts * (block - 1)) // block) * block
    ep = triton.next_power_of_2(num_experts)
    ch = 1024 if ep <= 256 else 256                             # a chunk's [SUB, EP] tiles stay small
    n_chunks = triton.cdiv(tk, ch)
    counts = torch.empty(n_chunks, ep, dtype=torch.int32, device=dev)
    offsets = torch.empty_like(counts)
    pairs = torch.full((n_rows,), tk, dtype=torch.int32, device=dev)
    block_expert = torch.empty(n_rows // block, dtype=torch.int32, device=dev)
    sub = 64 if ep <= 256 else 16
    _count_kernel[(n_chunks,)](flat, counts, tk, EP=ep, CH=ch, SUB=sub)
    _offsets_kernel[(1,)](counts, offsets, block_expert, n_chunks, n_rows // block, num_experts, EP=ep, B=block,
                          CB=32)
    _place_kernel[(n_chunks,)](flat, offsets, pairs, tk, EP=ep, CH=ch, SUB=sub)
    return pairs, block_expert


@dataclass(frozen=True)
class Tiles:
    """Rows per block of pairs, and each kernel's (BN, BK, warps, stages)."""
    block: int = 64
    up: tuple[int, int, int, int] = (64, 64, 4, 3)
    down: tuple[int, int, int, int] = (64, 64, 4, 3)


def default_tiles(inter: int, dtype: torch.dtype) -> Tiles:
    """bf16 tiles from a sweep on an H200 (docs/BENCHMARKS.md, prefill) at one TP=8 rank's experts
    (I=192) and at TP=1 (I=1536), 2048 and 8192 tokens: blocks of 128 pairs (about one block per
    expert at 2048 tokens: each expert's weights read once), wide column tiles for wide experts.
    float32 (the interpreter's exact runs) keeps small tiles."""
    if dtype == torch.float32:
        return Tiles()
    if inter >= 1024:
        return Tiles(128, (128, 64, 8, 4), (256, 64, 8, 3))
    return Tiles(128, (64, 128, 8, 3), (256, 64, 8, 3))


def grouped_moe(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor, tiles: Tiles | None = None) -> torch.Tensor:
    """x [T, H]; experts [T, k] local expert ids; weights [T, k] float32 (zero for experts not on
    this rank); w13 [E, 2I, H], w2 [E, H, I] -> [T, H] float32, the weighted sum of the experts.
    tiles: default_tiles(I, dtype) unless given."""
    T, H = x.shape
    k = experts.shape[1]
    E, inter = w13.shape[0], w2.shape[2]
    tiles = tiles or default_tiles(inter, x.dtype)
    block = tiles.block
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    pairs, block_expert = align_by_expert(experts, E, block)
    ieee = x.dtype == torch.float32  # float32 runs (tests) stay exact; bf16 takes the tensor cores
    a = torch.empty(T * k, inter, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = tiles.up
    _up_kernel[(block_expert.numel(), triton.cdiv(inter, bn))](
        x, pairs, block_expert, w13, a, w13.stride(0), w13.stride(1), T * k, H=H, INTER=inter, K=k, BM=block,
        BN=bn, BK=bk, IEEE=ieee, num_warps=warps, num_stages=stages)
    o = torch.empty(T * k, H, dtype=x.dtype, device=x.device)  # weighted, as the model's own bf16 combine
    bn, bk, warps, stages = tiles.down
    _down_kernel[(block_expert.numel(), triton.cdiv(H, bn))](
        a, pairs, block_expert, weights.reshape(-1).float().contiguous(), w2, o, w2.stride(0), w2.stride(1), T * k,
        H=H, INTER=inter, BM=block, BN=bn, BK=bk, IEEE=ieee, num_warps=warps, num_stages=stages)
    return o.view(T, k, H).sum(1, dtype=torch.float32)
