"""Prefill attention over the paged KV cache, as one Triton kernel (flash-attention style).

Each program takes BM queries of one sequence and one query head and walks that sequence's keys
block by block through its block table, with an online softmax in float32: the chunk's queries see
every cached key before them and, causally, the chunk's own. Nothing is copied out of the cache and
no [queries, keys] matrix is made. Queries of several sequences are packed one after another, as the
runtime packs a step; query j of a sequence with `q_len` new tokens and `ctx` cached ones sits at
position ctx - q_len + j.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _prefill_kernel(Q, K, V, Out, Tables, QStart, QLen, Ctx, scale, stride_tb,
                    stride_kb, stride_ks, stride_kh, HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                    BS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    qb, seq, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_len = tl.load(QLen + seq)
    if qb * BM < q_len:
        ctx = tl.load(Ctx + seq)
        q0 = tl.load(QStart + seq)
        rows = qb * BM + tl.arange(0, BM)
        rmask = rows < q_len
        pos = ctx - q_len + rows                                   # each query's position
        d = tl.arange(0, D)
        q = tl.load(Q + (q0 + rows)[:, None].to(tl.int64) * (HQ * D) + h * D + d[None, :],
                    mask=rmask[:, None], other=0.0)
        kvh = h // GROUP
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        last = tl.minimum(ctx, ctx - q_len + (qb + 1) * BM)       # keys past the block's last query: masked
        for n0 in range(0, last, BN):
            j = n0 + tl.arange(0, BN)
            jmask = j < last
            block = tl.load(Tables + seq * stride_tb + j // BS, mask=jmask, other=0).to(tl.int64)
            kv_off = block * stride_kb + (j % BS) * stride_ks + kvh * stride_kh
            k = tl.load(K + kv_off[None, :] + d[:, None], mask=jmask[None, :], other=0.0)  # [D, BN]
            if IEEE:
                s = tl.dot(q, k, input_precision="ieee") * scale
            else:
                s = tl.dot(q, k) * scale
            s = tl.where((j[None, :] <= pos[:, None]) & jmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + kv_off[:, None] + d[None, :], mask=jmask[:, None], other=0.0)  # [BN, D]
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(Out + (q0 + rows)[:, None].to(tl.int64) * (HQ * D) + h * D + d[None, :],
                 out.to(Out.dtype.element_ty), mask=rmask[:, None])


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  q_starts: torch.Tensor, q_lens: torch.Tensor, context_lens: torch.Tensor, max_q_len: int,
                  scale: float) -> torch.Tensor:
    """q [T, Hq, d] packed (sequence after sequence); k_cache/v_cache [blocks, block_size, Hkv, d]
    (this step's keys already written); per sequence, as int32 device tensors: block_tables [S, M],
    its first row in q, its query count, and its context (cached tokens after this step's writes);
    max_q_len: the largest query count -> [T, Hq * d]."""
    T, HQ, D = q.shape
    HKV, BS = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty(T, HQ * D, dtype=q.dtype, device=q.device)
    BM, BN = 64, 64
    q = q.contiguous()
    _prefill_kernel[(triton.cdiv(max_q_len, BM), q_lens.numel(), HQ)](
        q, k_cache, v_cache, out, block_tables, q_starts, q_lens, context_lens, scale, block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), HQ=HQ, GROUP=HQ // HKV, D=D, BS=BS, BM=BM, BN=BN,
        IEEE=q.dtype == torch.float32, num_warps=4)
    return out
