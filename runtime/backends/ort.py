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
                                "(exported with --no-fp32-twins)")
        if verify:
            manifest.verify(ranks=[rank], kinds=("fp32",))
        self.dtype, self.device = torch.float32, torch.device("cpu")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.sessions = {}
        for name in manifest.on_rank(rank):
            self.sessions[name] = ort.InferenceSession(str(manifest.path(name, rank, "fp32")), opts,
                                                       providers=["CPUExecutionProvider"])
        self.outputs = {n: [o.name for o in s.get_outputs()] for n, s in self.sessions.items()}

    def run(self, name: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feed = {k: np.ascontiguousarray(v.numpy()) for k, v in inputs.items()}
        return {k: torch.from_numpy(v) for k, v in zip(self.outputs[name], self.sessions[name].run(None, feed))}
