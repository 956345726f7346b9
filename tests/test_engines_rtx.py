"""Real engine builds: every BF16 subgraph of the toy exports parsed by TensorRT's own ONNX parser and
compiled for SM80 by TensorRT-RTX (ahead of time, no GPU), through the project's build code.

What this shows: the graphs are ones TensorRT's parser and an SM80 compiler accept, with the
manifest's profiles. What it cannot show: TensorRT 11 itself (which may pick other kernels), or any
engine running (no GPU here; RTX engines load only in the TensorRT-RTX runtime)."""
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from engines import build as build_mod
from engines.plan import BuildSettings, make_build_plan
from engines.tensorrt import TensorRTMissing, load
from export.manifest import EnginesIndex, ManifestError
from tests.cli import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rtx():
    try:
        return load("tensorrt-rtx")
    except TensorRTMissing as e:
        pytest.fail(f"TensorRT-RTX is part of the test environment: {e}")


@pytest.mark.parametrize("name,tp", [("tiny", 1), ("tiny", 2), pytest.param("kv8", 8, marks=pytest.mark.long)])
def test_every_subgraph_builds_for_sm80(rtx, exported, tmp_path, name, tp):
    man = exported(name, tp)
    settings = BuildSettings(compute_capability="SM80", decode_max=64)
    plan = make_build_plan(man, settings, rtx.version, [0])
    assert len(plan.jobs) == sum(len(sg.ranks) for sg in man.subgraphs.values())
    ranks = {0, 1, tp - 1}  # ranks 1..N-1 have the same graphs with other weights: rank 1 and the last stand for them
    plan.jobs = [j for j in plan.jobs if j.record.rank in ranks]
    out = tmp_path / "engines"
    build_mod.run_build(rtx, man, plan, out, settings)
    index = EnginesIndex.load(out)
    assert index.tensorrt_version == rtx.version and index.settings["tensorrt"] == "tensorrt-rtx"
    assert set(index.engines) == {j.engine for j in plan.jobs}
    for rel, rec in index.engines.items():
        assert (out / rel).stat().st_size > 0, rel
        assert rec.onnx_sha256 == man.files[rec.onnx].sha256
    # built once: a second plan finds everything up to date
    again = make_build_plan(man, settings, rtx.version, [0], index.engines,
                            {str(p.relative_to(out)) for p in out.glob("rank*/*.engine")})
    assert not [j for j in again.to_build if j.record.rank in ranks]


def test_a_graph_tensorrt_rejects_names_node_and_op(rtx, tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["T", 8])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["T", 8])
    graph = helper.make_graph([helper.make_node("FancyUnknownOp", ["x"], ["y"], name="the_bad_node")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    from export.manifest import EngineRecord, Profile, TensorSpec
    from engines.plan import EngineJob

    job = EngineJob(EngineRecord("bad", 0, "bad.onnx", "rank0/bad.engine", "", 0, [Profile("p", 1, 4, 8)],
                                 [TensorSpec("x", "bfloat16", ("T", 8))]))
    with pytest.raises(build_mod.BuildError, match=r"node the_bad_node \(FancyUnknownOp\): .*"):
        build_mod.build_engine(rtx, path, job, BuildSettings(), b"")


def test_make_engines_here_builds_tensorrt_rtx_engines_and_the_runtime_refuses_them(checkpoints, tmp_path):
    build = tmp_path / "b"
    make = ["make", "--no-print-directory", "engines", f"MODEL={checkpoints['alt']}", "TP=1", f"BUILD={build}",
            f"BIN={Path(sys.executable).parent}"]
    r = subprocess.run(make + ["DRY_RUN=1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "preflight: everything fits" in r.stdout and not build.exists(), r.stdout + r.stderr
    r = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TensorRT-RTX engines" in r.stdout and "not in TensorRT 11" in r.stdout
    assert not list((build / "alt" / "onnx").rglob("*.fp32.*"))  # no FP32 twins for an engine build
    engines = build / "alt" / "engines" / "tp1"
    index = EnginesIndex.load(engines)
    from runtime.backends.tensorrt import TrtBackend
    from export.manifest import Manifest
    man = Manifest.load(build / "alt" / "onnx" / "tp1")
    assert "modeled" in man.moe.source and man.moe.forms == ("gather", "dense", "block")  # no measurement given
    # per layer attn and one post per MoE form; embed, head
    assert index.settings["compute_capability"] == "SM80" and len(index.engines) == 2 * (1 + 3) + 2
    try:
        import tensorrt_lean  # noqa: F401 - the runtime needs a TensorRT module to start at all
    except ImportError:
        pytest.skip("no TensorRT runtime module")
    with pytest.raises(ManifestError, match="TensorRT-RTX engines .* do not load in TensorRT 11"):
        TrtBackend(man, 0, engines)


def test_an_interrupted_build_resumes(exported, tmp_path):
    """engines.json is written after every engine: a build killed mid-way keeps what it finished,
    and the rerun builds only the rest."""
    import os
    import signal
    import time

    man = exported("tiny", 1)
    out = tmp_path / "engines"
    cmd = [sys.executable, "-m", "engines.build", str(man.root), "--tensorrt", "tensorrt-rtx", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "engines.json").is_file():
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the builder and its worker
    proc.wait()
    total = 3 * (1 + len(man.moe.forms)) + 2  # attn and one post per MoE form per layer; embed, head
    kept = len(EnginesIndex.load(out).engines)
    assert 1 <= kept < total, "the kill should land mid-build"
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{total - kept} to build, {kept} up to date" in r.stdout
    assert len(EnginesIndex.load(out).engines) == total


def _worker_pid(parent: int) -> int | None:
    """The build's per-GPU worker: the spawned child that is not multiprocessing's resource tracker."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return None
    for c in children:
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "multiprocessing" in cmd and "resource_tracker" not in cmd:
            return int(c)
    return None


def test_a_dead_worker_is_noticed_named_and_the_rerun_resumes(exported, tmp_path):
    """A worker killed mid-build (as a segfaulting TensorRT builder dies): the build stops within
    seconds, naming the engine and the GPU, and exits non-zero; engines.json keeps what was built,
    the rerun builds only the rest, and every file it wrote has the umask's mode."""
    import os
    import signal
    import time

    man = exported("tiny", 1)
    out = tmp_path / "engines"
    cmd = [sys.executable, "-m", "engines.build", str(man.root), "--tensorrt", "tensorrt-rtx", "--out", str(out)]
    old = os.umask(0o022)
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "engines.json").is_file():
            time.sleep(0.02)
        worker = _worker_pid(proc.pid)
        assert worker, "the build has a worker process"
        os.kill(worker, signal.SIGKILL)
        t0 = time.time()
        _, err = proc.communicate(timeout=60)
        noticed = time.time() - t0
        assert proc.returncode == 1, err
        assert noticed < 10, noticed  # the exit code is looked at every second (WORKER_POLL_SECONDS)
        m = re.search(r"error: the build worker on GPU 0 died \(exit code -9, SIGKILL\) while building "
                      r"(rank0/\S+\.engine); rerun to resume", err)
        assert m, err
        kept = EnginesIndex.load(out).engines
        assert m.group(1) not in kept and len(kept) >= 1
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        total = 3 * (1 + len(man.moe.forms)) + 2
        assert f"{total - len(kept)} to build, {len(kept)} up to date" in r.stdout
        assert len(EnginesIndex.load(out).engines) == total
        modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
        assert set(modes.values()) == {0o644}, modes
        assert [p for p in out.rglob(".*") if p.name != ".lock"] == []
    finally:
        os.umask(old)
