"""The PyTorch pieces the graphs were traced from, built from the checkpoint: the reference, and the
GPU path without TensorRT (bf16, CUDA graphs; on a GPU in bf16 also the runtime's decode layers,
runtime/decode_layer.py, and its MoE kernels, runtime/piece_kernels.py, which runtime/dispatch.py
picks between).

Weights once: a layer-rank's pieces (and each scheduled MoE form's module) are built from one read
of its weights, so on the host they share every tensor; they are then placed on the device together,
each storage copied once and every module's parameters rebound to that copy (a per-module
`.to(device)` would give each MoE form its own copy of the experts). Only the forms the manifest
schedules are built, and layers are read, placed and released one at a time, so the host holds one
layer-rank's weights at most."""
from __future__ import annotations

import gc

import torch

from export.checkpoint import Checkpoint, CheckpointError
from export.layout import make_layout
from export.manifest import Manifest, ManifestError
from export.pieces import build_modules

from .. import profile_ranges
from ..dispatch import NONE, BackendKernels, StepPlan


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
    captures_prefill = True  # its prefill steps can be captured in CUDA graphs (runtime/prefill_graphs.py)

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
        use_kernels = self._kernels_available()
        why_not = self._decode_layers_unsupported(ckpt.config) if use_kernels else "no GPU kernels"
        self.decode_layers: dict = {}  # layer -> runtime/decode_layer.DecodeLayer
        self.pieces: dict[str, str] = {}
        for (unit, r), specs in layout.units().items():
            if r != rank:
                continue
            modules, _ = build_modules(ckpt, layout, unit, rank, specs, dtype)
            place_once(list(modules.values()), self.device)
            for s in specs:
                self.modules[s.name] = modules[s.name].eval()
                self.inputs[s.name] = [t.name for t in s.inputs]
                self.outputs[s.name] = [t.name for t in s.outputs]
                self.pieces[s.name] = s.piece
            if why_not is None and specs[0].layer is not None:
                from .. import decode_layer

                layer = decode_layer.build(manifest, modules, specs[0].layer, manifest.tp)
                if layer is not None:
                    self.decode_layers[specs[0].layer] = layer
            del modules  # this layer-rank's host copies go before the next is read
        differ = set(self.modules) ^ set(manifest.on_rank(rank))
        if differ:
            raise ManifestError(f"the export's subgraphs for rank {rank} are not what its config and MoE schedule "
                                f"lay out (e.g. {sorted(differ)[0]}); export again")
        if use_kernels and len(self.decode_layers) != ckpt.config.num_hidden_layers:
            self.decode_layers = {}  # all layers or none: a step runs one way
        # Garbage of the loading goes before the KV cache is sized. (A GPU memory test once read one
        # q/k/v copy over the plan; in a fresh process the load holds the plan's bytes to 4 KB, so that
        # was an earlier test's memory in the same process: the test now runs in its own.)
        gc.collect()
        self.kernels: BackendKernels = NONE
        # the QK norm + RoPE kernel of prefill steps: the decode layers' head-size rules
        self.rope_kernel = use_kernels and why_not is None
        if use_kernels:
            from .. import decode_layer, piece_kernels

            self.kernels = piece_kernels.offered(decode_layer.MAX_TOKENS if self.decode_layers else 0)

    def _kernels_available(self) -> bool:
        """The Triton kernels run on a GPU in bfloat16; float32 runs keep the PyTorch ops, which the
        CPU path computes the same way."""
        if self.device.type != "cuda" or self.dtype != torch.bfloat16:
            return False
        try:
            from .. import decode_layer, piece_kernels  # noqa: F401  (the triton package)
        except ImportError:
            return False
        return True

    def _decode_layers_unsupported(self, cfg) -> str | None:
        from ..decode_layer import DecodeLayer

        return DecodeLayer.supported(cfg, self.device, self.dtype)

    @torch.no_grad()
    def run(self, name: str, inputs: dict[str, torch.Tensor], plan: StepPlan | None = None
            ) -> dict[str, torch.Tensor]:
        """plan: the step's (runtime/dispatch.py); its MoE kernel, if any, computes the MoE pieces."""
        m, args = self.modules[name], [inputs[k] for k in self.inputs[name]]
        piece = self.pieces[name]
        with profile_ranges.span(profile_ranges.PIECE + piece):
            if plan is not None and self.rope_kernel and piece in ("attn", "qk_rope"):
                from .. import piece_kernels

                out = piece_kernels.attention_in(m, piece, *args)
            elif plan is not None and plan.moe_kernel and piece in ("moe", "post"):
                from .. import piece_kernels

                if piece == "post":
                    m, args = m.moe, [args[0], m.o_proj(args[1])]
                out = piece_kernels.moe(m, *args, plan.moe_kernel)
            else:
                out = m(*args)
        return dict(zip(self.outputs[name], out if isinstance(out, tuple) else (out,)))
