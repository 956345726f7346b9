"""One unit of export work: one layer's graphs for one rank (or the embedding, or the LM head).

Its files are written into a fresh temporary folder, checked (onnx.checker with shape inference,
TensorRT op support), moved into place, and only then stamped. The stamp holds a key of everything
the files depend on (code, settings, the shards' sizes and times) and every file's size and sha256;
a unit whose stamp is missing, stale or whose files changed size is exported again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from . import surgery
from .atomic import sha256_file, write_json_atomic
from .checkpoint import Checkpoint
from .layout import GraphLayout
from .manifest import FORMAT_VERSION, SubgraphSpec
from .pieces import build_modules
from .sharding import Shard
from .trt_support import check_model

DTYPE = torch.bfloat16


class ExportError(RuntimeError):
    """A traced graph failed a check, or the export cannot run here."""


# The modules that decide a unit's bytes: the pieces and the model they are built from, reading and
# dequantizing the checkpoint, the sharding, the layout and its specs, the MoE forms, the config, the
# trace and the graph surgery, and this one. Not the orchestration (to_onnx, jobs), the preflight,
# the checks (trt_support: a check passes or fails, it writes nothing), the text files, the toy
# writer: editing those must not invalidate a 460 GB export. tests/test_export.py holds this list to
# what `unit` imports.
STAMPED_MODULES = ("unit", "pieces", "model", "checkpoint", "fp8", "sharding", "layout", "manifest",
                   "moe_forms", "config", "surgery")
# The libraries that trace and write the graphs: another version may write other bytes.
STAMPED_PACKAGES = ("torch", "onnx", "onnxscript", "onnx_graphsurgeon", "ml_dtypes")


def code_hash(folder: Path = Path(__file__).parent) -> str:
    """What the code contributes to every unit's key: the byte-deciding modules' sources (in `folder`,
    the export package) and the versions of the libraries that write the graphs."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    for name in STAMPED_MODULES:
        h.update(name.encode() + (folder / f"{name}.py").read_bytes())
    for pkg in STAMPED_PACKAGES:
        try:
            h.update(f"{pkg}=={version(pkg)}".encode())
        except PackageNotFoundError:
            h.update(f"{pkg} absent".encode())
    return h.hexdigest()


def unit_of(tensor: str) -> str:
    """The export unit a checkpoint tensor belongs to: embed, head or layers.N."""
    if tensor.startswith("model.embed_tokens."):
        return "embed"
    if tensor.startswith(("model.norm.", "lm_head.")):
        return "head"
    return ".".join(tensor.split(".")[1:3])  # model.layers.N.... -> layers.N


def unit_shards(ckpt: Checkpoint) -> dict[str, list[str]]:
    """The shards each unit's tensors live in (one pass over the index)."""
    out: dict[str, set[str]] = defaultdict(set)
    for name in ckpt.specs:
        out[unit_of(name)].add(ckpt.weight_map[name])
    return {u: sorted(s) for u, s in out.items()}


def unit_key(ckpt: Checkpoint, layout: GraphLayout, unit: str, rank: int, code: str, shards: list[str]) -> str:
    """Everything the unit's files depend on: code, settings, and the shards its tensors live in
    (`unit_shards`). Not whether twins are written: a stamp says which kinds it has."""
    stats = [(s, (ckpt.dir / s).stat().st_size, (ckpt.dir / s).stat().st_mtime_ns) for s in shards]
    blob = json.dumps([FORMAT_VERSION, code, layout.cfg.to_dict(), layout.tp, layout.expert_split, rank, unit,
                       surgery.OPSET, stats] + ([list(layout.forms)] if unit.startswith("layers.") else []))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class UnitTask:
    unit: str
    rank: int
    rank_dir: Path
    key: str

    @property
    def stamp_path(self) -> Path:
        return self.rank_dir / ".stamps" / f"{self.unit}.json"


def valid_stamp(task: UnitTask, twins: bool) -> dict | None:
    """The unit's stamp if it is current (same key, files present at their recorded sizes, and the
    FP32 twins there when they are asked for); None if the unit must be exported."""
    path = task.stamp_path
    if not path.is_file():
        return None
    try:
        stamp = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if stamp.get("key") != task.key:
        return None
    if not all((task.rank_dir / f).is_file() and (task.rank_dir / f).stat().st_size == m["bytes"]
               for f, m in stamp["files"].items()):
        return None
    if twins and not all("fp32" in g for g in stamp["graphs"].values()):
        return None
    return stamp


def trace_key(layout: GraphLayout, spec: SubgraphSpec, rank: int) -> tuple:
    """Graphs differ between layers only in their weights; between ranks also in the expert offset
    (a constant) under expert parallelism. One trace serves every unit with the same key."""
    offset = Shard(layout.tp, rank, layout.expert_split).expert_range(layout.cfg)[0] if spec.piece in ("moe", "post") else 0
    return spec.piece, spec.form, offset


def trace_missing(ckpt: Checkpoint, layout: GraphLayout, unit: str, rank: int, specs: list[SubgraphSpec],
                  traces: dict) -> None:
    """Trace the unit's pieces not in `traces` yet (from streamed modules: no big weights read)."""
    missing = [s for s in specs if trace_key(layout, s, rank) not in traces]
    if missing:
        modules, _ = build_modules(ckpt, layout, unit, rank, missing, DTYPE, stream=True)
        for s in missing:
            traces[trace_key(layout, s, rank)] = surgery.trace(modules[s.name], s, layout.cfg)


def export_unit(ckpt: Checkpoint, layout: GraphLayout, task: UnitTask, specs: list[SubgraphSpec], twins: bool,
                traces: dict) -> dict:
    """Write, check, move into place and stamp one unit; returns the stamp. The big weights are
    streamed (export/pieces.py, stream=True): read and dequantized slice by slice by a background
    thread while the file writes and the hashing go on (all outside the GIL), never whole in memory."""
    tmp = task.rank_dir / f".tmp-{task.unit}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        return _export_unit(ckpt, layout, task, specs, twins, traces, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk gets its space back; nothing half-written stays
        raise


def _export_unit(ckpt: Checkpoint, layout: GraphLayout, task: UnitTask, specs: list[SubgraphSpec], twins: bool,
                 traces: dict, tmp: Path) -> dict:
    t0 = time.perf_counter()
    rank_dir, rank = task.rank_dir, task.rank
    trace_missing(ckpt, layout, task.unit, rank, specs, traces)
    modules, chunks = build_modules(ckpt, layout, task.unit, rank, specs, DTYPE, stream=True)
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
            proto, at = surgery.to_proto(traces[trace_key(layout, s, rank)], module, weights, chunks,
                                         tuple(t.name for t in s.weight_inputs))
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
    if not twins:  # twins of an earlier export of this unit would no longer match its graphs
        for name in [f"{s.name}.fp32.onnx" for s in specs] + [f"{g}.fp32.weights" for g in by_group]:
            (rank_dir / name).unlink(missing_ok=True)
    for f in tmp.iterdir():  # weights first, graphs after: a graph never points at missing weights
        if f.suffix == ".weights":
            os.replace(f, rank_dir / f.name)
    for f in tmp.iterdir():
        os.replace(f, rank_dir / f.name)
    tmp.rmdir()
    rels = {kind[k] for g in files.values() for kind in g.values() for k in ("onnx", "weights")}
    stamp = {"key": task.key, "graphs": dict(files), "seconds": round(time.perf_counter() - t0, 3),
             "files": {f: {"bytes": (rank_dir / f).stat().st_size,
                           "sha256": digests.get(f) or sha256_file(rank_dir / f)} for f in sorted(rels)}}
    write_json_atomic(task.stamp_path, stamp)
    return stamp
