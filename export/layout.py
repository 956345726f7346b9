"""What an export writes: the subgraphs, their I/O, and the ordered steps the runtime executes.

A plain function of the model config and the tensor-parallel settings, so that the export, the
manifest, the engine builder and the runtime agree by construction. The runtime keeps one table of
named tensors; every subgraph reads its inputs from it by name and writes its outputs to it, and
runtime ops (all-reduce, attention) act on it between them. A layer boundary is always the pair
(residual, delta), see export/model.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import ModelConfig
from .manifest import (TOKENS, AllReduceStep, AttentionStep, BroadcastStep, Step, SubgraphSpec, SubgraphStep,
                       TensorSpec)
from .moe_forms import FORMS
from .sharding import Shard


@dataclass
class GraphLayout:
    """The subgraphs of an export and the steps that run them: what the manifest records."""
    cfg: ModelConfig
    tp: int
    expert_split: str
    forms: tuple[str, ...] = FORMS  # the MoE forms exported
    subgraphs: list[SubgraphSpec] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)

    def units(self) -> dict[tuple[str, int], list[SubgraphSpec]]:
        """The subgraphs of each unit of export work: (unit, rank) -> its subgraphs, in layout order."""
        out: dict[tuple[str, int], list[SubgraphSpec]] = {}
        for s in self.subgraphs:
            for r in s.ranks:
                out.setdefault((s.unit, r), []).append(s)
        return out


def make_layout(cfg: ModelConfig, tp: int = 1, expert_split: str = "intermediate",
                forms: tuple[str, ...] = FORMS) -> GraphLayout:
    """`forms`: the MoE forms exported (the schedule's; each a variant of the layer's MoE step)."""
    Shard(tp, 0, expert_split).check(cfg)
    H, hd, V = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    nh, nkv = cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp
    T, bf, f32, i64 = TOKENS, "bfloat16", "float32", "int64"
    t = TensorSpec
    all_ranks = tuple(range(tp))
    layout = GraphLayout(cfg, tp, expert_split, tuple(forms))

    # The experts, per rank: every expert's slice (intermediate split) or this rank's whole experts.
    # They are inputs of the MoE subgraphs, not constants: both forms bind one device copy.
    e0, e1 = Shard(tp, 0, expert_split).expert_range(cfg)
    i0, i1 = Shard(tp, 0, expert_split).inter_range(cfg)
    e_local, i_local = e1 - e0, i1 - i0

    def experts(prefix: str) -> tuple[TensorSpec, ...]:
        return (TensorSpec(prefix + "w13", bf, (e_local, 2 * i_local, H)),
                TensorSpec(prefix + "w2", bf, (e_local, H, i_local)))

    def add(name, piece, layer, form, inputs, outputs, group, ranks=all_ranks):
        weights = experts("moe." if piece == "post" else "") if piece in ("moe", "post") else ()
        layout.subgraphs.append(SubgraphSpec(name, piece, layer, form, tuple(inputs), tuple(outputs), ranks, group,
                                             weight_inputs=weights))
        return name

    pair = [t("residual", bf, (T, H)), t("delta", bf, (T, H))]
    # The embedding table (1.2 GB for the real vocabulary) lives on rank 0 alone, which sends the
    # first residual pair to the others: a [T, H] broadcast per step instead of a table per GPU.
    layout.steps.append(SubgraphStep(add("embed", "embed", None, None, [t("ids", i64, (T,))], pair, "embed", ranks=(0,))))
    if tp > 1:
        layout.steps.append(BroadcastStep(("residual", "delta"), 0))
    for n in range(cfg.num_hidden_layers):
        p = f"layers.{n}."
        h = t("h", bf, (T, H))
        q_rot, k_rot, v3 = t("q_rot", bf, (T, nh, hd)), t("k_rot", bf, (T, nkv, hd)), t("v", bf, (T, nkv, hd))
        attn = t("attn", bf, (T, nh * hd))
        attention = AttentionStep(n, "q_rot", "k_rot", "v", "attn", nh, nkv, hd, hd ** -0.5)
        if tp == 1:
            layout.steps.append(SubgraphStep(add(
                p + "attn", "attn", n, None, pair + [t("positions", i64, (T,))], [h, q_rot, k_rot, v3], p + "attn")))
            layout.steps.append(attention)
            variants = {f: add(p + f"post_{f}", "post", n, f, [h, attn], pair, p + "post") for f in forms}
            layout.steps.append(SubgraphStep(p + "post", variants))
            continue
        ssq = [t("q_ssq", f32, (T, 1)), t("k_ssq", f32, (T, 1))]
        q, k = t("q", bf, (T, nh * hd)), t("k", bf, (T, nkv * hd))
        layout.steps += [
            SubgraphStep(add(p + "attn_in", "attn_in", n, None, pair, [h, q, k, v3] + ssq, p + "attn")),
            AllReduceStep(("q_ssq", "k_ssq")),
            SubgraphStep(add(p + "qk_rope", "qk_rope", n, None, [q, k] + ssq + [t("positions", i64, (T,))],
                             [q_rot, k_rot], p + "attn")),
            attention,
            SubgraphStep(add(p + "o_proj", "o_proj", n, None, [attn], [t("attn_out", bf, (T, H))], p + "o_proj")),
            AllReduceStep(("attn_out",)),
        ]
        variants = {f: add(p + f"moe_{f}", "moe", n, f, [h, t("attn_out", bf, (T, H))], pair, p + "moe")
                    for f in forms}
        layout.steps += [SubgraphStep(p + "moe", variants), AllReduceStep(("delta",))]
    # Vocabulary-parallel LM head: every rank computes the logits of its slice of the vocabulary
    # from the residual pair (the same on every rank); the runtime gathers what sampling needs.
    vocab_rows = Shard(tp, 0, expert_split).vocab_rows(cfg)
    layout.steps.append(SubgraphStep(add("head", "head", None, None, pair, [t("logits", f32, (T, vocab_rows))],
                                         "head")))
    return layout


def random_inputs(inputs, tokens: int, vocab_size: int, seed: int) -> dict:
    """Random float32/int64 inputs for a subgraph's input specs at `tokens` tokens: ids below the
    vocabulary, positions below the token count, sums of squares positive and of the size a norm
    expects. For tracing, tests and engine checks alike."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in inputs:
        shape = t.concrete(tokens)
        if t.dtype == "int64":
            out[t.name] = torch.randint(0, vocab_size if t.name == "ids" else tokens, shape, generator=g)
        elif t.name.endswith("_ssq"):
            out[t.name] = torch.rand(shape, generator=g) * 100 + 1
        else:
            out[t.name] = torch.randn(shape, generator=g)
    return out
