"""What runs before the experts at decode sizes, in one Triton kernel instead of a dozen PyTorch ops:
per (token, block of experts), h = a + b (rounded to the activations' dtype, as PyTorch rounds the
residual add), the RMSNorm of h (float32 statistics, weight applied in the activations' dtype), and
the float32 router logits of its experts through a sigmoid; the block of experts 0 also writes h and
the normed x. Each program recomputes the norm of its token (two passes over [H] values in chunks,
cheap next to its slice of the float32 gate). The token's last block to finish then takes the k
largest of sigmoid + bias (equal values: the lower expert id first) and renormalises their unbiased
scores to sum 1.

For few tokens only: the gate GEMV re-reads the [E, H] float32 gate per token; prefill-sized steps
take `route_many` (the norm kernel, PyTorch's GEMM for the gate, a top-k kernel; the caller decides,
MAX_TOKENS). Also `add_rms_norm`, the norm alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import sm_count

MAX_TOKENS = 64  # route_top_k's limit (its per-token block counters)
# route() takes route_top_k up to this many tokens; beyond, the gate's cuBLAS GEMM reads it once for all of
# them (each route_top_k program re-reads its slice per token). H200, 256 experts, hidden 3072, cold gates:
# 20.0 vs 21.6 us at 32 tokens, 30.2 vs 22.4 us at 64.
ONE_LAUNCH_MAX = 32


@triton.jit
def _inv_rms(A, B, t, eps, H: tl.constexpr, BH: tl.constexpr):
    """1 / rms of h = a + b (rounded to the activations' dtype) over H, in chunks of BH."""
    acc = tl.zeros([BH], tl.float32)
    for h0 in range(0, H, BH):
        hs = h0 + tl.arange(0, BH)
        m = hs < H
        a = tl.load(A + t * H + hs, mask=m, other=0.0)
        hf = (a.to(tl.float32) + tl.load(B + t * H + hs, mask=m, other=0.0).to(tl.float32)).to(a.dtype).to(tl.float32)
        acc += hf * hf
    return 1.0 / tl.sqrt(tl.sum(acc, 0) / H + eps)


@triton.jit
def _chunk(A, B, Wn, t, h0, inv, H: tl.constexpr, BH: tl.constexpr):
    """One chunk of h and of x = weight * (h * inv) (both rounded as PyTorch rounds them)."""
    hs = h0 + tl.arange(0, BH)
    m = hs < H
    a = tl.load(A + t * H + hs, mask=m, other=0.0)
    h = (a.to(tl.float32) + tl.load(B + t * H + hs, mask=m, other=0.0).to(tl.float32)).to(a.dtype)
    xn = (h.to(tl.float32) * inv).to(a.dtype).to(tl.float32)
    x = (tl.load(Wn + hs, mask=m, other=0.0).to(tl.float32) * xn).to(a.dtype)
    return hs, m, h, x


@triton.jit
def _add_norm_kernel(A, B, Wn, Hout, Xout, eps, H: tl.constexpr, BH: tl.constexpr):
    t = tl.program_id(0)
    inv = _inv_rms(A, B, t, eps, H, BH)
    for h0 in range(0, H, BH):
        hs, m, h, x = _chunk(A, B, Wn, t, h0, inv, H, BH)
        tl.store(Hout + t * H + hs, h, mask=m)
        tl.store(Xout + t * H + hs, x, mask=m)


@triton.jit
def _store_top_k(s, Bias, Ids, Wt, t, E: tl.constexpr, K: tl.constexpr, BEA: tl.constexpr, BK: tl.constexpr):
    """Token t's k largest of s + bias (s: its E sigmoid scores in a [BEA] block; equal values: the
    lower expert id first) into Ids [T, K], and their unbiased scores renormalised to sum 1 into Wt.
    Each value and its id are one int64 key (the float's bits made to order as signed integers, then
    BEA - 1 - id: equal values put the lower id higher), so each of the k rounds is one max reduction
    instead of three (max, lowest id, its score); the scores are gathered once at the end (s >= 0, so
    s + bias is never -0.0, the one value whose bits order apart from its equal). On an H200
    at 256 experts, top 8, one token: 5.9 against 7.4 us for the whole router launch."""
    ea = tl.arange(0, BEA)
    eam = ea < E
    biased = tl.where(eam, s + tl.load(Bias + ea, mask=eam, other=0.0), float("-inf"))
    bits = biased.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (ordered.to(tl.int64) << 32) | (BEA - 1 - ea).to(tl.int64)
    ks = tl.arange(0, BK)
    ids = tl.zeros([BK], tl.int32)
    for j in tl.static_range(K):
        best = tl.max(key, 0)
        ids = tl.where(ks == j, (BEA - 1 - (best & 0xFFFFFFFF)).to(tl.int32), ids)
        key = tl.where(key == best, -9223372036854775807, key)
    picked = tl.where(ks < K, tl.sum(tl.where(ea[None, :] == ids[:, None], s[None, :], 0.0), 1), 0.0)
    tl.store(Ids + t * K + ks, ids.to(tl.int64), mask=ks < K)
    tl.store(Wt + t * K + ks, picked / tl.sum(picked, 0), mask=ks < K)


@triton.jit
def _norm_gate_top_k_kernel(A, B, Wn, G, Bias, Hout, Xout, S, Ids, Wt, Count, eps, H: tl.constexpr, E: tl.constexpr,
                            K: tl.constexpr, BH: tl.constexpr, BE: tl.constexpr, BEA: tl.constexpr, BK: tl.constexpr,
                            NB: tl.constexpr):
    """Norm and gate per (token, block of experts), then the top-k by the token's last block to
    finish: each block counts itself in Count[t] once its scores are stored; the block that makes
    the count NB does the top-k over all E scores and sets the count back to 0 for the next launch."""
    t, eb = tl.program_id(0), tl.program_id(1)
    inv = _inv_rms(A, B, t, eps, H, BH)
    es = eb * BE + tl.arange(0, BE)
    em = es < E
    logit = tl.zeros([BE], tl.float32)
    for h0 in range(0, H, BH):
        hs, m, h, x = _chunk(A, B, Wn, t, h0, inv, H, BH)
        if eb == 0:
            tl.store(Hout + t * H + hs, h, mask=m)
            tl.store(Xout + t * H + hs, x, mask=m)
        g = tl.load(G + es[:, None] * H + hs[None, :], mask=em[:, None] & m[None, :], other=0.0)
        logit += tl.sum(g * x.to(tl.float32)[None, :], 1)
    tl.store(S + t * E + es, tl.sigmoid(logit), mask=em)
    tl.debug_barrier()  # every thread's scores are stored before the block counts itself (release)
    done = tl.atomic_add(Count + t, 1, sem="acq_rel")
    if done == NB - 1:
        ea = tl.arange(0, BEA)
        eam = ea < E
        s = tl.load(S + t * E + ea, mask=eam, other=0.0, cache_modifier=".cg")  # other blocks' scores: from L2
        _store_top_k(s, Bias, Ids, Wt, t, E, K, BEA, BK)
        tl.store(Count + t, 0)


def add_rms_norm(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float):
    """(a + b, rms_norm(a + b) * weight) for a, b [T, H] in one launch: the router's norm alone (the
    input norm before a cuBLAS q/k/v product)."""
    T, H = a.shape
    h, x = torch.empty_like(a), torch.empty_like(a)
    _add_norm_kernel[(T,)](a.contiguous(), b.contiguous(), weight, h, x, float(eps), H=H, BH=1024, num_warps=4)
    return h, x


@triton.jit
def _top_k_kernel(Logits, Bias, Ids, Wt, E: tl.constexpr, K: tl.constexpr, BEA: tl.constexpr, BK: tl.constexpr):
    """One token: sigmoid of its float32 router logits, the k largest of sigmoid + bias (equal values:
    the lower expert id first), their unbiased scores renormalised to sum 1."""
    t = tl.program_id(0).to(tl.int64)
    ea = tl.arange(0, BEA)
    eam = ea < E
    s = tl.sigmoid(tl.load(Logits + t * E + ea, mask=eam, other=0.0))
    _store_top_k(s, Bias, Ids, Wt, t, E, K, BEA, BK)


def route_many(a: torch.Tensor, b: torch.Tensor, norm: torch.Tensor, eps: float, gate: torch.Tensor,
               bias: torch.Tensor, top_k: int):
    """route_top_k's result for any number of tokens (prefill chunks): the add + norm in one launch,
    the float32 gate as one cuBLAS GEMM (read once for all tokens), then sigmoid, biased top-k and
    renormalisation in one launch: four launches where the PyTorch ops take about fifteen."""
    h, x = add_rms_norm(a, b, norm, eps)
    logits = F.linear(x.float(), gate).contiguous()
    T, E = logits.shape
    ids = torch.empty(T, top_k, dtype=torch.int64, device=a.device)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=a.device)
    _top_k_kernel[(T,)](logits, bias, ids, weights, E=E, K=top_k, BEA=triton.next_power_of_2(E),
                        BK=triton.next_power_of_2(top_k), num_warps=4)
    return h, x, ids, weights


def route(a: torch.Tensor, b: torch.Tensor, norm: torch.Tensor, eps: float, gate: torch.Tensor,
          bias: torch.Tensor, top_k: int):
    """(h, x, ids, weights) for any number of tokens: route_top_k up to ONE_LAUNCH_MAX, route_many beyond
    (where the gate's cuBLAS GEMM reads it once for all tokens)."""
    fn = route_top_k if a.shape[0] <= ONE_LAUNCH_MAX else route_many
    return fn(a, b, norm, eps, gate, bias, top_k)


_counters: dict[torch.device, torch.Tensor] = {}


def _counter(device: torch.device) -> torch.Tensor:
    """Per-token block counts of route_top_k, zero between launches. Made once per device, before any
    CUDA-graph capture (the first call is an eager warm-up), so captured graphs keep its address."""
    if device not in _counters:
        _counters[device] = torch.zeros(MAX_TOKENS, dtype=torch.int32, device=device)
    return _counters[device]


def route_top_k(a: torch.Tensor, b: torch.Tensor, norm: torch.Tensor, eps: float, gate: torch.Tensor,
                bias: torch.Tensor, top_k: int, block_experts: int | None = None, block_hidden: int | None = None):
    """The MoE's prologue in one launch: (h = a + b, x = rms_norm(h) * norm, the router's expert ids
    [T, k] (global, int64), renormalised float32 weights [T, k]), T <= MAX_TOKENS; gate [E, H] float32.
    block_experts: experts per program of the gate GEMV (default: from T, E and the SM count);
    block_hidden: columns a load (default 4096 up to 2 tokens, 2048 up to 8, 1024 beyond: H200 sweeps, T = 1,
    2, 8, 32, 512..4096 columns, found these 10-20% faster than 512, and 4096 5-7% faster than 2048 at
    one and two tokens of hidden 3072: every load of the token's row in flight at once)."""
    T, H = a.shape
    E = gate.shape[0]
    if T > MAX_TOKENS:
        raise ValueError(f"route_top_k takes at most {MAX_TOKENS} tokens, got {T}")
    h, x = torch.empty_like(a), torch.empty_like(a)
    scores = torch.empty(T, E, dtype=torch.float32, device=a.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=a.device)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=a.device)
    BE = block_experts if block_experts else _block_experts(T, E, a.device)
    nb = triton.cdiv(E, BE)
    BH = block_hidden or (4096 if T <= 2 else 2048 if T <= 8 else 1024)
    _norm_gate_top_k_kernel[(T, nb)](a.contiguous(), b.contiguous(), norm, gate, bias, h, x, scores, ids, weights,
                                     _counter(a.device), eps, H=H, E=E, K=top_k, BH=BH, BE=BE,
                                     BEA=triton.next_power_of_2(E), BK=triton.next_power_of_2(top_k), NB=nb,
                                     num_warps=4)
    return h, x, ids, weights


def _block_experts(T: int, E: int, device: torch.device) -> int:
    """Experts per program of the gate GEMV: about four programs per SM in all (the gate is read
    once per token, so at T=1 the GEMV needs its 3 MB spread wide), at least 2, at most 64. A sweep
    on an H200 (132 SMs; 2..32 experts a program, T = 1, 8, 32, 64) found this rule within 3% of
    the best at each T."""
    want = -(-T * E // (4 * sm_count(device)))
    return min(64, max(2, triton.next_power_of_2(want)))
