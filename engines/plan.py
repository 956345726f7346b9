"""What `make engines` builds: a plain function of the export manifest and the build settings.

One engine per (subgraph, rank). Each engine gets optimization profiles over the token dimension T:
each MoE form covers its range of the manifest's schedule (export/moe_forms.py), and every other
subgraph a decode profile (1..decode_max) and a prefill profile (1..max_tokens), so the runtime
picks a profile by token count. Engines whose key (ONNX sha256, settings, TensorRT version, profiles)
matches the one recorded by the last build are skipped. Work is spread over the GPUs, largest first,
each to the least-loaded GPU.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from export.manifest import EngineRecord, Manifest, Profile, engine_file

HARDWARE = ("same", "ampere_plus")
COMPUTE_CAPABILITIES = ("SM80", "SM86", "SM89", "SM120", "SM121")  # TensorRT-RTX targets with BF16


@dataclass(frozen=True)
class BuildSettings:
    hardware: str = "same"            # same: build on the A100 itself; ampere_plus: on a newer GPU for SM80+
    version_compatible: bool = False  # runs on the lean runtime (tensorrt_lean) of later TensorRT versions
    opt_level: int = 3                # builder_optimization_level, 0..5
    workspace_gb: float = 8.0
    decode_max: int = 256             # largest token count of the decode profile
    compute_capability: str = "SM80"  # TensorRT-RTX's ahead-of-time target (TensorRT 11 builds for its GPU)

    def check(self) -> None:
        if self.hardware not in HARDWARE:
            raise ValueError(f"hardware compatibility {self.hardware!r} is not one of {HARDWARE}")
        if not 0 <= self.opt_level <= 5:
            raise ValueError(f"builder optimization level must be 0..5, got {self.opt_level}")
        if self.compute_capability not in COMPUTE_CAPABILITIES:
            raise ValueError(f"compute capability {self.compute_capability!r} is not one of {COMPUTE_CAPABILITIES}")
        if self.workspace_gb <= 0 or self.decode_max < 1:
            raise ValueError("workspace and decode_max must be positive")


@dataclass
class EngineJob:
    record: EngineRecord      # what engines.json will hold for it
    gpu: int = 0
    skip: bool = False        # up to date: built before with the same key

    @property
    def engine(self) -> str:
        return self.record.engine


@dataclass
class BuildPlan:
    jobs: list[EngineJob] = field(default_factory=list)

    @property
    def to_build(self) -> list[EngineJob]:
        return [j for j in self.jobs if not j.skip]

    def by_gpu(self) -> dict[int, list[EngineJob]]:
        out: dict[int, list[EngineJob]] = {}
        for j in self.to_build:
            out.setdefault(j.gpu, []).append(j)
        return out


def profiles_for(manifest: Manifest, name: str, settings: BuildSettings) -> list[Profile]:
    max_tokens = manifest.max_tokens
    sg = manifest.subgraphs[name]
    if sg.form is not None:
        lo, hi = manifest.moe.span(sg.form)
        opt = min(8, hi) if lo == 1 else min(max(lo, 1024), hi)  # decode-sized when it starts at 1
        return [Profile(sg.form, lo, opt, hi)]
    decode_max = min(settings.decode_max, max_tokens)
    profiles = [Profile("decode", 1, min(8, decode_max), decode_max)]
    if max_tokens > decode_max:
        profiles.append(Profile("prefill", 1, min(1024, max_tokens), max_tokens))
    return profiles


def job_key(record: EngineRecord, settings: BuildSettings, trt_version: str) -> str:
    blob = json.dumps([record.onnx_sha256, asdict(settings), trt_version, [asdict(p) for p in record.profiles]],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def make_build_plan(manifest: Manifest, settings: BuildSettings, trt_version: str, gpus: list[int],
                    built: dict[str, EngineRecord] | None = None, existing: set[str] | None = None) -> BuildPlan:
    """`built`: the records of the last build (engines.json), by engine path; `existing`: engine files
    present now. An engine is skipped when its file exists and its recorded key is the current one."""
    settings.check()
    if not gpus:
        raise ValueError("no GPU to build on")
    built, existing = built or {}, existing or set()
    plan = BuildPlan()
    for name, sg in manifest.subgraphs.items():
        for rank in sg.ranks:
            files = manifest.graph_files(name, rank, "bf16")
            rec = EngineRecord(subgraph=name, rank=rank, onnx=files.onnx, engine=engine_file(name, rank),
                               onnx_sha256=manifest.files[files.onnx].sha256,
                               weight_bytes=manifest.files[files.weights].bytes,
                               profiles=profiles_for(manifest, name, settings), inputs=list(sg.inputs))
            rec.key = job_key(rec, settings, trt_version)
            old = built.get(rec.engine)
            plan.jobs.append(EngineJob(rec, skip=rec.engine in existing and old is not None and old.key == rec.key))
    load = {g: 0 for g in gpus}
    for job in sorted(plan.to_build, key=lambda j: (-j.record.weight_bytes, j.engine)):
        job.gpu = min(load, key=lambda g: (load[g], g))
        load[job.gpu] += job.record.weight_bytes + 1
    return plan
