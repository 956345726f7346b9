"""The PyTorch module behind each subgraph of the layout: what the export traces and what the
runtime's `torch` backend runs, built from one read of a layer-rank's weights."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .checkpoint import Checkpoint
from .layout import GraphLayout
from .manifest import SubgraphSpec
from .model import AttnBlock, AttnIn, Embed, Head, Moe, OProj, PostBlock, QkRope
from .sharding import Shard

ROWS_PER_CHUNK = 8192  # embedding / LM-head rows per streamed chunk (48 MiB at hidden 3072)
# parameter name -> its values slice by slice (dequantized as read), for the streamed weights
Chunks = Callable[[str], Iterator[torch.Tensor]]


def _row_chunks(ckpt: Checkpoint, name: str, rows: tuple[int, int], dtype: torch.dtype, pad: int = 0):
    """Rows [r0, r1) of a [rows, H] table slice by slice, then `pad` zero rows."""
    r0, r1 = rows
    for r in range(r0, r1, ROWS_PER_CHUNK):
        yield ckpt.read({name: (slice(r, min(r1, r + ROWS_PER_CHUNK)),)})[name].to(dtype)
    if pad:
        yield torch.zeros(pad, ckpt.config.hidden_size, dtype=dtype)


def build_modules(ckpt: Checkpoint, layout: GraphLayout, unit: str, rank: int, specs: list[SubgraphSpec],
                  dtype: torch.dtype, stream: bool = False) -> tuple[dict[str, torch.nn.Module], Chunks | None]:
    """The unit's modules by subgraph name. stream: the big weights (experts, embedding, LM head) are
    meta tensors and the returned `chunks(param name)` yields them slice by slice, read and
    dequantized as it goes: what the export writes, never holding them whole (such modules cannot
    run)."""
    cfg, all_ = layout.cfg, (slice(None),)
    V, H = cfg.vocab_size, cfg.hidden_size
    if unit in ("embed", "head"):
        # The embedding whole (rank 0); the LM head by vocabulary slice, padded to equal rows per rank.
        shard = Shard(layout.tp, rank, layout.expert_split)
        name, rows, pad = "model.embed_tokens.weight", (0, V), 0
        if unit == "head":
            name, rows = "lm_head.weight", shard.vocab_range(cfg)
            pad = shard.vocab_rows(cfg) - (rows[1] - rows[0])
        n = rows[1] - rows[0] + pad
        if stream:
            big = torch.empty(n, H, dtype=dtype, device="meta")
        else:  # one read (the torch backend's weights may live on a GPU)
            big = ckpt.read({name: (slice(*rows),)})[name].to(dtype)
            if pad:
                big = torch.cat([big, big.new_zeros(pad, H)])
        if unit == "embed":
            m = Embed(big)
        else:
            m = Head(ckpt.read({"model.norm.weight": all_})["model.norm.weight"].to(dtype), big, cfg)
        chunks = (lambda param: _row_chunks(ckpt, name, rows, dtype, pad)) if stream else None
        return {specs[0].name: m}, chunks
    w = ckpt.layer(specs[0].layer, dtype, Shard(layout.tp, rank, layout.expert_split), stream)
    make = {"attn": lambda s: AttnBlock(w, cfg), "attn_in": lambda s: AttnIn(w, cfg),
            "qk_rope": lambda s: QkRope(w, cfg), "o_proj": lambda s: OProj(w),
            "moe": lambda s: Moe(w, cfg, s.form), "post": lambda s: PostBlock(w, cfg, s.form)}
    modules = {s.name: make[s.piece](s) for s in specs}
    chunks = (lambda param: w.expert_chunks(param.rsplit(".", 1)[-1])) if stream else None
    return modules, chunks
