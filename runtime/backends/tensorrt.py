"""The TensorRT backend: one rank's engines (engines/build.py) behind the backend interface.

Works with the full `tensorrt` or the lean runtime `tensorrt_lean` (for engines built with
--version-compatible). Each engine gets one execution context whose device memory is user-managed:
all contexts share one scratch buffer as large as the largest need, since subgraphs run one after
another. Device buffers come from PyTorch; enqueues go on a non-default stream; the optimization
profile is chosen by token count. An engine that does not match the manifest (built from another
ONNX file, or with other I/O) is an error, never a silent run.

Decode steps captured in CUDA graphs (runtime/cuda_graphs.py): inside `capture_scope(bucket)` every
engine of the bucket's step runs on an execution context of its own for that bucket, whose profile
and input shapes are set once, before the warm-up enqueue that precedes capture, and never changed
again; its enqueues go on the current stream (the capturing one), with no hand-off. docs/DESIGN.md
("The TensorRT backend in CUDA graphs") gives the reasoning.

Not run here: TensorRT cannot be installed on these machines, and no engine, eager or captured, has
run anywhere. The names it uses are checked against the real TensorRT 11.4 bindings
(tests/test_engines.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from export.manifest import (EngineRecord, EnginesIndex, Manifest, ManifestError, SubgraphSpec, SubgraphStep,
                             engine_file)

_TORCH_OF = {"BF16": torch.bfloat16, "FLOAT": torch.float32, "INT64": torch.int64, "HALF": torch.float16,
             "INT32": torch.int32, "BOOL": torch.bool}
_MANIFEST_DTYPE = {"bfloat16": "BF16", "float32": "FLOAT", "int64": "INT64"}


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        try:
            import tensorrt_lean as trt
        except ImportError:
            raise ManifestError("the trt backend needs TensorRT: `pip install tensorrt` (builder and runtime) "
                                "or `pip install tensorrt-lean-cu13` (runs --version-compatible engines)") from None
    return trt


@dataclass
class LoadedEngine:
    engine: object
    context: object
    inputs: list[str]
    outputs: list[str]
    dtypes: dict[str, str]  # TensorRT dtype names
    profiles: list[tuple[int, int]]  # (min, max) tokens per optimization profile
    scratch_bytes: int
    profile: int = -1
    buckets: dict[int, object] = field(default_factory=dict)  # decode bucket -> its own context (capture)


def engine_io(trt, engine) -> tuple[list[str], list[str], dict[str, str]]:
    """Input names, output names, and each tensor's TensorRT dtype name."""
    inputs, outputs, dtypes = [], [], {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        (inputs if mode == trt.TensorIOMode.INPUT else outputs).append(name)
        dtypes[name] = engine.get_tensor_dtype(name).name
    return inputs, outputs, dtypes


def check_against_manifest(name: str, sg: SubgraphSpec, inputs, outputs, dtypes) -> None:
    want_in = [t.name for t in sg.inputs + sg.weight_inputs]
    want_out = [t.name for t in sg.outputs]
    if sorted(inputs) != sorted(want_in) or sorted(outputs) != sorted(want_out):
        raise ManifestError(f"engine {name}: I/O {inputs} -> {outputs} does not match the manifest's "
                            f"{want_in} -> {want_out}; rebuild the engines")
    for t in sg.inputs + sg.weight_inputs + sg.outputs:
        if dtypes[t.name] != _MANIFEST_DTYPE[t.dtype]:
            raise ManifestError(f"engine {name}: {t.name} is {dtypes[t.name]}, the manifest says {t.dtype}")


def make_runtime(trt, version_compatible: bool):
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    if version_compatible:  # such engines carry host code the runtime must be allowed to run
        runtime.engine_host_code_allowed = True
    return logger, runtime


def load_engine(trt, runtime, data: bytes, name: str, record: EngineRecord) -> LoadedEngine:
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise ManifestError(f"engine {name}: TensorRT could not deserialize it (other TensorRT version or GPU?)")
    inputs, outputs, dtypes = engine_io(trt, engine)
    ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    scratch = max(engine.get_device_memory_size_for_profile_v2(p) for p in range(engine.num_optimization_profiles))
    profiles = [(p.min, p.max) for p in record.profiles]
    return LoadedEngine(engine, ctx, inputs, outputs, dtypes, profiles, scratch)


def bind_scratch(engines: list[LoadedEngine], ptr: int, size: int) -> None:
    """One device buffer for every context: the subgraphs run one at a time."""
    for e in engines:
        e.context.set_device_memory(ptr, size)


def profile_for(profiles: list[tuple[int, int]], tokens: int) -> int | None:
    """The first optimization profile whose (min, max) tokens hold `tokens`: decode before prefill."""
    return next((i for i, (lo, hi) in enumerate(profiles) if lo <= tokens <= hi), None)


def enqueue(le: LoadedEngine, tokens: int, inputs: dict[str, torch.Tensor], alloc, stream_handle: int
            ) -> dict[str, torch.Tensor]:
    """Bind inputs, allocate outputs with `alloc(shape, dtype)`, and enqueue on the stream."""
    profile = profile_for(le.profiles, tokens)
    if profile is None:
        raise ValueError(f"{tokens} tokens is outside every optimization profile {le.profiles}")
    ctx = le.context
    if profile != le.profile:
        ctx.set_optimization_profile_async(profile, stream_handle)
        le.profile = profile
    for name in le.inputs:
        t = inputs[name].contiguous()
        ctx.set_input_shape(name, tuple(t.shape))
        ctx.set_tensor_address(name, t.data_ptr())
    outputs = {}
    for name in le.outputs:
        outputs[name] = alloc(tuple(ctx.get_tensor_shape(name)), _TORCH_OF.get(le.dtypes[name], torch.float32))
        ctx.set_tensor_address(name, outputs[name].data_ptr())
    if not ctx.execute_async_v3(stream_handle):
        raise RuntimeError("TensorRT enqueue failed")
    return outputs


# ---- decode steps in CUDA graphs -----------------------------------------------------------------

@dataclass(frozen=True)
class BucketBinding:
    """What one engine's context for one decode bucket is set to before capture: its profile and
    the shapes of its inputs and outputs at the bucket's token count, from the manifest."""
    profile: int
    inputs: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]


def bucket_bindings(manifest: Manifest, rank: int, bucket: int, profiles: dict[str, list[tuple[int, int]]]
                    ) -> dict[str, BucketBinding]:
    """The engines a decode step of `bucket` tokens runs on `rank` (the manifest's subgraph steps at
    the bucket's MoE form, as StepExecutor.forward picks them), each with the profile the bucket falls
    in (`profiles`: each engine's (min, max) per profile, from engines.json). A bucket outside every
    profile of an engine it runs is an error: that step could not run, captured or not."""
    form = manifest.moe.pick(bucket)
    out: dict[str, BucketBinding] = {}
    for step in manifest.steps:
        if not isinstance(step, SubgraphStep):
            continue
        name = step.pick(form)
        sg = manifest.subgraphs[name]
        if rank not in sg.ranks:
            continue
        profile = profile_for(profiles[name], bucket)
        if profile is None:
            raise ValueError(f"decode bucket {bucket}: engine {name} (rank {rank}) has no optimization profile "
                             f"that holds it ({profiles[name]}); rebuild the engines with a larger --decode-max "
                             "or lower --max-num-seqs")
        out[name] = BucketBinding(profile, {t.name: t.concrete(bucket) for t in sg.inputs + sg.weight_inputs},
                                  {t.name: t.concrete(bucket) for t in sg.outputs})
    return out


def bucket_context(trt, le: LoadedEngine, name: str, binding: BucketBinding, scratch_ptr: int, scratch_bytes: int,
                   stream_handle: int):
    """A new context of `le` for one decode bucket: the shared scratch, the bucket's profile and input
    shapes, set now and never again (a graph replays the work captured for that state). The output
    shapes TensorRT infers must be the manifest's."""
    ctx = le.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    ctx.set_device_memory(scratch_ptr, scratch_bytes)
    ctx.set_optimization_profile_async(binding.profile, stream_handle)
    for n, shape in binding.inputs.items():
        if not ctx.set_input_shape(n, shape):
            raise ValueError(f"engine {name}: input {n} of shape {shape} is outside profile {binding.profile}")
    missing = list(ctx.infer_shapes())
    if missing:
        raise ValueError(f"engine {name}: the shapes of {missing} are not determined by its inputs")
    for n, shape in binding.outputs.items():
        got = tuple(ctx.get_tensor_shape(n))
        if got != shape:
            raise ManifestError(f"engine {name}: TensorRT infers output {n} as {got}, the manifest says {shape}; "
                                "rebuild the engines")
    return ctx


def enqueue_bound(le: LoadedEngine, ctx, name: str, binding: BucketBinding, inputs: dict[str, torch.Tensor], alloc,
                  stream_handle: int) -> dict[str, torch.Tensor]:
    """Enqueue on a bucket's context, whose shapes are already set: only tensor addresses change
    (host calls, not stream work), and outputs come from `alloc` (inside capture: the graph's pool)."""
    for n, shape in binding.inputs.items():
        t = inputs[n].contiguous()
        if tuple(t.shape) != shape:
            raise ValueError(f"engine {name}: input {n} is {tuple(t.shape)}, its bucket context was set to {shape}")
        ctx.set_tensor_address(n, t.data_ptr())
    outputs = {}
    for n, shape in binding.outputs.items():
        outputs[n] = alloc(shape, _TORCH_OF.get(le.dtypes[n], torch.float32))
        ctx.set_tensor_address(n, outputs[n].data_ptr())
    if not ctx.execute_async_v3(stream_handle):
        raise RuntimeError(f"TensorRT enqueue of {name} failed")
    return outputs


class TrtBackend:
    name = "trt"

    def __init__(self, manifest: Manifest, rank: int, engines_dir: str | Path, device: str = "cuda"):
        trt = import_tensorrt()
        engines_dir = Path(engines_dir)
        built = EnginesIndex.load(engines_dir)
        if built.settings.get("tensorrt") == "tensorrt-rtx":
            raise ManifestError(f"{engines_dir}: these are TensorRT-RTX engines ({built.tensorrt_version}, built ahead "
                                "of time to check the graphs); they do not load in TensorRT 11. Build the serving "
                                "engines on the A100 machine: `make engines ... TENSORRT=tensorrt`")
        self.dtype, self.device = torch.bfloat16, torch.device(device)
        self.trt, self.manifest, self.rank = trt, manifest, rank
        self.bucket: int | None = None  # inside capture_scope: the decode bucket being warmed up and captured
        self._bindings: dict[int, dict[str, BucketBinding]] = {}
        self.logger, self.runtime = make_runtime(trt, built.settings.get("version_compatible", False))
        self.engines: dict[str, LoadedEngine] = {}
        for name, sg in manifest.on_rank(rank).items():
            engine_rel = engine_file(name, rank)
            record = built.engines.get(engine_rel)
            onnx_rel = manifest.graph_files(name, rank, "bf16").onnx
            if record is None or not (engines_dir / engine_rel).is_file():
                raise ManifestError(f"{engines_dir / engine_rel}: no engine for {name} (rank {rank}); `make engines`")
            if record.onnx_sha256 != manifest.files[onnx_rel].sha256:
                raise ManifestError(f"{engines_dir / engine_rel} was built from another version of {onnx_rel}; "
                                    "rebuild the engines")
            le = load_engine(trt, self.runtime, (engines_dir / engine_rel).read_bytes(), name, record)
            check_against_manifest(name, sg, le.inputs, le.outputs, le.dtypes)
            self.engines[name] = le
        # The experts: one device buffer per host array, bound to both MoE forms.
        on_device: dict[int, torch.Tensor] = {}
        self.weights: dict[str, dict[str, torch.Tensor]] = {}
        for name, arrays in manifest.weight_inputs(rank, "bfloat16").items():
            for n, a in arrays.items():
                if id(a) not in on_device:
                    on_device[id(a)] = torch.from_numpy(a.view("int16")).view(torch.bfloat16).to(self.device)
                self.weights.setdefault(name, {})[n] = on_device[id(a)]
        scratch = max((e.scratch_bytes for e in self.engines.values()), default=0)
        self.scratch = torch.empty(max(scratch, 1), dtype=torch.uint8, device=self.device)
        self.scratch_bytes = scratch
        bind_scratch(list(self.engines.values()), self.scratch.data_ptr(), scratch)
        self.stream = torch.cuda.Stream(device=self.device)

    @contextmanager
    def capture_scope(self, bucket: int):
        """DecodeGraphs' warm-up and capture of one bucket's step (runtime/cuda_graphs.py): runs go to
        the bucket's own contexts, on the current stream. The bucket's profiles are checked on entry."""
        if bucket not in self._bindings:
            profiles = {name: le.profiles for name, le in self.engines.items()}
            self._bindings[bucket] = bucket_bindings(self.manifest, self.rank, bucket, profiles)
        self.bucket = bucket
        try:
            yield
        finally:
            self.bucket = None

    def _run_bucket(self, name: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        le, binding = self.engines[name], self._bindings[self.bucket][name]
        stream = torch.cuda.current_stream(self.device)
        if stream.cuda_stream == 0:  # DecodeGraphs warms up on a side stream and captures on torch's
            raise RuntimeError("a bucket's TensorRT enqueue must not go on the default stream")
        ctx = le.buckets.get(self.bucket)
        if ctx is None:
            # Made and shaped just before its first (warm-up) enqueue, on the same stream, as the
            # eager path switches profiles; never during capture.
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"engine {name}: no context for bucket {self.bucket} was warmed up before capture")
            ctx = le.buckets[self.bucket] = bucket_context(self.trt, le, name, binding, self.scratch.data_ptr(),
                                                           self.scratch_bytes, stream.cuda_stream)
        return enqueue_bound(le, ctx, name, binding, inputs | self.weights.get(name, {}),
                             lambda shape, dtype: torch.empty(shape, dtype=dtype, device=self.device),
                             stream.cuda_stream)

    def run(self, name: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.bucket is not None:
            return self._run_bucket(name, inputs)
        tokens = next(iter(inputs.values())).shape[0]
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = enqueue(self.engines[name], tokens, inputs | self.weights.get(name, {}),
                          lambda shape, dtype: torch.empty(shape, dtype=dtype, device=self.device),
                          self.stream.cuda_stream)
        current.wait_stream(self.stream)
        return out
