"""Where a GPU's memory goes, per tensor-parallel rank, before anything is built or loaded (like
vLLM's gpu_memory_utilization): the weights its engines and the runtime hold, the activation
scratch of the largest step, a reserve for the CUDA context, and what is left for the KV cache, with
the context that allows.

    python -m engines.memory_plan --model /path/to/MiniMax-M2.5 --tp 8 [--gpu-gb 80] [--utilization 0.9]
        [--max-tokens 2048] [--batch 8]

Weights are counted from the config's tensor shapes in BF16 (the router in float32), as the export
writes them: per layer-rank the attention slices, norms, router and the rank's experts (stored once:
both MoE engines bind one copy), plus the embedding and the LM head on rank 0. The measured engines
(docs/BENCHMARKS.md) are within 1% of these bytes. Scratch is an upper bound from the graphs' largest
live tensors at the largest step: with the dense MoE form that is [experts, intermediate/hidden,
tokens] products, which is why the per-step token budget matters.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from export.config import ModelConfig
from export.preflight import layer_rank_bytes

GB = 1e9
CONTEXT_RESERVE = 1.5e9  # CUDA context, cuBLAS/NCCL workspaces, the allocator's slack


@dataclass(frozen=True)
class RankMemory:
    rank: int
    layer_weights: int     # bytes, all layers of this rank
    global_weights: int    # embed + norm + head (rank 0)
    scratch: int           # activation upper bound of the largest step
    reserve: int
    budget: int            # gpu bytes x utilization
    kv_per_token: int      # bytes per cached token on this rank

    @property
    def weights(self) -> int:
        return self.layer_weights + self.global_weights

    @property
    def kv_cache(self) -> int:
        return max(0, self.budget - self.weights - self.scratch - self.reserve)

    @property
    def kv_tokens(self) -> int:
        return self.kv_cache // self.kv_per_token


def scratch_bytes(cfg: ModelConfig, tp: int, max_tokens: int, batch: int, crossover: int) -> int:
    """The largest step's live activations: the dense MoE's [E, 2I, T] / [E, I, T] (bf16) and
    [E, H, T] (float32) products when the step is past the crossover, else the gather form's per-pair
    rows; the sampled rows' float32 logits; the layer's [T, H] tensors."""
    E, H, I, k = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size // tp, cfg.top_k
    T = max_tokens
    dense = T * E * (2 * I * 2 + I * 2 + H * 4) if T > crossover else 0
    gather = min(T, crossover) * k * (2 * I * H * 2 + H * I * 2)  # the gathered expert copies (ONNX form)
    hidden = 8 * T * H * 4
    logits = batch * cfg.vocab_size * 4
    return max(dense, gather) + hidden + logits


def plan(cfg: ModelConfig, tp: int, gpu_bytes: float, utilization: float = 0.9, max_tokens: int = 2048,
         batch: int = 8, crossover: int | None = None, expert_split: str = "intermediate") -> list[RankMemory]:
    crossover = crossover if crossover is not None else max(1, cfg.num_experts // cfg.top_k)
    layers = cfg.num_hidden_layers * layer_rank_bytes(cfg, tp, expert_split)
    global_ = 2 * cfg.vocab_size * cfg.hidden_size * 2 + cfg.hidden_size * 2
    kv_per_token = cfg.num_hidden_layers * 2 * (cfg.num_key_value_heads // tp) * cfg.head_dim * 2
    scratch = scratch_bytes(cfg, tp, max_tokens, batch, crossover)
    return [RankMemory(r, layers, global_ if r == 0 else 0, scratch, int(CONTEXT_RESERVE), int(gpu_bytes * utilization),
                       kv_per_token) for r in range(tp)]


def table(cfg: ModelConfig, ranks: list[RankMemory], batch: int) -> str:
    rows = ["| rank | weights GB | scratch GB | reserve GB | KV cache GB | KV tokens | context per sequence at batch "
            f"{batch} |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in ranks[:2] if len(ranks) > 1 else ranks:
        per_seq = min(m.kv_tokens // max(batch, 1), cfg.max_position_embeddings)
        rows.append(f"| {m.rank if m.rank == 0 else f'1..{len(ranks) - 1}'} | {m.weights / GB:.1f} | "
                    f"{m.scratch / GB:.1f} | {m.reserve / GB:.1f} | {m.kv_cache / GB:.1f} | {m.kv_tokens:,} | {per_seq:,} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engines.memory_plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a checkpoint folder (config.json) or an export (manifest.json)")
    ap.add_argument("--tp", type=int, help="tensor parallelism (default: the export's)")
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="memory per GPU in GB (default 80: A100-80GB)")
    ap.add_argument("--utilization", type=float, default=0.9, help="fraction of it to plan with (default 0.9)")
    ap.add_argument("--max-tokens", type=int, help="largest step in tokens (default: the export's, else the export's default, 2048)")
    ap.add_argument("--batch", type=int, default=8, help="sequences to divide the KV cache among (default 8)")
    a = ap.parse_args(argv)
    path = Path(a.model)
    try:
        if (path / "config.json").is_file():  # a checkpoint
            cfg, tp, max_tokens, cross = ModelConfig.from_checkpoint(path), a.tp or 1, a.max_tokens or 2048, None
        else:
            from export.manifest import Manifest, find_manifest
            man = Manifest.load(find_manifest(path))
            cfg, tp = man.config, a.tp or man.tp
            max_tokens, cross = a.max_tokens or man.max_tokens, man.moe_crossover_tokens
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ranks = plan(cfg, tp, a.gpu_gb * GB, a.utilization, max_tokens, a.batch, cross)
    print(f"{cfg.num_hidden_layers} layers, TP={tp}, {a.gpu_gb:g} GB GPUs at {a.utilization:g}, steps of up to "
          f"{max_tokens} tokens\n")
    print(table(cfg, ranks, a.batch))
    tight = min(ranks, key=lambda m: m.kv_cache)
    print(f"\nevery rank holds the same blocks: {tight.kv_tokens:,} tokens of KV cache in all "
          f"(rank {tight.rank} is the tightest); the runtime takes this with --gpu-memory-utilization {a.utilization:g}")
    short = [m for m in ranks if m.kv_cache == 0]
    if short:
        need = ranks[0].weights + ranks[0].scratch + ranks[0].reserve
        print(f"\nerror: rank 0 needs {need / GB:.1f} GB before any KV cache and has {ranks[0].budget / GB:.1f} GB; "
              "lower --max-tokens (the dense MoE scratch grows with it) or raise TP", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
