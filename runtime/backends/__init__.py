"""Backends run one rank's subgraphs by name on named tensors. They share one small interface:
`name`, `dtype` and `device` of activations, and `run(name, inputs) -> outputs`.

- `ort` (ort.py): ONNX Runtime on the FP32 twins (CPU).
- `torch` (pytorch.py): the PyTorch pieces the graphs were traced from, built from the checkpoint.
- `trt` (tensorrt.py): the TensorRT engines built by engines/.
"""
from __future__ import annotations

from pathlib import Path

import torch

from export.manifest import Manifest
from export.paths import engines_dir


def make_backend(kind: str, manifest: Manifest, rank: int, device: str = "cpu", dtype: str | None = None,
                 engines: str | None = None):
    """A rank's backend. Each is imported only when asked for (TensorRT and ONNX Runtime are heavy)."""
    if kind == "trt":
        from .tensorrt import TrtBackend
        return TrtBackend(manifest, rank, Path(engines) if engines else engines_dir(manifest.root),
                          device if device.startswith("cuda") else "cuda")
    if kind == "ort":
        from .ort import OrtBackend
        return OrtBackend(manifest, rank)
    if kind == "torch":
        from .pytorch import TorchBackend
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype or ("bfloat16" if device != "cpu"
                                                                              else "float32")]
        return TorchBackend(manifest, rank, device, dt)
    raise ValueError(f"backend {kind!r} is not one of ort, torch, trt")
