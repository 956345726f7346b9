"""Before `make engines` writes anything: will the whole run fit this machine?

    python -m engines.preflight CHECKPOINT --tp 8 [--out EXPORT_DIR] [--jobs N] [--tensorrt auto]
        [--max-tokens 8192] [--gpu-gb G] [--utilization 0.9]

From the checkpoint's config, index and shard headers (validated; no weights read) and the memory plan
(engines/memory_plan.py), a table of: the bytes each stage writes per rank (BF16 graphs, engines)
against the free disk where they go (stages on one filesystem add up), the RAM of the export jobs,
the TensorRT that builds, the GPUs found, and every rank's GPU memory at serving time against the
plan. Exit status 1, with each shortfall named ("needs 470 GB free at build/..., has 210 GB"), when
something does not fit; `make engines` runs this first, and `make engines DRY_RUN=1` stops after it.
Engine sizes are predictions: the rank's weights inside each engine (the experts are inputs, loaded
by the runtime from the export) plus about 1 MB of kernels per engine, as measured with TensorRT-RTX
for SM80 (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export import preflight
from export.checkpoint import CheckpointError
from export.config import ConfigError
from export.layout import GraphLayout
from export.paths import engines_dir
from export.preflight import GB, Need
from export.sharding import Shard
from export.sharding import ShardingError
from export.to_onnx import DEFAULT_MAX_TOKENS, TWINS, ExportPlan, plan_export

from . import memory_plan
from .tensorrt import KINDS

ENGINE_OVERHEAD = 1_000_000  # bytes of kernels and tactics per engine beyond its weights (RTX SM80: 0.4-1.4 MB)


def engine_bytes(layout: GraphLayout) -> dict[int, int]:
    """Predicted engine bytes per rank: every subgraph's own weights (not its weight inputs) plus the
    per-engine overhead. Both MoE forms hold the router and the post-attention norm."""
    cfg, out = layout.cfg, {}
    parts = preflight.layer_parts(cfg, layout.tp, layout.expert_split)
    for s in layout.subgraphs:
        if s.unit == "embed":
            own = cfg.vocab_size * cfg.hidden_size * 2
        elif s.unit == "head":
            own = (Shard(layout.tp, 0, layout.expert_split).vocab_rows(cfg) + 1) * cfg.hidden_size * 2
        elif s.piece in ("moe", "post"):
            own = parts["router"] * 4 + cfg.hidden_size * 2
            if s.piece == "post":  # TP=1: o_proj is in the post-attention graph
                own += cfg.hidden_size * (cfg.q_size // layout.tp) * 2
        elif s.piece == "o_proj":
            own = cfg.hidden_size * (cfg.q_size // layout.tp) * 2
        elif s.piece == "qk_rope":
            own = (cfg.q_size + cfg.kv_size) // layout.tp * 2
        else:  # attn / attn_in: input norm, q, k, v (and the QK norms)
            q, kv = cfg.q_size // layout.tp, cfg.kv_size // layout.tp
            own = (cfg.hidden_size + (q + 2 * kv) * cfg.hidden_size + q + kv) * 2
        for r in s.ranks:
            out[r] = out.get(r, 0) + own + ENGINE_OVERHEAD
    return out


def gpus_here() -> list[tuple[str, int]]:
    """(name, bytes) of each visible NVIDIA GPU; empty without a driver or torch's CUDA."""
    try:
        import torch
        if not torch.cuda.is_available():
            return []
        return [(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
                for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def tensorrt_need(kind: str) -> Need:
    from .build import BuildEnvironmentError, check_environment
    try:
        rt, gpus = check_environment(kind)
    except BuildEnvironmentError as e:
        return Need("TensorRT", "TensorRT 11 and an SM80+ GPU, or TensorRT-RTX", "not usable", False, str(e))
    has = f"{rt.version}" + (f" on GPU(s) {gpus}" if rt.needs_gpu else " (ahead of time for SM80, no GPU needed; "
                                                                        "its engines check the graphs, they do not serve)")
    return Need("TensorRT", "a builder", has)


def gpu_needs(plan: ExportPlan, gpu_gb: float | None, utilization: float, batch: int) -> list[Need]:
    found = gpus_here()
    tp, cfg = plan.layout.tp, plan.layout.cfg
    rows = []
    if found:
        smallest = min(b for _, b in found)
        rows.append(Need("GPUs for serving", f"{tp} (one per rank)", f"{len(found)} x {found[0][0]}", True))
        if len(found) < tp:
            rows[-1].has += f" (serving TP={tp} needs {tp}; building works on fewer)"
    gpu_bytes = gpu_gb * GB if gpu_gb else (smallest if found else 80 * GB)
    ranks = memory_plan.plan(cfg, tp, gpu_bytes, utilization, plan.max_tokens, batch, plan.moe,
                             plan.layout.expert_split)
    tight = max(ranks, key=lambda m: m.weights + m.scratch + m.reserve)
    before_kv = tight.weights + tight.scratch + tight.reserve
    source = "given" if gpu_gb else ("found" if found else "assumed: no GPU here")
    rows.append(Need(f"GPU memory at serving (rank {tight.rank}, steps of {plan.max_tokens} tokens)",
                     f"{before_kv / GB:.1f} GB + KV cache",
                     f"{gpu_bytes / GB:.0f} GB x {utilization:g} ({source}): KV cache {tight.kv_cache / GB:.1f} GB, "
                     f"{min(m.kv_tokens for m in ranks):,} tokens", tight.kv_cache > 0,
                     f"rank {tight.rank} needs {before_kv / GB:.1f} GB before any KV cache (weights "
                     f"{tight.weights / GB:.1f}, activations of a {plan.max_tokens}-token step {tight.scratch / GB:.1f}) "
                     f"and has {tight.budget / GB:.1f} GB: export with a smaller --max-tokens "
                     f"(`make engines ... MAX_TOKENS=1024`) or use a larger TP"))
    return rows


def run(plan: ExportPlan, kind: str, gpu_gb: float | None, utilization: float, batch: int,
        engines_out: Path | None = None) -> tuple[str, list[Need]]:
    est, layout = plan.estimate, plan.layout
    engines = engines_out or engines_dir(plan.root)
    done = set(plan.stamps)
    eng = engine_bytes(layout)
    existing = sum(p.stat().st_size for p in engines.glob("rank*/*.engine")) if engines.is_dir() else 0
    export_todo = est.to_write(plan.twins, {k for k in est.units if k not in done})
    engines_todo = max(0, sum(eng.values()) - existing)
    rows = preflight.disk_needs([(plan.root, export_todo), (engines, engines_todo)])
    rows.append(preflight.ram_need(plan.jobs))
    rows.append(tensorrt_need(kind))
    rows += gpu_needs(plan, gpu_gb, utilization, batch)
    ranks = sorted(eng)
    eng_line = (f"rank 0 {eng[0] / GB:.2f} GB, ranks 1..{ranks[-1]} {eng[ranks[-1]] / GB:.2f} GB each"
                if len(ranks) > 2 else ", ".join(f"rank {r} {eng[r] / GB:.2f} GB" for r in ranks))
    report = "\n".join([
        plan.report(needs=False),
        f"  engines (predicted): {sum(eng.values()) / GB:.2f} GB ({eng_line}) to {engines}"
        + (f"; {existing / GB:.2f} GB there already" if existing else ""),
        preflight.table(rows)])
    return report, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engines.preflight", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="the MiniMax-M2 checkpoint folder `make engines` will export")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    ap.add_argument("--out", help="export folder (default build/<checkpoint name>/onnx)")
    ap.add_argument("--engines-out", help="engines folder (default build/<checkpoint name>/engines/tp<N>)")
    ap.add_argument("--jobs", type=int, help="export jobs (default: from cores and RAM)")
    ap.add_argument("--fp32-twins", choices=TWINS, default="off",
                    help="whether the export writes FP32 twins (`make engines`: off unless TWINS=on)")
    ap.add_argument("--tensorrt", choices=KINDS, default="auto", help="the builder (as engines.build)")
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="the export's largest step")
    ap.add_argument("--moe-forms-file", help="the MoE form schedule `make bench` measured (as the export takes it)")
    ap.add_argument("--gpu-gb", type=float, help="GPU memory to plan serving with (default: the smallest GPU "
                                                 "here, else 80 GB, an A100-80GB)")
    ap.add_argument("--utilization", type=float, default=0.9, help="share of GPU memory to use (default 0.9)")
    ap.add_argument("--batch", type=int, default=8, help="sequences the KV cache is shared by (default 8)")
    a = ap.parse_args(argv)
    try:
        plan = plan_export(a.checkpoint, a.out, a.tp, twins={"auto": None, "on": True, "off": False}[a.fp32_twins], max_tokens=a.max_tokens,
                           forms_file=a.moe_forms_file, jobs=a.jobs)
    except (CheckpointError, ConfigError, ShardingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report, rows = run(plan, a.tensorrt, a.gpu_gb, a.utilization, a.batch,
                       Path(a.engines_out) if a.engines_out else None)
    print(report)
    short = [r for r in rows if not r.ok]
    for r in short:
        print(f"error: {r.problem}", file=sys.stderr)
    if not short:
        print("preflight: everything fits")
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
