"""Paged decode attention as a Triton kernel (the GPU language, not the inference server): one new
query token per sequence against its K/V read straight from the paged cache through its block table.

Split-K ("flash-decoding"): the grid has a partition per 256 to 1024 tokens of the block table's
width; one program per (sequence, KV head, partition) computes all the query heads that share that
KV head (GQA: K/V read once per group) with an online softmax over its share of the context (the
context spread evenly over the partitions), and a second kernel merges the partitions by their
log-sum-exp. The grid depends only on the batch size and the block-table width, never on the
context lengths, so a CUDA graph can capture it; partitions with no share do no reads.
Plain tl.dot/tl.load on bf16 or float32: runs on SM80 (A100) and newer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import sm_count

PARTITIONS = (1024, 512, 256)  # context tokens per program: the largest that still fills the GPU
BLOCK_N = 128                  # tokens per inner iteration
NUM_WARPS, NUM_STAGES = 4, 3   # chosen by a sweep on an H100 (bench/attention.py measures the result)


def choose_partition(batch: int, kv_heads: int, max_tokens: int, device: torch.device) -> int:
    """Large partitions read longer runs per program (fewer merges); small ones give a short batch
    enough programs to use every SM. Decided by shapes alone, so CUDA-graph replays keep it."""
    sms = sm_count(device)
    for part in PARTITIONS:
        if batch * kv_heads * triton.cdiv(max_tokens, part) >= sms:
            return part
    return PARTITIONS[-1]


@triton.jit
def _attend(q, K, V, Tables, Out, Lse, b, h, s, start, end, heads, g, d, stride_kslot, stride_kh, stride_tb,
            stride_ob, stride_oh, stride_os, stride_lb, stride_lh, scale_log2e, BS: tl.constexpr, G: tl.constexpr,
            BN: tl.constexpr, D: tl.constexpr, GP: tl.constexpr, IEEE: tl.constexpr):
    """Online-softmax attention of q [GP, D] (the G query heads of KV head h) over tokens [start, end)
    of sequence b, read through its block table; stores the partition's output and log-sum-exp."""
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for n0 in range(start, end, BN):
        tok = n0 + tl.arange(0, BN)
        valid = tok < end
        page = tl.load(Tables + b * stride_tb + tok // BS, mask=valid, other=0)
        slot = page.to(tl.int64) * BS + tok % BS
        kv_off = slot[:, None] * stride_kslot + h * stride_kh + d[None, :]
        k = tl.load(K + kv_off, mask=valid[:, None], other=0.0)
        if IEEE:  # float32 caches: exact products, not TF32 (the CPU path must agree token for token)
            sc = tl.dot(q, tl.trans(k).to(q.dtype), input_precision="ieee") * scale_log2e
        else:
            sc = tl.dot(q, tl.trans(k).to(q.dtype)) * scale_log2e      # [GP, BN], log2 units
        sc = tl.where(valid[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off, mask=valid[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    mask = g < G
    tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + s * stride_os + d[None, :], out, mask=mask[:, None])
    tl.store(Lse + b * stride_lb + heads * stride_lh + s, lse, mask=mask)


@triton.jit
def _share(ctx, s, BN: tl.constexpr):
    """Partition s's tokens [start, end): the context spread evenly over the grid's partitions in
    whole BN-token iterations, not a partition's worth from the front (the grid is sized for the graph's
    longest context, so at short contexts a few programs did several iterations and most none).
    At most the partition size (a multiple of BN), as the grid has partitions for the table's width."""
    span = tl.cdiv(tl.cdiv(ctx, tl.num_programs(2)), BN) * BN
    start = s * span
    return start, tl.minimum(start + span, ctx)


@triton.jit
def _partition_kernel(Q, K, V, Tables, Lens, Out, Lse,
                      stride_qb, stride_qh, stride_kslot, stride_kh, stride_tb,
                      stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                      scale_log2e,
                      BS: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                      BN: tl.constexpr, IEEE: tl.constexpr):
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(Lens + b)
    start, end = _share(ctx, s, BN)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    heads = h * G + g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g[:, None] < G, other=0.0)
    _attend(q, K, V, Tables, Out, Lse, b, h, s, start, end, heads, g, d, stride_kslot, stride_kh, stride_tb,
            stride_ob, stride_oh, stride_os, stride_lb, stride_lh, scale_log2e, BS, G, BN, D, GP, IEEE)


@triton.jit
def _merge_kernel(Part, Lse, Out, n_parts, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                  stride_ob, stride_oh, D: tl.constexpr, SP: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + s, mask=s < n_parts, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    w = w / tl.sum(w, 0)
    o = tl.load(Part + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                mask=s[:, None] < n_parts, other=0.0)
    tl.store(Out + b * stride_ob + h * stride_oh + d, tl.sum(o * w[:, None], 0).to(Out.dtype.element_ty))


@triton.jit
def _roped(QKV, Wn, pos_f, InvFreq, base, heads, d, inv, m, D: tl.constexpr, RD: tl.constexpr):
    """Rows `heads` of a q or k block at `base` (offsets within the token's row): the QK norm's
    x * inv rounded, times its weight (rounded), then neox RoPE on the first RD dims, each product and
    the sum rounded as PyTorch rounds them (export/model.py QkRope, apply_rope)."""
    half = RD // 2
    rot = d < RD
    partner = tl.where(d < half, d + half, d - half)
    x = tl.load(QKV + base + heads[:, None] * D + d[None, :], mask=m, other=0.0)
    dt = x.dtype
    xn = (x.to(tl.float32) * inv).to(dt).to(tl.float32)
    xn = (tl.load(Wn + heads[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32) * xn).to(dt).to(tl.float32)
    pm = m & rot[None, :]
    o = tl.load(QKV + base + heads[:, None] * D + partner[None, :], mask=pm, other=0.0)
    o = (o.to(tl.float32) * inv).to(dt).to(tl.float32)
    o = (tl.load(Wn + heads[:, None] * D + partner[None, :], mask=pm, other=0.0).to(tl.float32) * o).to(dt).to(tl.float32)
    rotated = tl.where((d < half)[None, :], -o, o)
    angle = pos_f * tl.load(InvFreq + (d % half), mask=rot, other=0.0)
    cos = tl.cos(angle).to(dt).to(tl.float32)
    sin = tl.sin(angle).to(dt).to(tl.float32)
    roped = ((xn * cos[None, :]).to(dt).to(tl.float32) + (rotated * sin[None, :]).to(dt).to(tl.float32)).to(dt)
    return tl.where(rot[None, :], roped, xn.to(dt))


@triton.jit
def _row_ssq(QKV, base, W: tl.constexpr, BW: tl.constexpr):
    acc = tl.zeros([BW], tl.float32)
    for w0 in range(0, W, BW):
        ws = w0 + tl.arange(0, BW)
        x = tl.load(QKV + base + ws, mask=ws < W, other=0.0).to(tl.float32)
        acc += x * x
    return tl.sum(acc, 0)


@triton.jit
def _qkv_partition_kernel(QKV, SSQ, QW, KW, Pos, InvFreq, Slots, K, V, Tables, Lens, Out, Lse,
                          stride_kslot, stride_kh, stride_tb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                          scale_log2e, q_width, k_width, eps,
                          NH: tl.constexpr, NKV: tl.constexpr, HAS_SSQ: tl.constexpr, RD: tl.constexpr,
                          BS: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                          BN: tl.constexpr, BW: tl.constexpr):
    """The decode partition kernel on the raw q/k/v row of each token ([B, (NH + 2 NKV) * D], the
    projection's output): the QK norm (sums of squares over this rank's row, or the all-reduced
    ones in SSQ [B, 2] with TP), RoPE, the new token's k and v written into the cache by the program
    whose partition holds it, then attention over the partition as in _partition_kernel."""
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    R: tl.constexpr = (NH + 2 * NKV) * D
    row = b.to(tl.int64) * R
    if HAS_SSQ:
        qs = tl.load(SSQ + b * 2)
        ks = tl.load(SSQ + b * 2 + 1)
    else:
        qs = _row_ssq(QKV, row, NH * D, BW)
        ks = _row_ssq(QKV, row + NH * D, NKV * D, BW)
    pos_f = tl.load(Pos + b).to(tl.float32)
    ctx = tl.load(Lens + b)
    start, end = _share(ctx, s, BN)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    heads = h * G + g
    gm = (g < G)[:, None] & (d < D)[None, :]
    q = _roped(QKV, QW, pos_f, InvFreq, row, heads, d, 1.0 / tl.sqrt(qs / q_width + eps), gm, D, RD)
    if (ctx - 1 >= start) & (ctx - 1 < end):  # this partition holds the new token: write it
        one = tl.arange(0, 1)
        km = (one < 1)[:, None] & (d < D)[None, :]
        kr = _roped(QKV, KW, pos_f, InvFreq, row + NH * D, h + one, d, 1.0 / tl.sqrt(ks / k_width + eps), km, D, RD)
        vr = tl.load(QKV + row + (NH + NKV) * D + (h + one)[:, None] * D + d[None, :])
        slot = tl.load(Slots + b)
        off = slot * stride_kslot + h * stride_kh + d[None, :] + one[:, None] * 0
        tl.store(K + off, kr.to(K.dtype.element_ty))
        tl.store(V + off, vr.to(V.dtype.element_ty))
    tl.debug_barrier()  # the block's own write is read back by the loop below
    _attend(q, K, V, Tables, Out, Lse, b, h, s, start, end, heads, g, d, stride_kslot, stride_kh, stride_tb,
            stride_ob, stride_oh, stride_os, stride_lb, stride_lh, scale_log2e, BS, G, BN, D, GP, False)


def qkv_decode(qkv: torch.Tensor, ssq: torch.Tensor | None, q_norm: torch.Tensor, k_norm: torch.Tensor,
               q_width: float, k_width: float, eps: float, positions: torch.Tensor, inv_freq: torch.Tensor,
               rotary_dim: int, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float, num_heads: int,
               partition: int | None = None) -> torch.Tensor:
    """Decode attention from the q/k/v projection's output: qkv [B, (Hq + 2 Hkv) * D] (this rank's
    heads), the QK norm over q_width / k_width (the full widths; ssq [B, 2] float32 holds the
    all-reduced sums of squares with TP, None to sum this row), RoPE at `positions`, the new k/v
    written at `slots`, attention over each sequence's cache -> [B, Hq * D] in qkv's dtype.
    Two launches (partitions, merge); bf16 or fp16 (tl.dot on the activations' dtype)."""
    B = qkv.shape[0]
    _, bs, Hkv, D = k_cache.shape
    G = num_heads // Hkv
    partition = partition or choose_partition(B, Hkv, block_tables.shape[1] * bs, qkv.device)
    n_parts = triton.cdiv(block_tables.shape[1] * bs, partition)
    part = torch.empty(B, num_heads, n_parts, D, dtype=torch.float32, device=qkv.device)
    lse = torch.empty(B, num_heads, n_parts, dtype=torch.float32, device=qkv.device)
    _qkv_partition_kernel[(B, Hkv, n_parts)](
        qkv, qkv if ssq is None else ssq, q_norm, k_norm, positions, inv_freq, slots, k_cache, v_cache,
        block_tables, context_lens, part, lse,
        k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        scale * 1.4426950408889634, float(q_width), float(k_width), float(eps),
        NH=num_heads, NKV=Hkv, HAS_SSQ=ssq is not None, RD=rotary_dim, BS=bs, G=G,
        GP=max(16, triton.next_power_of_2(G)), D=D, BN=min(BLOCK_N, partition), BW=1024,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    out = torch.empty(B, num_heads, D, dtype=qkv.dtype, device=qkv.device)
    _merge_kernel[(B, num_heads)](part, lse, out, n_parts, part.stride(0), part.stride(1), part.stride(2),
                                  lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
                                  D=D, SP=max(2, triton.next_power_of_2(n_parts)), num_warps=4)
    return out.reshape(B, num_heads * D)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, partition: int | None = None, block_n: int = BLOCK_N,
                 num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES) -> torch.Tensor:
    """q [B, Hq, D]; k/v_cache [blocks, block_size, Hkv, D]; block_tables [B, M] (int32/64);
    context_lens [B] (each >= 1) -> [B, Hq * D] in q's dtype."""
    B, Hq, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    partition = partition or choose_partition(B, Hkv, block_tables.shape[1] * bs, q.device)
    n_parts = triton.cdiv(block_tables.shape[1] * bs, partition)
    q = q.contiguous()
    part = torch.empty(B, Hq, n_parts, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, n_parts, dtype=torch.float32, device=q.device)
    _partition_kernel[(B, Hkv, n_parts)](
        q, k_cache, v_cache, block_tables, context_lens, part, lse,
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        scale * 1.4426950408889634,
        BS=bs, G=G, GP=max(16, triton.next_power_of_2(G)), D=D, BN=min(block_n, partition),
        IEEE=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    _merge_kernel[(B, Hq)](part, lse, out, n_parts, part.stride(0), part.stride(1), part.stride(2),
                           lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
                           D=D, SP=max(2, triton.next_power_of_2(n_parts)), num_warps=4)
    return out.reshape(B, Hq * D)
