"""Part `decode-rank`: one TP=8 rank's decode (6 query / 1 KV heads of 128, experts of 192, 256
experts top-8, a 25K vocabulary slice: export/tiny.py's `rank8` preset) as a TP=1 model with random
bf16 weights made on the GPU, torch backend, CUDA graphs, at batch 1, 8 and 32. Per layer: the
slope of the graph's GPU time between two depths (the head and the step's fixed costs cancel),
against the bytes floor of a layer (its attention and router weights, the expected distinct
experts, its KV), and the kernels a layer launches and their time, counted from a CUDA profile of
one replay at each depth. The all-reduces of a real TP=8 rank are not in it (one GPU).
"""
from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from export.config import parse_hf_config
from export.tiny import PRESETS, hf_config
from runtime.backends.pytorch import TorchBackend
from runtime.config import EngineConfig
from runtime.llm_engine import LLMEngine

from .common import Results, gpu_bandwidth
from .step import RandomWeights, decode_row, floor_bytes, write_export


def profile_replay(replay) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """Kernels launched by one call of `replay` (a CUDA graph's), their summed GPU time in seconds,
    the count per kernel name and the time per kernel name (seconds)."""
    from torch.profiler import ProfilerActivity, profile

    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    names: dict[str, int] = {}
    times: dict[str, float] = {}
    total_ns = 0
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        if e.device_type() != torch.autograd.DeviceType.CUDA or "memcpy" in name.lower() or "memset" in name.lower():
            continue
        names[name] = names.get(name, 0) + 1
        times[name] = times.get(name, 0.0) + e.duration_ns() / 1e9
        total_ns += e.duration_ns()
    return sum(names.values()), total_ns / 1e9, names, times


def measure(res: Results, layers: int, batches, steps: int, bw: float, preset: str) -> dict:
    cfg = parse_hf_config(hf_config(replace(PRESETS[preset], num_hidden_layers=layers)))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_export(cfg, Path(tmp), max_tokens=1024)
        backend = TorchBackend(manifest, 0, "cuda", torch.bfloat16, checkpoint=RandomWeights(cfg))
        engine = LLMEngine(tmp, EngineConfig(backend="torch", device="cuda", dtype="bfloat16", kv_cache_gb=4,
                                             max_num_seqs=max(batches), cuda_graphs=True, graph_max_context=2048,
                                             max_num_batched_tokens=1024), backend=backend)
        g = torch.Generator().manual_seed(1)
        for B in batches:
            row = decode_row(engine, cfg, layers, B, steps, bw, g)
            dg = engine.executor.decode_graphs
            kernels, kernel_s, names, times = profile_replay(dg.graphs[dg.bucket(B)].replay)
            row |= dict(kernels=kernels, kernel_ms=round(kernel_s * 1e3, 3),
                        decode_layer=engine.stats.forms.get("decode-layer", 0) > 0)
            out[B] = (row, names, times, cfg)
            res.add("decode-rank", preset=preset, **{k: v for k, v in row.items() if k != "cuda_graphs"})
        engine.close()
        del backend
        torch.cuda.empty_cache()
    return out


def run(res: Results, depths=(4, 16), batches=(1, 8, 32), steps: int = 30, preset: str = "rank8") -> None:
    bw = gpu_bandwidth()
    res.add("decode-rank", what="gpu_copy_bandwidth", gb_per_s=round(bw / 1e9, 1))
    lo, hi = (measure(res, n, batches, steps, bw, preset) for n in depths)
    d = depths[1] - depths[0]
    for B in batches:
        (r0, n0, t0, cfg), (r1, n1, t1, _) = lo[B], hi[B]
        layer_us = (r1["gpu_ms"] - r0["gpu_ms"]) * 1e3 / d
        floor_us = (floor_bytes(cfg, depths[1], B, r1["context"]) - floor_bytes(cfg, depths[0], B, r1["context"])) \
            / bw / d * 1e6
        per_name = {k: (n1.get(k, 0) - n0.get(k, 0)) / d for k in set(n0) | set(n1)}
        # each kernel's GPU time a layer: the slope between the depths, as for the layer's own time
        per_us = {k: (t1.get(k, 0.0) - t0.get(k, 0.0)) * 1e6 / d for k in per_name}
        res.add("decode-rank", what="per_layer", preset=preset, batch=B, context=r1["context"],
                layer_gpu_us=round(layer_us, 1), layer_floor_us=round(floor_us, 1),
                layer_vs_floor=round(layer_us / floor_us, 2),
                kernels_per_layer=round((r1["kernels"] - r0["kernels"]) / d, 1),
                kernel_us_per_layer=round((r1["kernel_ms"] - r0["kernel_ms"]) * 1e3 / d, 1),
                host_share=r1.get("host_share"),
                layer_kernels={k[:60]: round(v, 2) for k, v in sorted(per_name.items(), key=lambda kv: -kv[1]) if v},
                layer_kernel_us={k[:60]: round(v, 1) for k, v in sorted(per_us.items(), key=lambda kv: -kv[1])
                                 if per_name[k]})

