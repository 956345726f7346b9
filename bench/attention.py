"""Part 3: GPU decode attention. The Triton paged kernel (runtime/kernels/paged_decode.py) reading K/V
through scattered block tables, against PyTorch's SDPA (flash) on a contiguous cache holding the same
data, and against the floor: the KV bytes over the GPU's measured copy bandwidth.
MiniMax-M2.5's attention at TP=1: 48 query heads, 8 KV heads of 128, bf16, blocks of 16 tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import Results, cuda_seconds, gpu_bandwidth, graphed

HQ, HKV, D, BS = 48, 8, 128, 16


def run(res: Results, batches=(1, 4, 16, 64), contexts=(1024, 4096, 16384, 32768)) -> None:
    from runtime.kernels.paged_decode import paged_decode

    bw = gpu_bandwidth()
    res.add("attention", what="gpu_copy_bandwidth", gb_per_s=round(bw / 1e9, 1))
    g = torch.Generator(device="cuda").manual_seed(0)
    for B in batches:
        for L in contexts:
            kv_bytes = 2 * B * L * HKV * D * 2
            if kv_bytes > 24 << 30:
                continue
            blocks = B * L // BS
            k_cache = torch.randn(blocks, BS, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
            v_cache = torch.randn(blocks, BS, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
            tables = torch.randperm(blocks, device="cuda", generator=g).view(B, L // BS)  # scattered pages
            lens = torch.full((B,), L, device="cuda")
            q = torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
            # the same keys and values laid out contiguously per sequence: [B, Hkv, L, D]
            k = k_cache[tables].flatten(1, 2).transpose(1, 2).contiguous()
            v = v_cache[tables].flatten(1, 2).transpose(1, 2).contiguous()
            qg = q.view(B, HKV, HQ // HKV, D)  # GQA as G query rows per KV head: SDPA's fast path, no copies
            scale = D ** -0.5
            # both replayed from CUDA graphs, as the runtime's decode steps are: GPU time, not launch time
            paged = cuda_seconds(graphed(lambda: paged_decode(q, k_cache, v_cache, tables, lens, scale)))
            sdpa = cuda_seconds(graphed(lambda: F.scaled_dot_product_attention(qg, k, v, scale=scale)))
            ours = paged_decode(q, k_cache, v_cache, tables, lens, scale).float()
            ref = F.scaled_dot_product_attention(qg, k, v, scale=scale).reshape(B, -1).float()
            floor = kv_bytes / bw
            res.add("attention", batch=B, context=L, paged_us=round(paged * 1e6, 1), sdpa_us=round(sdpa * 1e6, 1),
                    floor_us=round(floor * 1e6, 1), paged_bandwidth_share=round(floor / paged, 3),
                    paged_vs_sdpa=round(paged / sdpa, 3), max_abs_diff=float((ours - ref).abs().max()))
            torch.cuda.empty_cache()
