"""The PyTorch pieces the graphs were traced from, built from the checkpoint: the reference, and the
GPU path without TensorRT (bf16, fused gather-MoE kernel, CUDA graphs).

Weights once: a layer-rank's pieces (and each scheduled MoE form's module) are built from one read
of its weights, so on the host they share every tensor; they are then placed on the device together,
each storage copied once and every module's parameters rebound to that copy (a per-module
`.to(device)` would give each MoE form its own copy of the experts). Only the forms the manifest
schedules are built, and layers are read, placed and released one at a time, so the host holds one
layer-rank's weights at most."""
from __future__ import annotations

import torch

from export.checkpoint import Checkpoint, CheckpointError
from export.layout import make_layout
from export.manifest import Manifest, ManifestError
from export.model import NO_KERNELS, Kernels
from export.pieces import build_modules


def place_once(modules: list[torch.nn.Module], device: torch.device) -> None:
    """Put the modules' parameters and buffers on `device`, each weight held once: a storage the
    tensors use whole is copied once, and tensors that shared it on the host share its device copy
    (same offsets and strides); a tensor that uses only part of its storage (the checkpoint reader
    gives a TP slice as a view of the whole tensor: the LM head's vocabulary slice, the QK norms)
    is copied alone, also on the CPU, so no rank holds more than its slice."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    copies: dict[tuple, torch.Tensor | torch.UntypedStorage] = {}

    def placed(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if t.is_contiguous() and s.nbytes() == t.numel() * t.element_size():
            if t.device == device:
                return t  # already there (the CPU path; benchmarks' random weights are made on the GPU)
            key = ("storage", str(t.device), s.data_ptr())
            if key not in copies:
                copies[key] = torch.empty(0, dtype=torch.uint8, device=t.device).set_(s).to(device).untyped_storage()
            return torch.empty(0, dtype=t.dtype, device=device).set_(copies[key], t.storage_offset(), t.size(),
                                                                     t.stride())
        key = ("view", str(t.device), s.data_ptr(), t.storage_offset(), tuple(t.size()), tuple(t.stride()), t.dtype)
        if key not in copies:
            copies[key] = t.to(device, copy=True, memory_format=torch.contiguous_format)
        return copies[key]

    for m in modules:
        for sub in m.modules():
            for key, p in sub._parameters.items():
                q = None if p is None else placed(p.data)
                if q is not None and q is not p.data:
                    sub._parameters[key] = torch.nn.Parameter(q, requires_grad=False)
            for key, b in sub._buffers.items():
                if b is not None:
                    sub._buffers[key] = placed(b)


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
                # On a GPU the FP8 bytes go there and are dequantized there (minutes of host work at
                # full depth otherwise).
                ckpt = Checkpoint(path, device=device if torch.device(device).type == "cuda" else "cpu")
            except CheckpointError as e:
                raise ManifestError(f"the torch backend cannot read the export's checkpoint: {e}") from e
        # The manifest's subgraphs: the MoE forms its schedule exported, not every form there is.
        layout = make_layout(ckpt.config, manifest.tp, manifest.expert_split, manifest.moe.forms)
        self.dtype, self.device = dtype, torch.device(device)
        self.modules: dict[str, torch.nn.Module] = {}
        self.inputs: dict[str, list[str]] = {}
        self.outputs: dict[str, list[str]] = {}
        kernels = self._kernels()
        for (unit, r), specs in layout.units().items():
            if r != rank:
                continue
            modules, _ = build_modules(ckpt, layout, unit, rank, specs, dtype, kernels=kernels)
            place_once(list(modules.values()), self.device)
            for s in specs:
                self.modules[s.name] = modules[s.name].eval()
                self.inputs[s.name] = [t.name for t in s.inputs]
                self.outputs[s.name] = [t.name for t in s.outputs]
            del modules  # this layer-rank's host copies go before the next is read
        differ = set(self.modules) ^ set(manifest.on_rank(rank))
        if differ:
            raise ManifestError(f"the export's subgraphs for rank {rank} are not what its config and MoE schedule "
                                f"lay out (e.g. {sorted(differ)[0]}); export again")

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
