"""The PyTorch pieces the graphs were traced from, built from the checkpoint: the reference, and the
GPU path without TensorRT (bf16, fused gather-MoE kernel, CUDA graphs)."""
from __future__ import annotations

import torch

from export.checkpoint import Checkpoint, CheckpointError
from export.layout import make_layout
from export.manifest import Manifest, ManifestError
from export.model import NO_KERNELS, Kernels
from export.pieces import build_modules


class TorchBackend:
    name = "torch"

    def __init__(self, manifest: Manifest, rank: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 checkpoint=None):
        """`checkpoint`: anything with Checkpoint's config/read/layer (benchmarks pass random weights
        made on the GPU); by default the checkpoint the export came from."""
        ckpt = checkpoint
        if ckpt is None:
            path = manifest.checkpoint_dir()
            if not path.is_dir():
                raise ManifestError(f"the torch backend builds its weights from the checkpoint, and {path} "
                                    "(recorded in the manifest) is not there")
            try:
                ckpt = Checkpoint(path)
            except CheckpointError as e:
                raise ManifestError(f"the torch backend cannot read the export's checkpoint: {e}") from e
        layout = make_layout(ckpt.config, manifest.tp, manifest.expert_split)
        self.dtype, self.device = dtype, torch.device(device)
        self.modules: dict[str, torch.nn.Module] = {}
        self.inputs: dict[str, list[str]] = {}
        self.outputs: dict[str, list[str]] = {}
        by_unit: dict[str, list] = {}
        for s in layout.subgraphs:
            if rank in s.ranks:
                by_unit.setdefault(s.unit, []).append(s)
                self.inputs[s.name] = [t.name for t in s.inputs]
                self.outputs[s.name] = [t.name for t in s.outputs]
        kernels = self._kernels()
        for unit, specs in by_unit.items():
            modules, _ = build_modules(ckpt, layout, unit, rank, specs, dtype, kernels=kernels)
            for name, m in modules.items():
                self.modules[name] = m.to(self.device).eval()

    def _kernels(self) -> Kernels:
        """The fused Triton kernels on a GPU in bfloat16: the MoE's gather (few tokens) and grouped GEMM
        (many: top-k work only); for decode-sized steps the residual add + RMSNorm (with the router
        before the experts), and the QK norm's sums of squares and the QK norm + RoPE. float32 runs keep the PyTorch ops, which the CPU path computes the same way."""
        if self.device.type != "cuda" or self.dtype != torch.bfloat16:
            return NO_KERNELS
        try:
            from ..kernels import moe_route, qk_rope
            from ..kernels.fused_moe import gather_moe
            from ..kernels.grouped_moe import grouped_moe
        except ImportError:
            return NO_KERNELS
        return Kernels(gather=gather_moe, grouped=grouped_moe, route=moe_route.route, add_norm=moe_route.add_rms_norm,
                       sum_squares=qk_rope.sum_squares, norm_rope=qk_rope.norm_rope,
                       small_tokens=min(moe_route.MAX_TOKENS, qk_rope.MAX_TOKENS))

    @torch.no_grad()
    def run(self, name: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.modules[name](*(inputs[k] for k in self.inputs[name]))
        return dict(zip(self.outputs[name], out if isinstance(out, tuple) else (out,)))
