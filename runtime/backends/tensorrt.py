"""The TensorRT backend: one rank's engines (engines/build.py) behind the backend interface.

Works with the full `tensorrt` or the lean runtime `tensorrt_lean` (for engines built with
--version-compatible). Each engine gets one execution context whose device memory is user-managed:
all contexts share one scratch buffer as large as the largest need, since subgraphs run one after
another. Device buffers come from PyTorch; enqueues go on a non-default stream; the optimization
profile is chosen by token count. An engine that does not match the manifest (built from another
ONNX file, or with other I/O) is an error, never a silent run.

Not run here: TensorRT cannot be installed on these machines. The names it uses are checked against
the real TensorRT 11.4 bindings (tests/test_engines.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from export.manifest import EngineRecord, EnginesIndex, Manifest, ManifestError, SubgraphSpec, engine_file

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


def enqueue(le: LoadedEngine, tokens: int, inputs: dict[str, torch.Tensor], alloc, stream_handle: int
            ) -> dict[str, torch.Tensor]:
    """Bind inputs, allocate outputs with `alloc(shape, dtype)`, and enqueue on the stream."""
    profile = next((i for i, (lo, hi) in enumerate(le.profiles) if lo <= tokens <= hi), None)
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
        self.trt = trt
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
        bind_scratch(list(self.engines.values()), self.scratch.data_ptr(), scratch)
        self.stream = torch.cuda.Stream(device=self.device)

    def run(self, name: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = next(iter(inputs.values())).shape[0]
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = enqueue(self.engines[name], tokens, inputs | self.weights.get(name, {}),
                          lambda shape, dtype: torch.empty(shape, dtype=dtype, device=self.device),
                          self.stream.cuda_stream)
        current.wait_stream(self.stream)
        return out
