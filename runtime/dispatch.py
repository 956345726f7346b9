"""What runs at a step: one decision per step, made here and nowhere else.

A step of T tokens runs either
- a decode layer (runtime/decode_layer.py): one new token per sequence, on a backend that has them
  (the torch backend on a GPU in bf16), at most its kernels' token limit: every layer in a handful
  of fused kernels; or
- the manifest's steps (subgraphs, attention, collectives), where every MoE subgraph runs the form
  the export's schedule gives for T (the engines and ONNX graphs have only those forms). The torch
  backend on a GPU computes that MoE with its own kernels instead of the form's ops: the fused
  gather kernels up to `gather_tokens` (they beat the grouped GEMMs there; measured), the grouped
  GEMMs beyond. Every form computes the same, so which kernel runs does not depend on the form.

`StepPlan.ran` names what ran, for the engine's statistics.
"""
from __future__ import annotations

from dataclasses import dataclass

from export.manifest import AllReduceStep, AttentionStep, BroadcastStep, Manifest, SubgraphStep
from export.moe_forms import MoeSchedule


@dataclass(frozen=True)
class StepPlan:
    tokens: int
    form: str                  # the schedule's MoE form: which subgraph variant the manifest's steps run
    decode_layer: bool         # the step runs through the backend's decode layers
    moe_kernel: str | None     # the torch backend's MoE kernel in the manifest's steps: gather | grouped | None

    @property
    def ran(self) -> str:
        if self.decode_layer:
            return "decode-layer"
        return f"{self.moe_kernel}-kernel" if self.moe_kernel else self.form


@dataclass(frozen=True)
class BackendKernels:
    """What a backend offers beyond running subgraphs: decode layers up to `decode_tokens` tokens
    (0: none) and MoE kernels (gather up to `gather_tokens`, grouped beyond)."""
    decode_tokens: int = 0
    moe_kernels: bool = False
    gather_tokens: int = 0


NONE = BackendKernels()


class Dispatch:
    def __init__(self, schedule: MoeSchedule, kernels: BackendKernels = NONE):
        self.schedule, self.kernels = schedule, kernels

    def plan(self, tokens: int, decode: bool) -> StepPlan:
        """decode: every sequence of the step has one new token."""
        k = self.kernels
        layer = decode and tokens <= k.decode_tokens
        moe = None
        if k.moe_kernels and not layer:
            moe = "gather" if tokens <= k.gather_tokens else "grouped"
        return StepPlan(tokens, self.schedule.pick(tokens), layer, moe)


def step_layers(manifest: Manifest) -> list[int | None]:
    """Each of the manifest's steps' layer (None: the embedding, its broadcast, the head); an
    all-reduce belongs to the layer of the step before it. What a decode layer replaces."""
    out, current = [], None
    for step in manifest.steps:
        if isinstance(step, SubgraphStep):
            current = manifest.subgraphs[next(iter(step.variants.values())) if step.variants else step.name].layer
        elif isinstance(step, AttentionStep):
            current = step.layer
        elif isinstance(step, BroadcastStep):
            current = None
        out.append(current)
    return out


def step_kind(manifest: Manifest, step) -> str:
    """A step as a decode layer's pattern names it: the subgraph's piece, `attention`, or
    `all_reduce:<tensors>`."""
    if isinstance(step, SubgraphStep):
        return manifest.subgraphs[next(iter(step.variants.values())) if step.variants else step.name].piece
    if isinstance(step, AttentionStep):
        return "attention"
    if isinstance(step, AllReduceStep):
        return "all_reduce:" + ",".join(step.tensors)
    return type(step).__name__
