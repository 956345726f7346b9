"""Export a MiniMax-M2 checkpoint to per-layer ONNX subgraphs for every tensor-parallel rank.

    python -m export.to_onnx CHECKPOINT [--tp 8] [--out build/<model>/onnx]

writes <out>/tp<N>/rank<r>/<subgraph>.onnx (BF16, what TensorRT builds) with its weights as
external data, an FP32 twin <subgraph>.fp32.onnx (what ONNX Runtime runs on CPU), and
<out>/tp<N>/manifest.json. One layer-rank of weights is in memory at a time. Each layer-rank is
written to a temporary folder, checked (onnx.checker with shape inference, TensorRT op support),
moved into place, and only then stamped; the manifest is removed when an export starts and written
last. So an interrupted export leaves nothing a later run trusts, and a rerun redoes only what has
no valid stamp.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from . import surgery
from .checkpoint import Checkpoint, CheckpointError
from .config import ConfigError
from .atomic import sha256_file, write_json_atomic
from .manifest import FORMAT_VERSION, MANIFEST, FileRecord, GraphFiles, Manifest, SubgraphSpec
from .paths import export_dir, tp_dir
from .layout import GraphLayout, default_crossover, make_layout
from .pieces import build_modules
from .sharding import EXPERT_SPLITS, ShardingError
from .text_config import TEXT_FILES
from .trt_support import check_model

DTYPE = torch.bfloat16
DEFAULT_MAX_TOKENS = 8192  # largest token count per step the engines' profiles must cover


class ExportError(RuntimeError):
    """A traced graph failed a check."""


def measured_crossover(path: Path, cfg, tp: int, expert_split: str) -> tuple[int, str] | None:
    """The crossover `make bench` measured (build/bench/moe_crossover.json), when it was measured on
    this model's expert-shard shape; None otherwise."""
    d = json.loads(Path(path).read_text())
    if expert_split != "intermediate" or (d["num_experts"], d["top_k"], d["hidden_size"], d["shard_intermediate"]) != \
            (cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.intermediate_size // tp):
        return None
    return d["moe_crossover_tokens"], f"measured by make bench on {d['measured_on']}"


def _code_hash() -> str:
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _tensor_prefixes(unit: str) -> tuple[str, ...]:
    if unit == "embed":
        return ("model.embed_tokens.",)
    if unit == "head":
        return ("model.norm.", "lm_head.")
    return (f"model.{unit}.",)


def unit_key(ckpt: Checkpoint, layout: GraphLayout, unit: str, rank: int, twins: bool, code: str) -> str:
    """Everything the unit's files depend on: code, settings, and the shards its tensors live in."""
    shards = sorted({ckpt.weight_map[n] for n in ckpt.specs if n.startswith(_tensor_prefixes(unit))})
    stats = [(s, (ckpt.dir / s).stat().st_size, (ckpt.dir / s).stat().st_mtime_ns) for s in shards]
    blob = json.dumps([FORMAT_VERSION, code, layout.cfg.to_dict(), layout.tp, layout.expert_split, rank, unit, twins,
                       surgery.OPSET, stats])
    return hashlib.sha256(blob.encode()).hexdigest()


def export_unit(ckpt: Checkpoint, layout: GraphLayout, unit: str, rank: int, specs: list[SubgraphSpec],
                rank_dir: Path, twins: bool, traces: dict) -> tuple[dict[str, dict], dict[str, str]]:
    """Write one unit's graphs into a fresh temporary folder, check them, then move them into place.
    Returns ({subgraph: {"bf16": {"onnx", "weights"}, "fp32": {...}}}, {weights file: sha256}) with
    paths relative to rank_dir. The big weights are streamed (export/pieces.py, stream=True): read
    and dequantized slice by slice by a background thread while the file writes and the hashing go
    on (all outside the GIL), never whole in memory."""
    tmp = rank_dir / f".tmp-{unit}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    modules, chunks = build_modules(ckpt, layout, unit, rank, specs, DTYPE, stream=True)
    files: dict[str, dict] = defaultdict(dict)
    digests: dict[str, str] = {}
    by_group: dict[str, list[SubgraphSpec]] = defaultdict(list)
    for s in specs:
        by_group[s.weights_group].append(s)
    for group, group_specs in by_group.items():
        weights = surgery.WeightsFile(tmp / f"{group}.weights")
        protos, inputs_at = {}, {}
        for s in group_specs:
            module = modules.pop(s.name)
            # Graphs differ between layers only in their weights; between ranks also in the expert
            # offset (a constant) under expert parallelism.
            key = (s.piece, s.form, getattr(getattr(module, "moe", module), "expert_offset", 0))
            if key not in traces:
                traces[key] = surgery.trace(module, s, layout.cfg)
            proto, at = surgery.to_proto(traces[key], module, weights, chunks, tuple(t.name for t in s.weight_inputs))
            protos[s.name] = surgery.tidy(proto, s)
            inputs_at[s.name] = at
        weights.close()
        digests[weights.path.name] = weights.sha256
        twin_weights = surgery.WeightsFile(tmp / f"{group}.fp32.weights") if twins else None
        for name, proto in protos.items():
            problems = check_model(proto)
            if problems:
                raise ExportError(f"{name} (rank {rank}) is outside TensorRT's ONNX support:\n  " + "\n  ".join(problems))
            surgery.save(proto, tmp / f"{name}.onnx")
            files[name]["bf16"] = {"onnx": f"{name}.onnx", "weights": weights.path.name, "inputs_at": inputs_at[name]}
            if twins:
                surgery.save(surgery.fp32_twin(proto, tmp, twin_weights), tmp / f"{name}.fp32.onnx")
                files[name]["fp32"] = {"onnx": f"{name}.fp32.onnx", "weights": twin_weights.path.name}
        if twins:
            twin_weights.close()
            digests[twin_weights.path.name] = twin_weights.sha256
    for f in tmp.iterdir():  # weights first, graphs after: a graph never points at missing weights
        if f.suffix == ".weights":
            os.replace(f, rank_dir / f.name)
    for f in tmp.iterdir():
        os.replace(f, rank_dir / f.name)
    tmp.rmdir()
    return dict(files), digests


def export(checkpoint: str | Path, out: str | Path | None = None, tp: int = 1, expert_split: str = "intermediate",
           twins: bool = True, moe_crossover: int | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
           progress: bool = True, crossover_file: str | Path | None = None) -> Path:
    """Export (or bring up to date) and return the manifest's path. The MoE crossover is
    `moe_crossover` if given, else the measurement in `crossover_file` when it fits this shape, else
    experts / top_k."""
    ckpt = Checkpoint(checkpoint)  # validates every tensor before any work
    layout = make_layout(ckpt.config, tp, expert_split)  # a TP that does not divide fails here
    measured = measured_crossover(crossover_file, ckpt.config, tp, expert_split) if crossover_file else None
    if moe_crossover is not None:
        crossover, source = moe_crossover, "given (--moe-crossover)"
    elif measured:
        crossover, source = measured
    else:
        crossover, source = default_crossover(ckpt.config), "default: experts / top_k (not measured for this shape)"
    if crossover < 1 or max_tokens < 1:
        raise ValueError("--moe-crossover and --max-tokens must be at least 1")
    root = tp_dir(export_dir(ckpt.dir, out), tp)
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)  # from here on, nothing in root is trusted until the end
    code = _code_hash()
    units: dict[tuple[str, int], list[SubgraphSpec]] = defaultdict(list)
    for s in layout.subgraphs:
        for r in s.ranks:
            units[(s.unit, r)].append(s)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(units), desc=f"export tp{tp}", unit="layer-rank")
    stamps, timings, traces = {}, [], {}
    todo = []
    for (unit, rank), specs in units.items():
        rank_dir = root / f"rank{rank}"
        rank_dir.mkdir(exist_ok=True)
        stamp_path = rank_dir / ".stamps" / f"{unit}.json"
        key = unit_key(ckpt, layout, unit, rank, twins, code)
        stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else None
        if stamp and stamp["key"] == key and all(
                (rank_dir / f).is_file() and (rank_dir / f).stat().st_size == m["bytes"]
                for f, m in stamp["files"].items()):
            stamps[(unit, rank)] = stamp
            if bar:
                bar.update()
        else:
            todo.append((unit, rank, specs, rank_dir, stamp_path, key))

    for unit, rank, specs, rank_dir, stamp_path, key in todo:
        if bar:
            bar.set_postfix_str(f"{unit} rank {rank}")
        t0 = time.perf_counter()
        graphs, digests = export_unit(ckpt, layout, unit, rank, specs, rank_dir, twins, traces)
        rels = {kind[k] for g in graphs.values() for kind in g.values() for k in ("onnx", "weights")}
        stamp = {"key": key, "graphs": graphs, "seconds": round(time.perf_counter() - t0, 3),
                 "files": {f: {"bytes": (rank_dir / f).stat().st_size,
                               "sha256": digests.get(f) or sha256_file(rank_dir / f)} for f in sorted(rels)}}
        write_json_atomic(stamp_path, stamp)
        timings.append((unit, rank, stamp["seconds"]))
        stamps[(unit, rank)] = stamp
        if bar:
            bar.update()
    if bar:
        bar.close()

    subgraphs, files = {}, {}
    for s in layout.subgraphs:
        s.files = {r: {kind: GraphFiles(onnx=f"rank{r}/{paths['onnx']}", weights=f"rank{r}/{paths['weights']}",
                                        inputs_at=paths.get("inputs_at", {}))
                       for kind, paths in stamps[(s.unit, r)]["graphs"][s.name].items()} for r in s.ranks}
        for r in s.ranks:
            files.update({f"rank{r}/{f}": FileRecord(**m) for f, m in stamps[(s.unit, r)]["files"].items()})
        subgraphs[s.name] = s
    # The runtime needs the tokenizer, chat template and sampling defaults, not the checkpoint.
    text_files = []
    for name in TEXT_FILES:
        if (ckpt.dir / name).is_file():
            tmp = root / f".{name}.tmp"
            shutil.copyfile(ckpt.dir / name, tmp)
            os.replace(tmp, root / name)
            text_files.append(name)
    manifest = Manifest(
        config=layout.cfg, tp=tp, expert_split=expert_split, opset=surgery.OPSET, fp32_twins=twins,
        moe_crossover_tokens=crossover, moe_crossover_source=source, max_tokens=max_tokens, steps=layout.steps,
        subgraphs=subgraphs, files=files, checkpoint=str(ckpt.dir.resolve()),
        checkpoint_relative=os.path.relpath(ckpt.dir.resolve(), root.resolve()), text_files=text_files,
        exported=[{"unit": u, "rank": r, "seconds": s} for u, r, s in timings])
    return manifest.save(root)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.to_onnx", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="MiniMax-M2 FP8 checkpoint directory")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (must divide heads, KV heads, experts)")
    ap.add_argument("--out", help="output folder (default build/<checkpoint name>/onnx)")
    ap.add_argument("--expert-split", choices=EXPERT_SPLITS, default="intermediate",
                    help="split every expert's intermediate dim across ranks, or give each rank whole experts")
    ap.add_argument("--no-fp32-twins", action="store_true",
                    help="skip the FP32 twins (ONNX Runtime on CPU); the full model's twins take ~900 GB")
    ap.add_argument("--moe-crossover", type=int,
                    help="largest token count that runs the gather MoE form (default: --moe-crossover-file's "
                         "measurement when it fits this expert-shard shape, else experts / top-k)")
    ap.add_argument("--moe-crossover-file", help="a crossover measured by `make bench` (build/bench/moe_crossover.json)")
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                    help=f"largest tokens per step the engines must take (default {DEFAULT_MAX_TOKENS})")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        path = export(a.checkpoint, a.out, a.tp, a.expert_split, not a.no_fp32_twins, a.moe_crossover,
                      a.max_tokens, progress=not a.quiet, crossover_file=a.moe_crossover_file)
    except (CheckpointError, ConfigError, ShardingError, ExportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s (peak RSS {peak:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
