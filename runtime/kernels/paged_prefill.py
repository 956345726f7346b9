"""Prefill attention over the paged KV cache, as one Triton kernel (flash-attention-2 style).

Each program takes BM rows of one sequence -- BM // G queries times the G query heads of one KV head
(grouped-query attention: every key tile is read once for the group) -- and walks that sequence's keys
BN at a time through its block table, with an online softmax in float32 (base 2: the scale folded
with log2(e), one exp2 a score): the chunk's queries see every cached key before them and, causally,
the chunk's own. Nothing is copied out of the cache and no [queries, keys] matrix is made. The walk
has two loops: the keys every query of the tile sees (no masks: at long context nearly all of them),
then the tiles on the causal diagonal, masked. Queries of several sequences are packed one after
another, as the runtime packs a step; query j of a sequence with `q_len` new tokens and `ctx` cached
ones sits at position ctx - q_len + j.

Where the tiles are too few to fill the GPU (short chunks, or one TP=8 rank's single KV head) and
the context is long, each tile's keys are split over several programs, whose normalized partial
outputs and log-sum-exps are merged by the decode attention's merge kernel (split-KV).

Tiles: chosen by a sweep on an H200 (12 tile shapes, both model widths, five chunk/context shapes;
docs/BENCHMARKS.md, prefill); `tiles=` and `split=` override them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import sm_count
from .paged_decode import _merge_kernel

LOG2E = 1.4426950408889634


@triton.jit
def _tile(q, qk_scale, K, V, Tables, seq, n0, stride_tb, stride_kb, stride_ks, kvh_off, d, m_i, l_i, acc, pos, last,
          BS: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """One BN-key tile of the online softmax (scores already in base 2)."""
    j = n0 + tl.arange(0, BN)
    if MASKED:
        jmask = j < last
        block = tl.load(Tables + seq * stride_tb + j // BS, mask=jmask, other=0).to(tl.int64)
    else:
        block = tl.load(Tables + seq * stride_tb + j // BS).to(tl.int64)
    kv_off = block * stride_kb + (j % BS) * stride_ks + kvh_off
    if MASKED:
        k = tl.load(K + kv_off[None, :] + d[:, None], mask=jmask[None, :], other=0.0)  # [D, BN]
    else:
        k = tl.load(K + kv_off[None, :] + d[:, None])
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee") * qk_scale
    else:
        s = tl.dot(q, k) * qk_scale
    if MASKED:
        s = tl.where((j[None, :] <= pos[:, None]) & jmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = m_new
    if MASKED:  # a row with no key yet (a split share before its position): exp2(-inf) = 0, not NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(V + kv_off[:, None] + d[None, :], mask=jmask[:, None], other=0.0)  # [BN, D]
    else:
        v = tl.load(V + kv_off[:, None] + d[None, :])
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(Q, K, V, Out, Part, Lse, Tables, QStart, QLen, Ctx, qk_scale, n_split, stride_tb,
                    stride_kb, stride_ks, stride_kh, HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                    BS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr,
                    IEEE: tl.constexpr):
    # One KV head's GROUP query heads share a tile: its BM rows are QB queries x GROUP heads (row r is
    # query r // GROUP, head r % GROUP), so each key tile is read once for the whole group.
    QB: tl.constexpr = BM // GROUP
    kvh, qb, pid2 = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, sp = pid2 // n_split, pid2 % n_split
    q_len = tl.load(QLen + seq)
    if qb * QB < q_len:
        ctx = tl.load(Ctx + seq)
        q0 = tl.load(QStart + seq)
        r = tl.arange(0, BM)
        qi = qb * QB + r // GROUP                                  # each row's query
        rmask = (r < QB * GROUP) & (qi < q_len)
        pos = ctx - q_len + qi                                     # each row's position
        d = tl.arange(0, D)
        head = kvh * GROUP + r % GROUP
        q_off = (q0 + qi)[:, None].to(tl.int64) * (HQ * D) + head[:, None] * D + d[None, :]
        q = tl.load(Q + q_off, mask=rmask[:, None], other=0.0)
        kvh_off = kvh * stride_kh
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        first = ctx - q_len + qb * QB                              # the tile's first query's position
        last = tl.minimum(ctx, first + QB)                         # keys past its last query: masked
        full = (first + 1) // BN * BN                              # keys 0..first are seen by every row
        lo, hi = 0, last
        if SPLIT:                                                  # this program's share of the keys
            span = tl.cdiv(tl.cdiv(last, n_split), BN) * BN
            lo = sp * span
            hi = tl.minimum(lo + span, last)
        for n0 in range(lo, tl.minimum(full, hi), BN):
            m_i, l_i, acc = _tile(q, qk_scale, K, V, Tables, seq, n0, stride_tb, stride_kb, stride_ks, kvh_off, d,
                                  m_i, l_i, acc, pos, last, BS=BS, BN=BN, MASKED=False, IEEE=IEEE)
        for n0 in range(tl.maximum(full, lo), hi, BN):
            m_i, l_i, acc = _tile(q, qk_scale, K, V, Tables, seq, n0, stride_tb, stride_kb, stride_ks, kvh_off, d,
                                  m_i, l_i, acc, pos, last, BS=BS, BN=BN, MASKED=True, IEEE=IEEE)
        if SPLIT:  # normalized partial and its log2-sum-exp; an empty share gets weight 0 in the merge
            row = ((q0 + qi) * HQ + head).to(tl.int64) * n_split + sp
            has = l_i > 0
            tl.store(Lse + row, tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf")),
                     mask=rmask)
            tl.store(Part + row[:, None] * D + d[None, :], acc / tl.where(has, l_i, 1.0)[:, None],
                     mask=rmask[:, None])
        else:
            tl.store(Out + q_off, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=rmask[:, None])


# (BM, BN, warps, stages) for bf16 on tensor cores, from the sweep (docs/BENCHMARKS.md, prefill);
# float32 (the CPU interpreter's exact runs) takes small tiles.
TILES = {"bf16": (128, 64, 4, 3), "fp32": (64, 64, 4, 1)}
MIN_SPLIT_KEYS = 2048  # keys per program at least, when the keys are split over programs


def choose_split(programs: int, max_ctx: int, device) -> int:
    """Key splits for a grid of `programs` tiles: up to about twelve waves of the GPU's SMs, where
    contexts are long enough to share. A few programs over long keys leave most SMs idle, and causal
    tiles differ in length, so many short programs balance best (the sweep: one TP=8 rank's single KV
    head, 2048 queries at 128K context, 5.7 ms unsplit, 2.8 ms in 6 splits, 2.2 ms in 16). A power of
    two: few kernel variants, and few CUDA graphs of prefill chunks (each split is one graph)."""
    if device.type != "cuda":
        return 1
    target = 12 * sm_count(device)
    split = max(1, min(target // programs, max_ctx // MIN_SPLIT_KEYS))
    return 1 << (split.bit_length() - 1)


def _grid(q_heads: int, kv_heads: int, max_q_len: int, bm: int) -> tuple[int, int]:
    """(KV heads, query tiles): a tile holds BM // group queries times the group's heads."""
    group = q_heads // kv_heads
    return kv_heads, triton.cdiv(max_q_len, max(bm, triton.next_power_of_2(group)) // group)


def key_split(q_heads: int, kv_heads: int, max_q_len: int, seqs: int, max_ctx: int, dtype: torch.dtype,
              device: torch.device) -> int:
    """The split of the keys paged_prefill chooses by default (its TILES) for a step of this shape: a
    CUDA graph fixes it at capture (runtime/prefill_graphs.py) and reads the context from the device."""
    bm = TILES["fp32" if dtype == torch.float32 else "bf16"][0]
    h, t = _grid(q_heads, kv_heads, max_q_len, bm)
    return choose_split(h * t * seqs, max_ctx, device)


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  q_starts: torch.Tensor, q_lens: torch.Tensor, context_lens: torch.Tensor, max_q_len: int,
                  scale: float, tiles: tuple[int, int, int, int] | None = None, max_ctx: int | None = None,
                  split: int | None = None) -> torch.Tensor:
    """q [T, Hq, d] packed (sequence after sequence); k_cache/v_cache [blocks, block_size, Hkv, d]
    (this step's keys already written); per sequence, as int32 device tensors: block_tables [S, M],
    its first row in q, its query count, and its context (cached tokens after this step's writes);
    max_q_len: the largest query count; max_ctx: the longest context (None: no split of the keys);
    tiles: (BM, BN, warps, stages), default TILES; split: key splits, default choose_split
    -> [T, Hq * d]."""
    T, HQ, D = q.shape
    HKV, BS = k_cache.shape[2], k_cache.shape[1]
    ieee = q.dtype == torch.float32
    BM, BN, warps, stages = tiles or TILES["fp32" if ieee else "bf16"]
    group = HQ // HKV
    BM = max(BM, triton.next_power_of_2(group))                # at least one query a tile
    S = q_lens.numel()
    grid = _grid(HQ, HKV, max_q_len, BM)
    if split is None:
        split = choose_split(grid[0] * grid[1] * S, max_ctx, q.device) if max_ctx else 1
    out = torch.empty(T, HQ, D, dtype=q.dtype, device=q.device)
    part = lse = out
    if split > 1:
        part = torch.empty(T, HQ, split, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(T, HQ, split, dtype=torch.float32, device=q.device)
    q = q.contiguous()
    _prefill_kernel[(*grid, S * split)](
        q, k_cache, v_cache, out, part, lse, block_tables, q_starts, q_lens, context_lens, scale * LOG2E, split,
        block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), HQ=HQ, GROUP=group,
        D=D, BS=BS, BM=BM, BN=BN, SPLIT=split > 1, IEEE=ieee, num_warps=warps, num_stages=stages)
    if split > 1:
        _merge_kernel[(T, HQ)](part, lse, out, split, part.stride(0), part.stride(1), part.stride(2),
                               lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
                               D=D, SP=max(2, triton.next_power_of_2(split)), num_warps=4)
    return out.view(T, HQ * D)
