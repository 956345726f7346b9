"""The PyTorch module behind each planned subgraph: what the export traces and what the runtime's
`torch` backend runs, built from one read of a layer-rank's weights."""
from __future__ import annotations

import torch

from .checkpoint import Checkpoint
from .model import AttnBlock, AttnIn, Embed, Head, Moe, OProj, PostBlock, QkRope
from .plan import ExportPlan, SubgraphSpec
from .sharding import Shard


def unit_of(spec: SubgraphSpec) -> str:
    """Subgraphs built from one read of weights: a layer, the embedding, the head."""
    return f"layers.{spec.layer}" if spec.layer is not None else spec.name


def build_modules(ckpt: Checkpoint, plan: ExportPlan, unit: str, rank: int, specs: list[SubgraphSpec],
                  dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    cfg, all_ = plan.cfg, (slice(None),)
    if unit == "embed":
        t = ckpt.read({"model.embed_tokens.weight": all_})
        return {specs[0].name: Embed(t["model.embed_tokens.weight"].to(dtype))}
    if unit == "head":
        t = ckpt.read({"model.norm.weight": all_, "lm_head.weight": all_})
        return {specs[0].name: Head(t["model.norm.weight"].to(dtype), t["lm_head.weight"].to(dtype), cfg)}
    w = ckpt.layer(specs[0].layer, dtype, Shard(plan.tp, rank, plan.expert_split))
    make = {"attn": lambda s: AttnBlock(w, cfg), "attn_in": lambda s: AttnIn(w, cfg),
            "qk_rope": lambda s: QkRope(w, cfg), "o_proj": lambda s: OProj(w),
            "moe": lambda s: Moe(w, cfg, s.form), "post": lambda s: PostBlock(w, cfg, s.form)}
    return {s.name: make[s.piece](s) for s in specs}
