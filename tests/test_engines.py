"""The TensorRT stage, as far as it can be checked without TensorRT (which cannot be installed here):

- every TensorRT name the builder and the runtime backend use exists in TensorRT 11.4: the code runs
  against a recording stand-in for the `tensorrt` module (no engine is built or run), and each
  recorded name is looked up in the real lean bindings (tensorrt_lean, installed from PyPI) and in
  the identifier list of the full 11.4 bindings (tests/data); a removed name fails;
- the build plan is a plain function of the manifest and the settings, and so is what a captured
  decode step binds (which engines, which profile, which shapes per bucket); the capture itself
  has never run;
- without TensorRT 11, `make engines TENSORRT=tensorrt` fails with a clear message, having written nothing.
Real builds with TensorRT-RTX are in tests/test_engines_rtx.py.
"""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engines import build as build_mod
from engines.plan import BuildSettings, make_build_plan
from engines.tensorrt import TensorRT
from export.manifest import EngineRecord, Manifest, ManifestError, Profile
from runtime.backends import tensorrt as trt_backend

ROOT = Path(__file__).resolve().parents[1]
# Identifiers read out of the full TensorRT 11.4 bindings (see its header), kept in the repository.
IDENTIFIERS = ROOT / "tests" / "data" / "tensorrt-11.4-python-identifiers.txt"
# Named in TensorRT 11's own Python API documentation but absent from the identifier
# list, which was read out of the bindings' strings, and from the runtime-only lean module.
DOCUMENTED = {"Builder", "num_errors", "desc"}


class Recorder:
    """Stands in for the tensorrt module and every object it returns; records (owner path, name)."""

    def __init__(self, log, path="trt"):
        self._log, self._path = log, path

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        self._log.append((self._path, name))
        if name == "IProgressMonitor":  # subclassed by the builder: hand out a real class
            return type("IProgressMonitor", (), {"__init__": lambda self: None})
        return Recorder(self._log, f"{self._path}.{name}")

    def __setattr__(self, name, value):
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            self._log.append((self._path, name))

    def __call__(self, *args, **kwargs):
        return Recorder(self._log, f"{self._path}()")

    def __bool__(self):
        return True

    def __index__(self):
        return 1

    def __bytes__(self):
        return b"serialized"

    def __iter__(self):
        return iter(())


def _lean():
    return pytest.importorskip("tensorrt_lean")


def known_names(lean) -> set[str]:
    names = {l.strip() for l in IDENTIFIERS.read_text().splitlines() if l.strip() and not l.startswith("#")}
    names |= set(dir(lean)) | DOCUMENTED
    for attr in dir(lean):
        obj = getattr(lean, attr)
        if isinstance(obj, type):
            names |= set(dir(obj))
    return names


def unknown(log, lean) -> list[str]:
    """Recorded names TensorRT 11.4 does not have. Where the owner is a real object of the lean
    bindings (an enum, a class), the name must be its attribute; else it must be a known identifier."""
    names, bad = known_names(lean), []
    for owner, name in log:
        real = lean
        for part in owner.split(".")[1:]:
            real = getattr(real, part, None) if real is not None and not part.endswith("()") else None
        if real is not None and owner != "trt":
            if not hasattr(real, name):
                bad.append(f"{owner}.{name}")
        elif name not in names:
            bad.append(f"{owner}.{name}")
    return sorted(set(bad))


def test_builder_uses_only_tensorrt_11_names(tmp_path, exported):
    lean = _lean()
    log = []
    job = make_build_plan(exported("tiny", 2), BuildSettings(), "11.4.0", [0]).jobs[1]
    for settings in (BuildSettings(), BuildSettings(hardware="ampere_plus", version_compatible=True)):
        rt = TensorRT("tensorrt", Recorder(log), "tensorrt 11.4.0")
        engine, cache = build_mod.build_engine(rt, tmp_path / "x.onnx", job, settings, b"")
        assert engine == b"serialized" and cache == b"serialized"
    used = {n for _, n in log}
    assert {"Builder", "OnnxParser", "create_network", "parse_from_file", "create_builder_config",
            "set_memory_pool_limit", "WORKSPACE", "builder_optimization_level", "hardware_compatibility_level",
            "AMPERE_PLUS", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "create_timing_cache", "set_timing_cache",
            "progress_monitor", "create_optimization_profile", "set_shape", "add_optimization_profile",
            "build_serialized_network", "get_timing_cache", "serialize"} <= used
    assert unknown(log, lean) == []


def test_runtime_backend_uses_only_tensorrt_11_names():
    lean = _lean()
    log = []
    trt = Recorder(log)
    _, runtime = trt_backend.make_runtime(trt, True)
    record = EngineRecord("x", 0, "x.onnx", "rank0/x.engine", "", 0, [Profile("decode", 1, 4, 8)], [])
    le = trt_backend.load_engine(trt, runtime, b"engine", "x", record)
    trt_backend.bind_scratch([le], 0, 1)
    le2 = trt_backend.LoadedEngine(Recorder(log, "engine"), Recorder(log, "trt().deserialize_cuda_engine()"
                                                                          ".create_execution_context()"),
                                   ["x"], ["y"], {"x": "BF16", "y": "BF16"}, [(1, 8)], 0)
    trt_backend.enqueue(le2, 4, {"x": torch.zeros(4, 2)}, lambda shape, dtype: torch.zeros(shape, dtype=dtype), 0)
    eager = {n for _, n in log}
    for name in ("deserialize_cuda_engine", "create_execution_context", "USER_MANAGED", "set_device_memory",
                 "set_optimization_profile_async", "set_input_shape", "set_tensor_address", "execute_async_v3",
                 "engine_host_code_allowed", "get_device_memory_size_for_profile_v2", "num_io_tensors"):
        assert name in eager, name
    # the captured decode path: a context per bucket, shaped before capture, then addresses only
    # (the recorder's shapes are empty tuples, so the binding's output shape is one)
    log.clear()
    le3 = trt_backend.LoadedEngine(Recorder(log, "trt().deserialize_cuda_engine()"), None, ["x"], ["y"],
                                   {"x": "BF16", "y": "BF16"}, [(1, 8)], 0)
    binding = trt_backend.BucketBinding(0, {"x": (4, 2)}, {"y": ()})
    ctx = trt_backend.bucket_context(trt, le3, "x", binding, 0, 1, 0)
    trt_backend.enqueue_bound(le3, ctx, "x", binding, {"x": torch.zeros(4, 2)},
                              lambda shape, dtype: torch.zeros(shape, dtype=dtype), 0)
    captured = {n for _, n in log}
    assert {"create_execution_context", "USER_MANAGED", "set_device_memory", "set_optimization_profile_async",
            "set_input_shape", "infer_shapes", "get_tensor_shape", "set_tensor_address", "execute_async_v3"} <= captured
    assert unknown(log, lean) == []


def test_removed_names_are_caught():
    lean = _lean()
    for owner, name in (("trt.BuilderFlag", "FP16"), ("trt.BuilderFlag", "BF16"), ("trt.BuilderFlag", "INT8"),
                        ("trt.NetworkDefinitionCreationFlag", "EXPLICIT_BATCH"),
                        ("trt().create_builder_config()", "set_flag_fp16"),
                        ("trt().deserialize_cuda_engine()", "device_memory_size"),
                        ("trt().deserialize_cuda_engine()", "create_execution_context_without_device_memory")):
        assert unknown([(owner, name)], lean) == [f"{owner}.{name}"], (owner, name)


def test_build_plan_is_a_function_of_manifest_and_settings(exported):
    man = exported("tiny", 2)
    s = BuildSettings(decode_max=64)
    plan = make_build_plan(man, s, "11.4.0", [0, 1, 2])
    pairs = {(j.record.subgraph, j.record.rank) for j in plan.jobs}
    assert pairs == {(n, r) for n, sg in man.subgraphs.items() for r in sg.ranks}
    by = {(j.record.subgraph, j.record.rank): j.record for j in plan.jobs}
    max_tokens = man.max_tokens
    assert man.moe.spec() == f"gather:4,dense:16,block:{max_tokens}"  # conftest's schedule
    assert [(p.min, p.max) for p in by[("layers.0.moe_gather", 1)].profiles] == [(1, 4)]
    assert [(p.min, p.max) for p in by[("layers.0.moe_dense", 0)].profiles] == [(5, 16)]
    assert [(p.min, p.max) for p in by[("layers.0.moe_block", 0)].profiles] == [(17, max_tokens)]
    assert [(p.name, p.min, p.max) for p in by[("layers.1.attn_in", 0)].profiles] == \
        [("decode", 1, 64), ("prefill", 1, max_tokens)]
    assert all(p.min <= p.opt <= p.max for j in plan.jobs for p in j.record.profiles)
    assert all(j.engine == f"rank{j.record.rank}/{j.record.subgraph}.engine" for j in plan.jobs)
    # spread over the GPUs, largest first to the least loaded: loads differ by at most one job
    loads = {g: sum(j.record.weight_bytes for j in plan.jobs if j.gpu == g) for g in (0, 1, 2)}
    biggest = max(j.record.weight_bytes for j in plan.jobs)
    assert max(loads.values()) - min(loads.values()) <= biggest
    # the same inputs give the same plan
    again = make_build_plan(man, s, "11.4.0", [0, 1, 2])
    assert [(j.engine, j.record.key, j.gpu) for j in again.jobs] == [(j.engine, j.record.key, j.gpu) for j in plan.jobs]


def _profiles(plan, rank: int) -> dict[str, list[tuple[int, int]]]:
    return {j.record.subgraph: [(p.min, p.max) for p in j.record.profiles] for j in plan.jobs if j.record.rank == rank}


def test_each_decode_bucket_binds_one_profile_and_the_manifests_shapes(exported):
    """What a captured decode step sets on each engine's bucket context, from the build plan's
    profiles and the manifest: the rank's engines outside the MoE and the bucket's MoE form, the
    profile holding the bucket (decode up to --decode-max, prefill past it), shapes at the bucket."""
    man = exported("tiny", 2)
    cfg = man.config
    plan = make_build_plan(man, BuildSettings(decode_max=8), "11.4.0", [0])
    assert man.moe.spec().startswith("gather:4,dense:16,")  # conftest's schedule
    for rank in range(man.tp):
        profiles = _profiles(plan, rank)
        for bucket, form in ((1, "gather"), (4, "gather"), (8, "dense"), (16, "dense"), (32, "block")):
            bound = trt_backend.bucket_bindings(man, rank, bucket, profiles)
            assert set(bound) == {n for n, sg in man.subgraphs.items() if rank in sg.ranks and sg.form in (None, form)}
            for name, b in bound.items():
                lo, hi = profiles[name][b.profile]
                assert lo <= bucket <= hi
                if man.subgraphs[name].form is None:  # [decode 1..8, prefill 1..max_tokens]
                    assert b.profile == (0 if bucket <= 8 else 1), (name, bucket)
                else:  # one profile per MoE form, over its span
                    assert b.profile == 0
            assert bound["head"].outputs["logits"] == (bucket, cfg.vocab_size // man.tp)
            assert bound["layers.0.attn_in"].inputs["residual"] == (bucket, cfg.hidden_size)
            assert bound["layers.0.qk_rope"].outputs["q_rot"] == \
                (bucket, cfg.num_attention_heads // man.tp, cfg.head_dim)
            moe = bound[f"layers.0.moe_{form}"]
            assert moe.inputs["h"] == (bucket, cfg.hidden_size)
            for w in man.subgraphs[f"layers.0.moe_{form}"].weight_inputs:  # the experts: no token dimension
                assert moe.inputs[w.name] == w.shape
    # the default build: every bucket up to --decode-max is in the decode profile
    plan = make_build_plan(man, BuildSettings(), "11.4.0", [0])
    for bucket in (1, 2, 64, BuildSettings().decode_max):
        assert {b.profile for b in trt_backend.bucket_bindings(man, 0, bucket, _profiles(plan, 0)).values()} == {0}
    # a bucket an engine's profiles do not hold is refused before anything is captured
    short = _profiles(plan, 0) | {"layers.1.o_proj": [(1, 4)]}
    with pytest.raises(ValueError, match=r"decode bucket 8: engine layers.1.o_proj \(rank 0\)"):
        trt_backend.bucket_bindings(man, 0, 8, short)
    assert trt_backend.profile_for([(1, 8), (1, 64)], 8) == 0 and trt_backend.profile_for([(1, 8), (1, 64)], 9) == 1
    assert trt_backend.profile_for([(1, 8)], 9) is None


def test_build_plan_skips_what_is_up_to_date(exported):
    man = exported("tiny", 1)
    s = BuildSettings()
    first = make_build_plan(man, s, "11.4.0", [0])
    records = {j.engine: j.record for j in first.jobs}
    existing = set(records)
    assert not make_build_plan(man, s, "11.4.0", [0], records, existing).to_build
    # a missing engine file, other settings, another TensorRT, a changed ONNX file: rebuilt
    gone = next(iter(existing))
    assert [j.engine for j in make_build_plan(man, s, "11.4.0", [0], records, existing - {gone}).to_build] == [gone]
    assert len(make_build_plan(man, dataclasses.replace(s, opt_level=5), "11.4.0", [0], records, existing).to_build) \
        == len(first.jobs)
    assert len(make_build_plan(man, s, "11.5.0", [0], records, existing).to_build) == len(first.jobs)
    changed = dict(records)
    changed[gone] = dataclasses.replace(changed[gone], key="stale")
    assert [j.engine for j in make_build_plan(man, s, "11.4.0", [0], changed, existing).to_build] == [gone]


def test_bad_settings_are_refused(exported):
    man = exported("tiny", 1)
    for bad, msg in ((BuildSettings(hardware="hopper"), "hardware compatibility"),
                     (BuildSettings(opt_level=7), "optimization level")):
        with pytest.raises(ValueError, match=msg):
            make_build_plan(man, bad, "11.4.0", [0])


def test_make_engines_without_tensorrt_11_writes_nothing(checkpoints, tmp_path):
    """TENSORRT=tensorrt: TensorRT 11 (which cannot be installed here) is asked for."""
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["alt"], ckpt)
    env = dict(os.environ)
    r = subprocess.run(["make", "--no-print-directory", "engines", f"MODEL={ckpt}", "TP=2", "TENSORRT=tensorrt",
                        f"BIN={Path(sys.executable).parent}"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0
    assert "TensorRT (with its builder and ONNX parser) is not installed" in r.stderr
    assert "pip install tensorrt" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert not (ROOT / "build" / "ckpt").exists()  # no export was started either
    # the default (embedded) model: not even the toy checkpoint is written
    r = subprocess.run(["make", "--no-print-directory", "engines", f"BUILD={tmp_path / 'b'}", "TENSORRT=tensorrt",
                        f"BIN={Path(sys.executable).parent}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "pip install tensorrt" in r.stderr
    assert not (tmp_path / "b").exists()


def test_manifest_mismatch_is_an_error(exported):
    sg = exported("tiny", 1).subgraphs["layers.0.attn"]
    ins = [t.name for t in sg.inputs]
    outs = [t.name for t in sg.outputs]
    dtypes = {t.name: {"bfloat16": "BF16", "int64": "INT64", "float32": "FLOAT"}[t.dtype]
              for t in sg.inputs + sg.outputs}
    trt_backend.check_against_manifest("layers.0.attn", sg, ins, outs, dtypes)
    with pytest.raises(ManifestError, match="does not match the manifest"):
        trt_backend.check_against_manifest("layers.0.attn", sg, ins[:-1], outs, dtypes)
    with pytest.raises(ManifestError, match="residual is FLOAT, the manifest says bfloat16"):
        trt_backend.check_against_manifest("layers.0.attn", sg, ins, outs, dict(dtypes, residual="FLOAT"))


def test_trt_backend_without_engines_says_what_to_run(exported):
    _lean()
    from runtime.config import EngineConfig
    from runtime.llm_engine import LLMEngine

    with pytest.raises(ManifestError, match="engines.json: not found; build the engines with `make engines`"):
        LLMEngine(exported("tiny", 1).root, EngineConfig(backend="trt"))


def test_verify_makes_the_twin_an_export_without_twins_lacks(exported, checkpoints, tmp_path):
    """engines.verify compares engines with FP32 twins on ONNX Runtime; for an export without them
    (what `make engines` writes) it makes each twin from the BF16 graph: the same outputs, to the
    bit, as the export's own twin of that graph."""
    import onnxruntime as ort

    from engines.verify import fp32_twin
    from export.layout import random_inputs
    from export.to_onnx import export

    with_twins = exported("tiny", 2)
    without = Manifest.load(export(checkpoints["tiny"], tmp_path, tp=2, twins=False, progress=False))
    assert not without.fp32_twins
    for name in ("layers.1.attn_in", "layers.1.moe_gather", "head"):
        sg = with_twins.subgraphs[name]
        feed = {k: v.numpy() for k, v in random_inputs(sg.inputs, 5, with_twins.config.vocab_size, 0).items()}
        feed |= with_twins.weight_input_arrays(name, 0, "float32")
        with fp32_twin(with_twins, name, 0) as a, fp32_twin(without, name, 0) as b:
            assert a == with_twins.path(name, 0, "fp32") and b != a
            ra, rb = (ort.InferenceSession(str(p)).run(None, feed) for p in (a, b))
        assert all(np.array_equal(x, y) for x, y in zip(ra, rb)), name
