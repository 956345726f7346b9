"""The runtime's settings: one dataclass, its defaults and help written once. The command-line flags
of chat.py (and any other front end) and the Triton model's string parameters are made from it."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields

BACKENDS = ("ort", "torch", "trt")


@dataclass
class EngineConfig:
    backend: str = field(default="ort", metadata={
        "help": "ort: ONNX Runtime on the FP32 twins (CPU); torch: the PyTorch pieces (CPU or GPU); trt: TensorRT "
                "engines (GPU; `make engines`)", "choices": BACKENDS})
    device: str = field(default="cpu", metadata={"help": "torch/trt backend device: cpu, cuda (at TP>1 rank r on cuda:r), or cuda:N "
                "(TP=1 only; CUDA_VISIBLE_DEVICES picks a TP group's GPUs)"})
    dtype: str | None = field(default=None, metadata={
        "help": "torch backend dtype (default: bfloat16 on a GPU, float32 on the CPU)", "choices": ("float32", "bfloat16")})
    engines: str | None = field(default=None, metadata={
        "help": "trt backend: engines folder (default build/<model>/engines/tp<N>)"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block, a power of two"})
    num_blocks: int | None = field(default=None, metadata={"help": "KV-cache size in blocks (overrides --kv-cache-gb)"})
    kv_cache_gb: float = field(default=1.0, metadata={"help": "KV-cache size per rank in GiB"})
    gpu_memory_utilization: float | None = field(default=None, metadata={
        "help": "size the KV cache from the memory plan (python -m engines.memory_plan): this fraction of "
                "each GPU, less weights, scratch and reserve (overrides --kv-cache-gb)"})
    gpu_memory_gb: float | None = field(default=None, metadata={
        "help": "with --gpu-memory-utilization: the GPU size to plan for (default: the device's)"})
    max_num_seqs: int = field(default=64, metadata={"help": "most sequences in one step"})
    max_num_batched_tokens: int | None = field(default=None, metadata={
        "help": "most tokens in one step (default: the export's max_tokens)"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "longest sequence (default: the model's context, capped by the KV cache)"})
    cuda_graphs: bool = field(default=True, metadata={
        "help": "GPU: replay decode steps from CUDA graphs (--no-cuda-graphs: the same steps, eagerly)"})
    prefill_graphs: bool = field(default=True, metadata={
        "help": "GPU, with CUDA graphs: also replay one sequence's prefill chunks from CUDA graphs, padded to "
                "power-of-two sizes (--no-prefill-graphs: those chunks eagerly, unpadded)"})
    graph_max_context: int = field(default=8192, metadata={
        "help": "GPU: decode steps of sequences longer than this run eagerly"})
    decode_buckets: bool | None = field(default=None, metadata={
        "help": "pad decode steps to bucket sizes (default: on a GPU)"})
    async_scheduling: bool | None = field(default=None, metadata={
        "help": "launch each step before the previous step's tokens reach the host, so the host's scheduling "
                "and bookkeeping overlap the device's work (tokens sampled on the device: steps without grammars, "
                "logprobs or seeded sampling; a sequence that stops at such a step costs one discarded row "
                "of the next); default: on a GPU. --no-async-scheduling: one step at a time"})
    step_timeout: float = field(default=120.0, metadata={
        "help": "servers: an engine step that makes no progress for this many seconds (a hung rank) ends the "
                "engine, which makes the server exit for its supervisor to restart it; 0 disables (the "
                "collectives' own timeout is 300 s)"})

    # ---- command line -------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, ap: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        """One flag per field (--kv-cache-gb, ...); booleans that default on get --no-<name>."""
        for f in fields(cls):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not MISSING else None
            help_ = f.metadata.get("help", "")
            if f.type == "bool | None":  # unset: the runtime decides (e.g. by device); both flags
                ap.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
                continue
            if f.type == "bool":
                if default is True:
                    ap.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=help_)
                else:
                    ap.add_argument(flag, dest=f.name, action="store_true", default=default, help=help_)
                continue
            kind = {"int": int, "int | None": int, "float": float, "float | None": float}.get(f.type, str)
            shown = f" (default {default})" if default is not None else ""
            ap.add_argument(flag, dest=f.name, type=kind, default=default, choices=f.metadata.get("choices"),
                            help=help_ + shown)

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "EngineConfig":
        return cls(**{f.name: getattr(a, f.name) for f in fields(cls) if hasattr(a, f.name)})

    # ---- string parameters (Triton's config.pbtxt) --------------------------------------------
    def to_strings(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)).lower() if isinstance(getattr(self, f.name), bool)
                else str(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_strings(cls, params: dict[str, str]) -> "EngineConfig":
        kw = {}
        for f in fields(cls):
            v = params.get(f.name)
            if v is None or v == "":
                continue
            if f.type in ("bool", "bool | None"):
                kw[f.name] = v.lower() == "true"
            elif f.type in ("int", "int | None"):
                kw[f.name] = int(v)
            elif f.type in ("float", "float | None"):
                kw[f.name] = float(v)
            else:
                kw[f.name] = v
        return cls(**kw)
