"""ONNX Runtime on the FP32 twins (CPU; ONNX Runtime's CPU provider has no BF16 MatMul)."""
from __future__ import annotations

import numpy as np
import torch

from export.manifest import Manifest, ManifestError


class OrtBackend:
    name = "ort"

    def __init__(self, manifest: Manifest, rank: int, verify: bool = True):
        import onnxruntime as ort

        if not manifest.fp32_twins:
            raise ManifestError("the ort backend runs the FP32 twins, and this export has none "
                                "(export with --fp32-twins on: `make onnx TWINS=on`)")
        if verify:  # the twins, and the bf16 files the experts (weight inputs) are read from
            manifest.verify(ranks=[rank], kinds=("fp32", "bf16"))
        self.dtype, self.device = torch.float32, torch.device("cpu")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.sessions = {name: ort.InferenceSession(str(manifest.path(name, rank, "fp32")), opts,
                                                    providers=["CPUExecutionProvider"])
                         for name in manifest.on_rank(rank)}
        self.weights = manifest.weight_inputs(rank, "float32")  # the experts, one copy for both MoE forms
        self.outputs = {n: [o.name for o in s.get_outputs()] for n, s in self.sessions.items()}

    def run(self, name: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feed = {k: np.ascontiguousarray(v.numpy()) for k, v in inputs.items()} | self.weights.get(name, {})
        return {k: torch.from_numpy(v) for k, v in zip(self.outputs[name], self.sessions[name].run(None, feed))}
