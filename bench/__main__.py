"""python -m bench [--parts export,moe-cpu,engine-memory,host,moe-gpu,attention,step,decode-rank,prefill,constrained,real-scale] [--cpu] [--toy]

Each measurement is one JSON line (also appended to build/bench/results.jsonl), with the machine and
date; a short table follows. `--cpu` (make bench-cpu) runs the CPU parts and ends with one JSON
object: export_time_vs_floor, export_peak_rss_gb, moe_gather_t1_vs_floor, moe_forms, host_vs_shortest,
host_step_us_max, host_prefill_us_per_token.
`--toy` runs the parts once on a toy model at small sizes, results under build/bench/toy (or --out),
and saves no MoE schedule: a smoke run (tests/test_bench.py), whose numbers mean nothing.
`real-scale` runs only when named (it writes a ~30 GB checkpoint once); without a GPU it is skipped.
`constrained` is a GPU part whose `--toy` form runs on the CPU (`--parts constrained --toy`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from export.tiny import PRESETS

from . import real_scale
from .common import OUT, Results

CPU_PARTS = ["export", "moe-cpu", "engine-memory", "host"]
TOY = "kv8"  # the toy preset (export/tiny.py) with the real model's 8 KV heads: TP=8 shards it
GPU_PARTS = ["moe-gpu", "attention", "step", "decode-rank", "prefill", "constrained"]
TOY_ON_CPU = {"constrained"}  # GPU parts whose --toy form runs on the CPU
NAMED_PARTS = ["real-scale"]  # run only when asked for; skipped without a GPU


def table(rows: list[dict]) -> None:
    print("\n| part | measurement |\n| --- | --- |")
    for r in rows:
        fields = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("part", "machine", "date") and v is not None)
        print(f"| {r['part']} | {fields} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", help=f"comma-separated, from {CPU_PARTS + GPU_PARTS + NAMED_PARTS} "
                    "(default: all that can run, but real-scale)")
    ap.add_argument("--cpu", action="store_true", help="the CPU parts, then the summary JSON line")
    ap.add_argument("--layers", type=int, default=4, help="layers of the real-width model in the step part")
    ap.add_argument("--rank-depths", default="4,16",
                    help="the two layer counts of the decode-rank part, whose slope gives a layer's time (default 4,16)")
    ap.add_argument("--prefill-prompts", default="2048,8192,32768,131072",
                    help="prompt lengths of the prefill part (default 2048,8192,32768,131072)")
    ap.add_argument("--prefill-widths", default="real,rank8",
                    help="export/tiny.py presets whose widths the prefill part measures, each as a TP=1 model "
                    "(default real,rank8: TP=1's, one TP=8 rank's)")
    ap.add_argument("--prefill-chunk", type=int, default=2048,
                    help="tokens per prefill step of the prefill part (default 2048, the engines' step)")
    ap.add_argument("--prefill-forms", default="grouped,grouped-eager,block,block-eager,dense",
                    help="MoE forms the prefill part times: the grouped kernels from CUDA graphs and eagerly, the "
                         "engines' block form (PyTorch ops) the same two ways, the dense form eagerly")
    ap.add_argument("--prefill-profile", help="prompt lengths whose whole prefill the prefill part profiles, "
                    "for each part's share of the kernel time (default: the shortest and the longest)")
    ap.add_argument("--export-layers", type=int, default=1, help="layers of the real-width model the export part exports")
    ap.add_argument("--export-jobs", help="comma-separated job counts for the export part (default: 1 and the default)")
    real_scale.add_args(ap.add_argument_group("real-scale"), prefix="real-")
    ap.add_argument("--toy", action="store_true", help="a smoke run: the toy model, small sizes, no schedule saved")
    ap.add_argument("--out", help="folder of the results and the parts' files (default build/bench, with --toy build/bench/toy)")
    a = ap.parse_args(argv)
    out = Path(a.out) if a.out else OUT / "toy" if a.toy else OUT
    preset = TOY if a.toy else "real"
    gpu = torch.cuda.is_available()
    parts = a.parts.split(",") if a.parts else CPU_PARTS if a.cpu or a.toy else CPU_PARTS + (GPU_PARTS if gpu else [])
    unknown = set(parts) - set(CPU_PARTS + GPU_PARTS + NAMED_PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}")
    if "prefill" in parts and (bad := set(a.prefill_widths.split(",")) - set(PRESETS)):
        ap.error(f"--prefill-widths: not presets of export/tiny.py: {sorted(bad)}")
    if "prefill" in parts:
        from .prefill import FORMS

        if bad := set(a.prefill_forms.split(",")) - set(FORMS):
            ap.error(f"--prefill-forms: not among {', '.join(FORMS)}: {sorted(bad)}")
    if not gpu and set(parts) & set(GPU_PARTS) - (TOY_ON_CPU if a.toy else set()):
        ap.error("the GPU parts need an NVIDIA GPU")
    if not a.parts and not gpu and not a.cpu:
        print("no GPU here: running the CPU parts only (make bench on a GPU machine runs all four)", file=sys.stderr)
    res = Results(out)
    summary = {}
    if "export" in parts:
        from . import export
        jobs = [int(j) for j in a.export_jobs.split(",")] if a.export_jobs else [1] if a.toy else None
        row = export.run(res, a.export_layers, jobs, preset, out)
        summary |= {"export_time_vs_floor": row["time_vs_floor"], "export_peak_rss_gb": row["peak_rss_gb"],
                    "export_rss_limit_gb": row["rss_limit_gb"]}
    from . import moe
    if "moe-gpu" in parts:
        moe.save_schedule(moe.run_gpu(res), f"gpu: {torch.cuda.get_device_name()}")
    if "engine-memory" in parts:
        from . import engine_memory
        row = engine_memory.run(res, preset, out)
        summary |= {"layer_rank_gpu_gb": row["layer_rank_gb"], "layer_rank_gpu_target_gb": row["target_gb"]}
    if "moe-cpu" in parts:
        spec = moe.run_cpu(res, (1, 4), preset=preset, out=out) if a.toy else moe.run_cpu(res)
        if not a.toy and (not moe.FORMS_FILE.is_file()
                          or "gpu" not in json.loads(moe.FORMS_FILE.read_text())["measured_on"]):
            moe.save_schedule(spec, "cpu (onnxruntime)")
        t1 = next(r for r in res.rows if r["part"] == "moe" and r.get("device") == "cpu" and r.get("tokens") == 1)
        summary |= {"moe_gather_t1_vs_floor": t1["gather_vs_floor"], "moe_forms": spec}
    if "host" in parts:
        from . import host
        rows = host.run(res, ((4, 64), (4, 256)), steps=32, prompts=(256,)) if a.toy else host.run(res)
        decode = [r for r in rows if "vs_shortest" in r]
        summary |= {"host_vs_shortest": max(r["vs_shortest"] for r in decode),
                    "host_step_us_max": max(r["step_us"] for r in decode),
                    "host_prefill_us_per_token": max(r["us_per_token"] for r in rows if r.get("what") == "prefill")}
    if "attention" in parts:
        from . import attention
        attention.run(res)
    if "step" in parts:
        from . import step
        step.run(res, layers=a.layers)
    if "decode-rank" in parts:
        from . import decode_rank
        decode_rank.run(res, depths=tuple(int(n) for n in a.rank_depths.split(",")))
    if "prefill" in parts:
        from . import prefill
        prefill.run(res, layers=a.layers, prompts=tuple(int(n) for n in a.prefill_prompts.split(",")),
                    widths=tuple(a.prefill_widths.split(",")), chunk=a.prefill_chunk,
                    forms=tuple(a.prefill_forms.split(",")),
                    profile_prompts=[int(n) for n in a.prefill_profile.split(",")] if a.prefill_profile else None)
    if "constrained" in parts:
        from . import constrained
        if a.toy:
            constrained.run(res, batches=(1, 2), steps=2, toy=TOY)
        else:
            constrained.run(res, layers=a.layers)
    if "real-scale" in parts:
        real_scale.run(res, a.checkpoint, a.real_preset, long=a.long_prompt, chunk=a.chunk, utilization=a.utilization,
                       prefill_graphs=a.prefill_graphs)
    table(res.rows)
    if a.cpu:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
