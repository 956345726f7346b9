"""Backends run one rank's subgraphs by name on named tensors. They share one small interface:
`dtype` and `device` of activations, and `run(name, inputs) -> outputs`.

- `ort`: ONNX Runtime on the FP32 twins (CPU), or the BF16 graphs where a CUDA provider exists.
- `torch`: the PyTorch pieces the graphs were traced from, built from the checkpoint: the reference,
  and a GPU path that works without TensorRT.
A TensorRT backend (engines/) plugs in with the same two members.
"""
from __future__ import annotations

import numpy as np
import torch

from export.manifest import Manifest, ManifestError


class OrtBackend:
    name = "ort"

    def __init__(self, manifest: Manifest, rank: int, verify: bool = True):
        import onnxruntime as ort

        if not manifest.data["fp32_twins"]:
            raise ManifestError("the ort backend runs the FP32 twins, and this export has none "
                                "(exported with --no-fp32-twins)")
        if verify:
            manifest.verify(ranks=[rank], kinds=("fp32",))
        self.dtype, self.device = torch.float32, torch.device("cpu")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.sessions = {}
        for name, sg in manifest.subgraphs.items():
            if rank in sg["ranks"]:
                self.sessions[name] = ort.InferenceSession(str(manifest.path(name, rank, "fp32")), opts,
                                                           providers=["CPUExecutionProvider"])
        self.outputs = {n: [o.name for o in s.get_outputs()] for n, s in self.sessions.items()}

    def run(self, name: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feed = {k: np.ascontiguousarray(v.numpy()) for k, v in inputs.items()}
        return {k: torch.from_numpy(v) for k, v in zip(self.outputs[name], self.sessions[name].run(None, feed))}


class TorchBackend:
    name = "torch"

    def __init__(self, manifest: Manifest, rank: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 checkpoint=None):
        """`checkpoint`: anything with Checkpoint's config/read/layer (benchmarks pass random weights
        made on the GPU); by default the checkpoint the export came from."""
        from pathlib import Path

        from export.checkpoint import Checkpoint, CheckpointError
        from export.model import Moe
        from export.pieces import build_modules, unit_of
        from export.plan import make_plan

        ckpt = checkpoint
        if ckpt is None:
            # The checkpoint beside the export (moved together) first, else where it was exported from.
            path = manifest.root / manifest.data.get("checkpoint_relative", manifest.data["checkpoint"])
            if not path.is_dir():
                path = Path(manifest.data["checkpoint"])
            if not path.is_dir():
                raise ManifestError(f"the torch backend builds its weights from the checkpoint, and {path} "
                                    "(recorded in the manifest) is not there")
            try:
                ckpt = Checkpoint(path)
            except CheckpointError as e:
                raise ManifestError(f"the torch backend cannot read the export's checkpoint: {e}") from e
        plan = make_plan(ckpt.config, manifest.tp, manifest.data["expert_split"])
        self.dtype, self.device = dtype, torch.device(device)
        self.modules: dict[str, torch.nn.Module] = {}
        self.inputs: dict[str, list[str]] = {}
        self.outputs: dict[str, list[str]] = {}
        by_unit: dict[str, list] = {}
        for s in plan.subgraphs:
            if rank in s.ranks:
                by_unit.setdefault(unit_of(s), []).append(s)
                self.inputs[s.name] = [t.name for t in s.inputs]
                self.outputs[s.name] = [t.name for t in s.outputs]
        kernel = self._gather_kernel()
        for unit, specs in by_unit.items():
            for name, m in build_modules(ckpt, plan, unit, rank, specs, dtype).items():
                self.modules[name] = m.to(self.device).eval()
                for sub in m.modules():
                    if isinstance(sub, Moe):
                        sub.gather_kernel = kernel

    def _gather_kernel(self):
        """The fused gather-MoE kernel on a GPU in bfloat16 (float32 runs keep the PyTorch form, which
        the CPU path computes the same way)."""
        if self.device.type != "cuda" or self.dtype != torch.bfloat16:
            return None
        try:
            from .moe_kernel import gather_moe
        except ImportError:
            return None
        return gather_moe

    @torch.no_grad()
    def run(self, name: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.modules[name](*(inputs[k] for k in self.inputs[name]))
        return dict(zip(self.outputs[name], out if isinstance(out, tuple) else (out,)))


def make_backend(kind: str, manifest: Manifest, rank: int, device: str = "cpu", dtype: str | None = None,
                 engines: str | None = None):
    if kind == "trt":
        from .trt_backend import TrtBackend
        from pathlib import Path
        from export.manifest import engines_dir
        return TrtBackend(manifest, rank, Path(engines) if engines else engines_dir(manifest),
                          device if device.startswith("cuda") else "cuda")
    if kind == "ort":
        return OrtBackend(manifest, rank)
    if kind == "torch":
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype or ("bfloat16" if device != "cpu"
                                                                              else "float32")]
        return TorchBackend(manifest, rank, device, dt)
    raise ValueError(f"backend {kind!r} is not one of ort, torch, trt")
