"""Part: GPU bytes per layer-rank at MiniMax-M2.5's true width, TP=8, rank 0 -- the engines TensorRT
builds (TensorRT-RTX ahead of time for SM80: the compiler that runs here) plus the weights the runtime
loads for them once (the experts, bound to both MoE forms). Against the 1.0 GB target per layer-rank
(62 of them must fit beside embed, head, KV cache and scratch in 80 GB)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .common import OUT, Results

TARGET_GB = 1.0


def run(res: Results, preset: str = "real", out: Path = OUT) -> dict:
    """preset: the checkpoint's shape (`real`; a toy for the smoke run), written under `out`."""
    from engines.build import run_build
    from engines.plan import BuildSettings, make_build_plan
    from engines.tensorrt import load
    from export.manifest import Manifest

    ckpt, export = out / f"{preset}-1l", out / f"{preset}-1l-onnx"
    if not (ckpt / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "export.tiny", str(ckpt), "--preset", preset, "--layers", "1"], check=True)
    # Up-to-date layer-ranks are skipped (the export part may have written them).
    subprocess.run([sys.executable, "-m", "export.to_onnx", str(ckpt), "--tp", "8", "--out", str(export),
                    "--no-fp32-twins", "--quiet"], check=True)
    man = Manifest.load(export / "tp8")
    rt = load("tensorrt-rtx")
    settings = BuildSettings(compute_capability="SM80")
    plan = make_build_plan(man, settings, rt.version, [0])
    plan.jobs = [j for j in plan.jobs if j.record.rank == 0]
    engines = out / f"{preset}-1l-engines"
    run_build(rt, man, plan, engines, settings)
    engine_bytes = {j.record.subgraph: (engines / j.engine).stat().st_size for j in plan.jobs}
    layer = {k: v for k, v in engine_bytes.items() if k.startswith("layers.0.")}
    loaded = {}  # the runtime's weight inputs: one copy per (file, offset)
    for name in layer:
        files = man.graph_files(name, 0, "bf16")
        for spec in man.subgraphs[name].weight_inputs:
            offset, nbytes = files.inputs_at[spec.name]
            loaded[(files.weights, offset)] = nbytes
    total = sum(layer.values()) + sum(loaded.values())
    return res.add("engine-memory", builder=rt.version, target="SM80", tp=8, rank=0,
                   layer_rank_gb=round(total / 1e9, 3), target_gb=TARGET_GB, met=total / 1e9 <= TARGET_GB,
                   engines_mb={k.split(".", 2)[-1]: round(v / 1e6, 1) for k, v in layer.items()},
                   expert_weights_mb=round(sum(loaded.values()) / 1e6, 1),
                   embed_mb=round(engine_bytes.get("embed", 0) / 1e6, 1),
                   head_mb=round(engine_bytes.get("head", 0) / 1e6, 1))
