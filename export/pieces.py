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


ROWS_PER_CHUNK = 8192  # embedding / LM-head rows per streamed chunk (48 MiB at hidden 3072)


def _row_chunks(ckpt: Checkpoint, name: str, rows: int, dtype: torch.dtype):
    for r in range(0, rows, ROWS_PER_CHUNK):
        yield ckpt.read({name: (slice(r, min(rows, r + ROWS_PER_CHUNK)),)})[name].to(dtype)


def build_modules(ckpt: Checkpoint, plan: ExportPlan, unit: str, rank: int, specs: list[SubgraphSpec],
                  dtype: torch.dtype, stream: bool = False) -> dict[str, torch.nn.Module]:
    """stream: the big weights (experts, embedding, LM head) are meta tensors, and each module's
    `weight_chunks(param name)` yields them slice by slice, read (and dequantized) as it goes: what
    the export writes, without ever holding them whole. Such modules cannot run."""
    cfg, all_ = plan.cfg, (slice(None),)
    V, H = cfg.vocab_size, cfg.hidden_size
    if unit in ("embed", "head"):
        name = "model.embed_tokens.weight" if unit == "embed" else "lm_head.weight"
        big = (torch.empty(V, H, dtype=dtype, device="meta") if stream
               else ckpt.read({name: all_})[name].to(dtype))
        if unit == "embed":
            m = Embed(big)
        else:
            m = Head(ckpt.read({"model.norm.weight": all_})["model.norm.weight"].to(dtype), big, cfg)
        if stream:
            m.weight_chunks = lambda param: _row_chunks(ckpt, name, V, dtype)
        return {specs[0].name: m}
    w = ckpt.layer(specs[0].layer, dtype, Shard(plan.tp, rank, plan.expert_split), stream)
    make = {"attn": lambda s: AttnBlock(w, cfg), "attn_in": lambda s: AttnIn(w, cfg),
            "qk_rope": lambda s: QkRope(w, cfg), "o_proj": lambda s: OProj(w),
            "moe": lambda s: Moe(w, cfg, s.form), "post": lambda s: PostBlock(w, cfg, s.form)}
    modules = {s.name: make[s.piece](s) for s in specs}
    if stream:
        for m in modules.values():
            m.weight_chunks = lambda param: w.expert_chunks(param.rsplit(".", 1)[-1])
    return modules
