"""Build SM80 TensorRT engines from an export: one per subgraph per tensor-parallel rank, with
TensorRT 11 on the A100 machine, or with TensorRT-RTX ahead of time anywhere (engines/tensorrt.py).

    python -m engines.build build/<model>/onnx/tp8            # from an export (`make engines` exports first)
    python -m engines.build EXPORT --dry-run                  # print the build plan; needs no TensorRT

TensorRT 11 networks are strongly typed: the BF16 ONNX graph is the engine's precision (there are no
FP16/BF16 builder flags). `--hardware same` builds for the GPU it runs on (build on the A100 itself);
`--hardware ampere_plus` builds on a newer GPU engines that run on SM80 and up (slower: 48 KiB of
shared memory, no cuBLAS/cuDNN tactics). `--version-compatible` makes engines the lean runtime
(`tensorrt_lean`) of later TensorRT versions can run. One timing cache is shared by all builds and
saved beside the engines. Builds are spread over the visible GPUs, one process per GPU.

Nothing is written unless a TensorRT is there (and, for TensorRT 11, a GPU of compute capability 8.0
or newer).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

from export.atomic import remove_temporaries, write_bytes_atomic
from export.lock import LOCK_FILE, FolderLock, FolderLocked
from export.manifest import TOKENS, EnginesIndex, Manifest, ManifestError, find_manifest
from export.paths import engines_dir

from .plan import COMPUTE_CAPABILITIES, HARDWARE, BuildPlan, BuildSettings, EngineJob, make_build_plan
from .tensorrt import KINDS, TensorRT, TensorRTMissing
from .tensorrt import load as load_tensorrt

TIMING_CACHE = "timing.cache"


class BuildEnvironmentError(RuntimeError):
    """TensorRT or a suitable GPU is missing."""


class BuildError(RuntimeError):
    """TensorRT could not parse or build a subgraph."""


def check_environment(kind: str = "auto") -> tuple[TensorRT, list[int]]:
    """The TensorRT to build with and the GPUs to build on, or a BuildEnvironmentError saying what
    to install. TensorRT 11 builds on GPUs of SM80 or newer; TensorRT-RTX builds ahead of time, with
    no GPU (one worker)."""
    try:
        rt = load_tensorrt(kind)
    except TensorRTMissing as e:
        raise BuildEnvironmentError(str(e)) from None
    if not rt.needs_gpu:
        return rt, [0]
    try:
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        caps = [torch.cuda.get_device_capability(i) for i in range(n)]
    except Exception as e:  # no driver
        raise BuildEnvironmentError(f"no NVIDIA GPU is usable here ({e}); TensorRT builds engines on a GPU") from None
    gpus = [i for i, c in enumerate(caps) if c >= (8, 0)]
    if not gpus:
        raise BuildEnvironmentError("no NVIDIA GPU of compute capability 8.0 (A100) or newer is visible"
                                    + (f" (found {caps})" if caps else "")
                                    + "; without one, `--tensorrt tensorrt-rtx` builds ahead of time (TensorRT-RTX)")
    return rt, gpus


class _Progress:
    """TensorRT's progress monitor, printing phase starts: a build of a large layer takes minutes."""

    def __init__(self, trt, label: str):
        outer = self

        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)

            def phase_start(self, phase_name, parent_phase, num_steps):
                if parent_phase is None:
                    print(f"  [{outer.label}] {phase_name}", flush=True)

            def step_complete(self, phase_name, step):
                return True

            def phase_finish(self, phase_name):
                pass

        self.label, self.monitor = label, Monitor()


def build_engine(rt: TensorRT, onnx_path: Path, job: EngineJob, settings: BuildSettings,
                 timing_cache: bytes) -> tuple[bytes, bytes]:
    """Parse one BF16 ONNX subgraph (external data beside it) and build its engine.
    Returns (serialized engine, serialized timing cache)."""
    trt = rt.trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = rt.create_network(builder)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            errors.append(f"node {e.node_name()} ({e.node_operator()}): {e.desc()}")
        raise BuildError(f"{onnx_path}: TensorRT's ONNX parser failed:\n  " + "\n  ".join(errors or ["no detail"]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gb * 2**30))
    config.builder_optimization_level = settings.opt_level
    rt.target(config, settings)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, False)
    config.progress_monitor = _Progress(trt, f"gpu {job.gpu}: {job.engine}").monitor
    for prof in job.record.profiles:
        p = builder.create_optimization_profile()
        for spec in job.record.inputs:
            if TOKENS in spec.shape:
                p.set_shape(spec.name, spec.concrete(prof.min), spec.concrete(prof.opt), spec.concrete(prof.max))
        config.add_optimization_profile(p)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BuildError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    return bytes(engine), bytes(config.get_timing_cache().serialize())


def _gpu_worker(kind: str, gpu: int, jobs: list[EngineJob], manifest_root: str, out: str, settings: BuildSettings,
                cache_path: str, result_q) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before TensorRT initializes CUDA
    rt = load_tensorrt(kind)
    cache = Path(cache_path).read_bytes() if Path(cache_path).is_file() else b""
    for job in jobs:
        t0 = time.perf_counter()
        result_q.put(("start", job.engine, gpu))  # so a worker that dies is named with what it built
        try:
            engine, cache = build_engine(rt, Path(manifest_root) / job.record.onnx, job, settings, cache)
        except Exception as e:
            result_q.put(("error", job.engine, str(e)))
            return
        write_bytes_atomic(Path(out) / job.engine, engine)
        result_q.put(("built", job.engine, time.perf_counter() - t0))
    write_bytes_atomic(Path(out) / f".timing-gpu{gpu}.cache", cache)
    result_q.put(("done", gpu, None))


WORKER_POLL_SECONDS = 1.0  # how often, with no message, the workers' exit codes are looked at


def _signal_name(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f", {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return ""


def run_build(rt: TensorRT, manifest: Manifest, plan: BuildPlan, out: Path, settings: BuildSettings) -> None:
    """Build the plan's engines, one process per GPU, then merge the timing caches and record; one
    build at a time into `out` (its lock), after removing what a killed build left half-written."""
    try:
        with FolderLock(out, "engine build"):
            remove_temporaries(out, keep=(".timing-gpu*.cache", LOCK_FILE))  # caches: merged at the end
            _run_build(rt, manifest, plan, out, settings)
    except FolderLocked as e:
        raise BuildError(str(e)) from None


def _run_build(rt: TensorRT, manifest: Manifest, plan: BuildPlan, out: Path, settings: BuildSettings) -> None:
    from tqdm import tqdm

    index = EnginesIndex.load(out, missing_ok=True)
    index.tensorrt_version, index.settings = rt.version, asdict(settings) | {"tensorrt": rt.kind}
    index.manifest_sha256 = manifest.files_digest()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = {g: ctx.Process(target=_gpu_worker, args=(rt.kind, g, jobs, str(manifest.root), str(out), settings,
                                                      str(out / TIMING_CACHE), q))
             for g, jobs in plan.by_gpu().items()}
    for p in procs.values():
        p.start()
    errors: list[str] = []
    jobs = {j.engine: j for j in plan.jobs}
    building: dict[int, str] = {}  # GPU -> the engine its worker is building
    running = set(procs)           # GPUs whose worker has not reported its end

    def handle(kind: str, what, detail) -> None:
        if kind == "start":
            building[detail] = what
        elif kind == "built":
            index.engines[what] = jobs[what].record
            index.engines[what].build_seconds = round(detail, 1)
            index.save(out)  # after every engine: an interrupted build resumes from here
            bar.update()
        elif kind == "error":
            errors.append(f"{what}: {detail}")
            running.discard(jobs[what].gpu)
        else:  # done
            running.discard(what)

    with tqdm(total=len(plan.to_build), desc="engines", unit="engine") as bar:
        while running:
            try:
                handle(*q.get(timeout=WORKER_POLL_SECONDS))
                continue
            except queue.Empty:
                pass
            # No message for a while: a worker that died (TensorRT builders can segfault) says
            # nothing; its exit code does. What it sent before dying is read first.
            for g in sorted(running):
                if procs[g].exitcode is None:
                    continue
                while True:
                    try:
                        handle(*q.get(timeout=0.1))
                    except queue.Empty:
                        break
                if g in running:
                    running.discard(g)
                    errors.append(f"the build worker on GPU {g} died (exit code {procs[g].exitcode}"
                                  + _signal_name(procs[g].exitcode) + ") while building "
                                  + (building.get(g) or "its first engine") + "; rerun to resume (the engines "
                                  "built are kept in engines.json)")
                    for other in running:  # the others stop too: the run has failed
                        procs[other].terminate()
                    running.clear()
                    break
    for p in procs.values():
        p.join()
    # One shared timing cache: merge what every GPU learned.
    trt = rt.trt
    # The logger, builder and config must outlive the caches made from them (else: a crash).
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    config = builder.create_builder_config()
    cache = config.create_timing_cache((out / TIMING_CACHE).read_bytes() if (out / TIMING_CACHE).is_file() else b"")
    for f in out.glob(".timing-gpu*.cache"):
        cache.combine(config.create_timing_cache(f.read_bytes()), True)
        f.unlink()
    write_bytes_atomic(out / TIMING_CACHE, bytes(cache.serialize()))
    index.save(out)
    if errors:
        raise BuildError("\n".join(errors))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engines.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="an export (folder or manifest.json); `make engines` exports first")
    ap.add_argument("--check-env", action="store_true", help="only check for TensorRT (and, for TensorRT 11, an SM80+ GPU)")
    ap.add_argument("--tensorrt", choices=KINDS, default="auto",
                    help="tensorrt: TensorRT 11 on this machine's GPUs (what the runtime loads); tensorrt-rtx: "
                         "TensorRT-RTX, ahead of time with no GPU, for --compute-capability (its engines do not "
                         "load in TensorRT 11); auto: TensorRT 11 if installed, else TensorRT-RTX (default)")
    ap.add_argument("--compute-capability", choices=COMPUTE_CAPABILITIES, default="SM80",
                    help="TensorRT-RTX: the GPU architecture to compile for (default SM80, the A100)")
    ap.add_argument("--out", help="engines folder (default build/<model>/engines/tp<N>)")
    ap.add_argument("--hardware", choices=HARDWARE, default="same",
                    help="same: for the GPU building (build on A100s); ampere_plus: run on SM80+ when built newer")
    ap.add_argument("--version-compatible", action="store_true", help="engines for the lean runtime")
    ap.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0..5 (default 3)")
    ap.add_argument("--workspace-gb", type=float, default=8.0, help="builder workspace limit (default 8 GiB)")
    ap.add_argument("--decode-max", type=int, default=256, help="largest token count of the decode profile")
    ap.add_argument("--gpus", help="GPU indices to build on (default: all of SM80 or newer)")
    ap.add_argument("--dry-run", action="store_true", help="print the build plan and exit (no TensorRT needed)")
    a = ap.parse_args(argv)
    if a.check_env or not a.model:
        if not a.check_env:
            ap.error("give an export or a checkpoint")
        try:
            rt, gpus = check_environment(a.tensorrt)
        except BuildEnvironmentError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{rt.version} and {len(gpus)} GPU(s) of SM80 or newer: {gpus}" if rt.needs_gpu else
              f"{rt.version}: ahead-of-time builds for {a.compute_capability}, no GPU needed")
        return 0
    settings = BuildSettings(a.hardware, a.version_compatible, a.opt_level, a.workspace_gb, a.decode_max,
                             a.compute_capability)
    try:
        settings.check()
        rt, gpus = (None, [0]) if a.dry_run else check_environment(a.tensorrt)
        if a.gpus:
            gpus = [int(g) for g in a.gpus.split(",")]
        model = Path(a.model)
        if (model / "config.json").is_file() and not (model / "manifest.json").is_file() \
                and not list(model.glob("tp*/manifest.json")):
            raise ManifestError(f"{model} is a checkpoint: export it first (`make onnx MODEL={model} TP=N`, or "
                                f"`make engines MODEL={model} TP=N`, which does both)")
        manifest = Manifest.load(find_manifest(model))
        out = Path(a.out) if a.out else engines_dir(manifest.root)
        records = EnginesIndex.load(out, missing_ok=True).engines
        existing = {str(p.relative_to(out)) for p in out.glob("rank*/*.engine")} if out.is_dir() else set()
        version = rt.version if rt else "dry-run"
        plan = make_build_plan(manifest, settings, version, gpus, records, existing)
    except (BuildEnvironmentError, ManifestError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for j in plan.jobs:
        prof = ", ".join(f"{p.name} T={p.min}..{p.max}" for p in j.record.profiles)
        print(f"{'skip ' if j.skip else f'gpu {j.gpu}'}  {j.engine}  [{prof}]  {j.record.weight_bytes / 2**20:.1f} MiB")
    print(f"{len(plan.to_build)} to build, {len(plan.jobs) - len(plan.to_build)} up to date; "
          f"{'dry run' if a.dry_run else f'out: {out}'}")
    if rt is not None and rt.kind == "tensorrt-rtx":
        print(f"building TensorRT-RTX engines ({rt.version}, ahead of time for {settings.compute_capability}): they "
              "load in the TensorRT-RTX runtime only, not in TensorRT 11, and cannot run on a machine without a GPU; "
              "the serving engines for A100s come from TensorRT 11 on the A100 machine (--tensorrt tensorrt)")
    if a.dry_run or not plan.to_build:
        return 0
    try:
        run_build(rt, manifest, plan, out, settings)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
