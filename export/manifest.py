"""The contract between the stages: `manifest.json` (the export writes it; the engine builder and the
runtime read it) and `engines.json` (the engine builder writes it; the runtime reads it). Both are
typed dataclasses here and nowhere else is their JSON spelled.

manifest.json, at <export>/tp<N>/, format FORMAT_VERSION:
- `model`: the ModelConfig (special ids included); `tp`, `expert_split`, `opset`, `fp32_twins`;
- `moe_forms`: which MoE form runs at which step size, as [form, largest token count] ranges
  (export/moe_forms.py), `moe_forms_source` (measured, given or modeled) and `moe_block_form` (the
  block form's version, 1 when absent: the memory plan sizes its activations by it); `max_tokens`, the
  largest step the graphs and engines take;
- `subgraphs`: name -> SubgraphSpec (piece, layer, MoE form, typed inputs and outputs with the symbolic
  token dimension "T", the ranks that run it, its weights group) with its files per rank and kind
  ("bf16": what TensorRT builds; "fp32": the twin ONNX Runtime runs on CPU);
- `steps`: what the runtime executes, in order, on one table of named tensors: SubgraphStep (one
  subgraph, or one per MoE form), AllReduceStep, BroadcastStep, AttentionStep;
- `files`: every file's size and sha256, relative to the manifest's folder.

engines.json, in the engines folder: the TensorRT version and build settings, and per engine
(`rank<r>/<subgraph>.engine`) the ONNX file and sha256 it was built from, its optimization profiles
and its key (what a rebuild compares).

A manifest of another format version is refused with a clear error; so is a file that does not
match its record.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

from .atomic import sha256_file, write_json_atomic
from .config import ModelConfig
from .moe_forms import MoeSchedule, ScheduleError

FORMAT_VERSION = 5  # 2: special ids from the text files; 3: typed steps, .engine files; 4: experts as inputs;
#                    5: a schedule of MoE forms (block form added) in place of one crossover
MANIFEST = "manifest.json"
ENGINES_JSON = "engines.json"
TOKENS = "T"  # the one symbolic dimension: tokens of all sequences in a step, packed


class ManifestError(ValueError):
    """The export is missing, from another format version, or its files do not match it."""


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: unreadable {what} ({e})") from e


# ---- subgraphs and steps ------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str    # "bfloat16" | "float32" | "int64" (the BF16 graph's; twins use float32 for bfloat16)
    shape: tuple  # ints and TOKENS

    def concrete(self, tokens: int) -> tuple[int, ...]:
        return tuple(tokens if d == TOKENS else d for d in self.shape)

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class GraphFiles:
    onnx: str     # relative to the manifest's folder
    weights: str  # the external-data file it reads
    # Weights that are graph inputs (the MoE experts): name -> [offset, bytes] in the bf16 weights file.
    inputs_at: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class SubgraphSpec:
    name: str              # "embed", "layers.3.attn_in", "layers.3.moe_gather", "head", ...
    piece: str             # which module builds it: embed attn_in qk_rope attn o_proj moe post head
    layer: int | None
    form: str | None       # MoE form, for moe / post
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ranks: tuple[int, ...]
    weights_group: str     # subgraphs with the same group on a rank share one external-data file
    files: dict[int, dict[str, GraphFiles]] = field(default_factory=dict)  # rank -> kind -> files
    # Weights passed as inputs (the experts of the MoE subgraphs): the runtime loads them once per
    # layer-rank and binds the same buffer to both MoE forms, so they are stored once per GPU.
    weight_inputs: tuple[TensorSpec, ...] = ()

    @property
    def unit(self) -> str:
        """Subgraphs built from one read of weights: a layer, the embedding, the head."""
        return f"layers.{self.layer}" if self.layer is not None else self.name

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "files"}
        d["inputs"] = [asdict(t) | {"shape": list(t.shape)} for t in self.inputs]
        d["outputs"] = [asdict(t) | {"shape": list(t.shape)} for t in self.outputs]
        d["weight_inputs"] = [asdict(t) | {"shape": list(t.shape)} for t in self.weight_inputs]
        d["ranks"] = list(self.ranks)
        d["files"] = {str(r): {k: asdict(f) for k, f in kinds.items()} for r, kinds in self.files.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "SubgraphSpec":
        return cls(d["name"], d["piece"], d["layer"], d["form"], tuple(TensorSpec.from_json(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_json(t) for t in d["outputs"]), tuple(d["ranks"]), d["weights_group"],
                   {int(r): {k: GraphFiles(**f) for k, f in kinds.items()} for r, kinds in d.get("files", {}).items()},
                   tuple(TensorSpec.from_json(t) for t in d.get("weight_inputs", [])))


@dataclass(frozen=True)
class SubgraphStep:
    """Run one subgraph; with variants, the one of the step's MoE form (form -> subgraph name)."""
    name: str
    variants: dict[str, str] | None = None

    def pick(self, form: str) -> str:
        return self.variants[form] if self.variants else self.name


@dataclass(frozen=True)
class AllReduceStep:
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class BroadcastStep:
    tensors: tuple[str, ...]
    src: int


@dataclass(frozen=True)
class AttentionStep:
    """Paged attention of layer `layer`: write k/v into the cache, attend q over it, into `out`."""
    layer: int
    q: str
    k: str
    v: str
    out: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float


Step = Union[SubgraphStep, AllReduceStep, BroadcastStep, AttentionStep]
_OPS = {"subgraph": SubgraphStep, "all_reduce": AllReduceStep, "broadcast": BroadcastStep, "attention": AttentionStep}
_OP_OF = {cls: op for op, cls in _OPS.items()}


def step_to_json(step: Step) -> dict:
    d = {"op": _OP_OF[type(step)]} | asdict(step)
    if isinstance(step, SubgraphStep) and step.variants is None:
        del d["variants"]
    if "tensors" in d:
        d["tensors"] = list(d["tensors"])
    return d


def step_from_json(d: dict) -> Step:
    d = dict(d)
    op = d.pop("op", None)
    if op not in _OPS:
        raise ManifestError(f"unknown step op {op!r} in the manifest")
    if "tensors" in d:
        d["tensors"] = tuple(d["tensors"])
    return _OPS[op](**d)


@dataclass(frozen=True)
class FileRecord:
    bytes: int
    sha256: str


# ---- the manifest -------------------------------------------------------------------------------

@dataclass
class Manifest:
    config: ModelConfig
    tp: int
    expert_split: str
    opset: int
    fp32_twins: bool
    moe: MoeSchedule
    max_tokens: int
    steps: list[Step]
    subgraphs: dict[str, SubgraphSpec]
    files: dict[str, FileRecord]
    checkpoint: str = ""               # the checkpoint exported (absolute), and relative to the manifest
    checkpoint_relative: str = ""
    text_files: list[str] = field(default_factory=list)
    exported: list[dict] = field(default_factory=list)  # seconds per layer-rank of the last run
    producer: str = "minimax-m2-trt export.to_onnx"
    dtype: str = "bfloat16"
    root: Path = Path(".")             # the folder it was loaded from (not stored)

    # ---- files --------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION, "producer": self.producer, "checkpoint": self.checkpoint,
            "checkpoint_relative": self.checkpoint_relative, "model": self.config.to_dict(), "tp": self.tp,
            "expert_split": self.expert_split, "opset": self.opset, "dtype": self.dtype,
            "fp32_twins": self.fp32_twins, "text_files": self.text_files,
            "moe_forms": self.moe.to_json(), "moe_forms_source": self.moe.source,
            "moe_block_form": self.moe.block_form,
            "max_tokens": self.max_tokens, "steps": [step_to_json(s) for s in self.steps],
            "subgraphs": {n: s.to_json() for n, s in self.subgraphs.items()},
            "files": {k: asdict(v) for k, v in sorted(self.files.items())}, "exported": self.exported,
        }

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST
        write_json_atomic(path, self.to_json())
        self.root = path.parent
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST
        if not path.is_file():
            raise ManifestError(f"{path}: no manifest; run `make onnx` (an interrupted export leaves none)")
        d = _read_json(path, "manifest")
        if d.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"{path}: format version {d.get('format_version')!r}, this code reads "
                                f"{FORMAT_VERSION}; export again (`make onnx`)")
        try:
            return cls(
                config=ModelConfig.from_dict(d["model"]), tp=d["tp"], expert_split=d["expert_split"],
                opset=d["opset"], fp32_twins=d["fp32_twins"],
                # exports before the key hold the one-pass block form
                moe=MoeSchedule.from_json(d["moe_forms"], d.get("moe_forms_source", ""), d.get("moe_block_form", 1)),
                max_tokens=d["max_tokens"],
                steps=[step_from_json(s) for s in d["steps"]],
                subgraphs={n: SubgraphSpec.from_json(s) for n, s in d["subgraphs"].items()},
                files={k: FileRecord(**v) for k, v in d["files"].items()}, checkpoint=d.get("checkpoint", ""),
                checkpoint_relative=d.get("checkpoint_relative", ""), text_files=d.get("text_files", []),
                exported=d.get("exported", []), producer=d.get("producer", ""), dtype=d.get("dtype", "bfloat16"),
                root=path.parent)
        except (KeyError, TypeError, ScheduleError) as e:
            raise ManifestError(f"{path}: not a valid manifest ({type(e).__name__}: {e}); export again") from e

    # ---- queries ------------------------------------------------------------------------------
    def on_rank(self, rank: int) -> dict[str, SubgraphSpec]:
        return {n: s for n, s in self.subgraphs.items() if rank in s.ranks}

    def graph_files(self, subgraph: str, rank: int, kind: str = "bf16") -> GraphFiles:
        sg = self.subgraphs.get(subgraph)
        if sg is None:
            raise ManifestError(f"{self.root / MANIFEST}: no subgraph {subgraph!r}")
        files = sg.files.get(rank)
        if files is None:
            raise ManifestError(f"subgraph {subgraph} has no files for rank {rank} (ranks {list(sg.ranks)})")
        if kind not in files:
            raise ManifestError(f"subgraph {subgraph} has no {kind} graph in this export (fp32 twins: {self.fp32_twins})")
        return files[kind]

    def path(self, subgraph: str, rank: int, kind: str = "bf16") -> Path:
        """The ONNX file of one subgraph on one rank: kind "bf16" (for TensorRT) or "fp32" (the twin)."""
        return self.root / self.graph_files(subgraph, rank, kind).onnx

    def weight_input_arrays(self, subgraph: str, rank: int, dtype: str = "bfloat16") -> dict:
        """The subgraph's weight inputs as numpy arrays read from the bf16 weights file (float32
        copies for the twins); the same (file, offset) gives the same bytes to both MoE forms."""
        import ml_dtypes
        import numpy as np

        sg, files = self.subgraphs[subgraph], self.graph_files(subgraph, rank, "bf16")
        out = {}
        for spec in sg.weight_inputs:
            offset, nbytes = files.inputs_at[spec.name]
            raw = np.fromfile(self.root / files.weights, dtype=np.uint8, count=nbytes, offset=offset)
            a = raw.view(ml_dtypes.bfloat16).reshape(spec.shape)
            out[spec.name] = a.astype(np.float32) if dtype == "float32" else a
        return out

    def weight_inputs(self, rank: int, dtype: str = "bfloat16") -> dict[str, dict]:
        """Every weight input of the rank's subgraphs, read once per (file, offset): both MoE forms of
        a layer-rank get the very same arrays (subgraph -> name -> array)."""
        loaded, out = {}, {}
        for name, sg in self.on_rank(rank).items():
            if not sg.weight_inputs:
                continue
            files = self.graph_files(name, rank, "bf16")
            keys = {s.name: (files.weights, files.inputs_at[s.name][0]) for s in sg.weight_inputs}
            if not all(k in loaded for k in keys.values()):
                loaded.update({keys[n]: a for n, a in self.weight_input_arrays(name, rank, dtype).items()})
            out[name] = {n: loaded[k] for n, k in keys.items()}
        return out

    def checkpoint_dir(self) -> Path:
        """The checkpoint beside the export (moved together) if there, else where it was exported from."""
        near = self.root / self.checkpoint_relative if self.checkpoint_relative else None
        return near if near is not None and near.is_dir() else Path(self.checkpoint)

    def verify(self, ranks: list[int] | None = None, kinds: tuple[str, ...] = ("bf16", "fp32"),
               hashes: bool = True) -> None:
        """Every file the manifest lists for these ranks exists with its recorded size (and sha256)."""
        wanted = set()
        for sg in self.subgraphs.values():
            for rank, files in sg.files.items():
                if ranks is None or rank in ranks:
                    wanted.update(p for kind in kinds if kind in files for p in (files[kind].onnx, files[kind].weights))
        for rel in sorted(wanted):
            meta = self.files[rel]
            p = self.root / rel
            if not p.is_file():
                raise ManifestError(f"{p}: listed in the manifest but missing")
            if p.stat().st_size != meta.bytes:
                raise ManifestError(f"{p}: {p.stat().st_size} bytes, the manifest says {meta.bytes}")
            if hashes and sha256_file(p) != meta.sha256:
                raise ManifestError(f"{p}: content does not match the manifest's sha256; export again")

    def files_digest(self) -> str:
        return hashlib.sha256(json.dumps({k: asdict(v) for k, v in sorted(self.files.items())}).encode()).hexdigest()


def find_manifest(path: str | Path) -> Path:
    """Accept a manifest, a tp<N> folder, or an export folder holding one tp<N>."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / MANIFEST).is_file():
        return p / MANIFEST
    found = sorted(p.glob(f"tp*/{MANIFEST}")) if p.is_dir() else []
    if len(found) == 1:
        return found[0]
    if found:
        raise ManifestError(f"{p} holds exports for several TP sizes ({', '.join(f.parent.name for f in found)}); "
                            "name one")
    raise ManifestError(f"{p}: no export manifest here; run `make onnx MODEL=<checkpoint>` first")


# ---- engines.json -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile over the token dimension."""
    name: str
    min: int
    opt: int
    max: int


@dataclass
class EngineRecord:
    subgraph: str
    rank: int
    onnx: str                 # relative to the manifest's folder
    engine: str               # relative to the engines folder: rank<r>/<subgraph>.engine
    onnx_sha256: str
    weight_bytes: int
    profiles: list[Profile]
    inputs: list[TensorSpec]
    key: str = ""             # what a rebuild compares (ONNX sha256, settings, TensorRT version, profiles)
    build_seconds: float | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["inputs"] = [asdict(t) | {"shape": list(t.shape)} for t in self.inputs]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "EngineRecord":
        d = dict(d)
        d["profiles"] = [Profile(**p) for p in d["profiles"]]
        d["inputs"] = [TensorSpec.from_json(t) for t in d["inputs"]]
        return cls(**d)


def engine_file(subgraph: str, rank: int) -> str:
    return f"rank{rank}/{subgraph}.engine"


@dataclass
class EnginesIndex:
    tensorrt_version: str = ""
    settings: dict = field(default_factory=dict)
    manifest_sha256: str = ""
    engines: dict[str, EngineRecord] = field(default_factory=dict)  # by engine file

    @classmethod
    def load(cls, folder: str | Path, missing_ok: bool = False) -> "EnginesIndex":
        path = Path(folder) / ENGINES_JSON
        if not path.is_file():
            if missing_ok:
                return cls()
            raise ManifestError(f"{path}: not found; build the engines with `make engines`")
        d = _read_json(path, ENGINES_JSON)
        try:
            return cls(d["tensorrt_version"], d["settings"], d.get("manifest_sha256", ""),
                       {k: EngineRecord.from_json(v) for k, v in d["engines"].items()})
        except (KeyError, TypeError) as e:
            raise ManifestError(f"{path}: not a valid {ENGINES_JSON} ({e}); rebuild the engines") from e

    def save(self, folder: str | Path) -> None:
        write_json_atomic(Path(folder) / ENGINES_JSON, {
            "tensorrt_version": self.tensorrt_version, "settings": self.settings,
            "manifest_sha256": self.manifest_sha256, "engines": {k: v.to_json() for k, v in self.engines.items()}})
