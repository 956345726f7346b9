"""What an export writes: the subgraphs, their I/O, and the ordered steps the runtime executes.

A plain function of the model config and the tensor-parallel settings, so that the export, the
manifest, the engine builder and the runtime agree by construction. The runtime keeps one table of
named tensors; every subgraph reads its inputs from it by name and writes its outputs to it, and
runtime ops (all-reduce, attention) act on it between them. A layer boundary is always the pair
(residual, delta), see export/model.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .config import ModelConfig
from .model import MOE_FORMS
from .sharding import Shard

TOKENS = "T"  # the one symbolic dimension: tokens of all sequences in a step, packed


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "bfloat16" | "float32" | "int64" (the BF16 graph's; twins use float32 for bfloat16)
    shape: tuple  # ints and TOKENS

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class SubgraphSpec:
    name: str              # "embed", "layers.3.attn_in", "layers.3.moe_gather", "head", ...
    piece: str             # which module builds it: embed attn_in qk_rope attn o_proj moe post head
    layer: int | None
    form: str | None       # MoE form, for moe / post
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ranks: tuple[int, ...]
    weights_group: str     # subgraphs with the same group on a rank share one external-data file

    def to_dict(self) -> dict:
        d = asdict(self)
        d["inputs"] = [t.to_dict() for t in self.inputs]
        d["outputs"] = [t.to_dict() for t in self.outputs]
        d["ranks"] = list(self.ranks)
        return d


@dataclass
class ExportPlan:
    cfg: ModelConfig
    tp: int
    expert_split: str
    subgraphs: list[SubgraphSpec] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)

    def by_name(self) -> dict[str, SubgraphSpec]:
        return {s.name: s for s in self.subgraphs}


def default_crossover(cfg: ModelConfig) -> int:
    """Token count up to which the gather MoE form runs. Where T*k reaches E the gather form reads as
    many expert bytes as the dense form, which also reads them once; a placeholder until measured."""
    return max(1, cfg.num_experts // cfg.top_k)


def make_plan(cfg: ModelConfig, tp: int = 1, expert_split: str = "intermediate") -> ExportPlan:
    Shard(tp, 0, expert_split).check(cfg)
    H, hd, V = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    nh, nkv = cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp
    T, bf, f32, i64 = TOKENS, "bfloat16", "float32", "int64"
    t = TensorSpec
    all_ranks = tuple(range(tp))
    plan = ExportPlan(cfg, tp, expert_split)

    def add(name, piece, layer, form, inputs, outputs, group, ranks=all_ranks):
        plan.subgraphs.append(SubgraphSpec(name, piece, layer, form, tuple(inputs), tuple(outputs), ranks, group))
        return name

    pair = [t("residual", bf, (T, H)), t("delta", bf, (T, H))]
    # The embedding table (1.2 GB for the real vocabulary) lives on rank 0 alone, which sends the
    # first residual pair to the others: a [T, H] broadcast per step instead of a table per GPU.
    plan.steps.append({"op": "subgraph", "name": add("embed", "embed", None, None, [t("ids", i64, (T,))], pair,
                                                      "embed", ranks=(0,))})
    if tp > 1:
        plan.steps.append({"op": "broadcast", "tensors": ["residual", "delta"], "src": 0})
    for n in range(cfg.num_hidden_layers):
        p = f"layers.{n}."
        h = t("h", bf, (T, H))
        q_rot, k_rot, v3 = t("q_rot", bf, (T, nh, hd)), t("k_rot", bf, (T, nkv, hd)), t("v", bf, (T, nkv, hd))
        attn = t("attn", bf, (T, nh * hd))
        attention = {"op": "attention", "layer": n, "q": "q_rot", "k": "k_rot", "v": "v", "out": "attn",
                     "num_heads": nh, "num_kv_heads": nkv, "head_dim": hd, "scale": hd ** -0.5}
        if tp == 1:
            plan.steps.append({"op": "subgraph", "name": add(
                p + "attn", "attn", n, None, pair + [t("positions", i64, (T,))], [h, q_rot, k_rot, v3], p + "attn")})
            plan.steps.append(attention)
            variants = {f: add(p + f"post_{f}", "post", n, f, [h, attn], pair, p + "post") for f in MOE_FORMS}
            plan.steps.append({"op": "subgraph", "name": p + "post", "variants": variants})
            continue
        ssq = [t("q_ssq", f32, (T, 1)), t("k_ssq", f32, (T, 1))]
        q, k = t("q", bf, (T, nh * hd)), t("k", bf, (T, nkv * hd))
        plan.steps += [
            {"op": "subgraph", "name": add(p + "attn_in", "attn_in", n, None, pair,
                                           [h, q, k, v3] + ssq, p + "attn")},
            {"op": "all_reduce", "tensors": ["q_ssq", "k_ssq"]},
            {"op": "subgraph", "name": add(p + "qk_rope", "qk_rope", n, None, [q, k] + ssq + [t("positions", i64, (T,))],
                                           [q_rot, k_rot], p + "attn")},
            attention,
            {"op": "subgraph", "name": add(p + "o_proj", "o_proj", n, None, [attn], [t("attn_out", bf, (T, H))],
                                           p + "o_proj")},
            {"op": "all_reduce", "tensors": ["attn_out"]},
        ]
        variants = {f: add(p + f"moe_{f}", "moe", n, f, [h, t("attn_out", bf, (T, H))], pair, p + "moe")
                    for f in MOE_FORMS}
        plan.steps += [{"op": "subgraph", "name": p + "moe", "variants": variants},
                       {"op": "all_reduce", "tensors": ["delta"]}]
    # Logits are needed once: rank 0 computes them from the residual pair (the same on every rank).
    plan.steps.append({"op": "subgraph", "name": add("head", "head", None, None, pair, [t("logits", f32, (T, V))],
                                                      "head", ranks=(0,))})
    return plan
