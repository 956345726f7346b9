"""Where a GPU's memory goes, per tensor-parallel rank, before anything is built or loaded (a share
of the GPU's memory, `--utilization`): the weights its engines and the runtime hold, the activation
scratch of the largest step, a reserve for the CUDA context, and what is left for the KV cache, with
the context that allows.

    python -m engines.memory_plan --model /path/to/MiniMax-M2.5 --tp 8 [--gpu-gb 80] [--utilization 0.9]
        [--max-tokens 2048] [--batch 8]

Weights are counted from the config's tensor shapes in BF16 (the router in float32), as the export
writes them: per layer-rank the attention slices, norms, router and the rank's experts (stored once:
every MoE form binds one copy), the embedding on rank 0, and each rank's slice of the LM head. The measured engines
(docs/BENCHMARKS.md) are within 1% of these bytes. Scratch is an upper bound from the graphs' largest
live tensors at the largest step: each MoE form of the export's schedule at the top of its range
(export/moe_forms.py; the dense form's [experts, intermediate/hidden, tokens] products, the block
form's gathered expert copies per block), which is why the per-step token budget matters.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from export.config import ModelConfig
from export.moe_forms import MoeSchedule, ShardShape, modeled_schedule, schedule_scratch
from export.preflight import layer_rank_bytes
from export.sharding import Shard

GB = 1e9
CONTEXT_RESERVE = 1.5e9  # CUDA context, cuBLAS/NCCL workspaces, the allocator's slack


@dataclass(frozen=True)
class RankMemory:
    rank: int
    layer_weights: int     # bytes, all layers of this rank
    global_weights: int    # the LM head's vocabulary slice and final norm; the embedding on rank 0
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


def scratch_bytes(cfg: ModelConfig, tp: int, max_tokens: int, batch: int, moe: MoeSchedule,
                  expert_split: str = "intermediate") -> int:
    """The largest step's live activations: the MoE's largest (each form of the schedule at the top of
    its range: export/moe_forms.py), the sampled rows' float32 logits, the layer's [T, H] tensors."""
    moe_bytes = schedule_scratch(moe.upto(max_tokens), ShardShape.of(cfg, tp, expert_split))
    hidden = 8 * max_tokens * cfg.hidden_size * 4
    logits = batch * cfg.vocab_size * 4
    return moe_bytes + hidden + logits


def plan(cfg: ModelConfig, tp: int, gpu_bytes: float, utilization: float = 0.9, max_tokens: int = 2048,
         batch: int = 8, moe: MoeSchedule | None = None, expert_split: str = "intermediate") -> list[RankMemory]:
    """moe: the export's MoE form schedule (default: the modeled one)."""
    moe = moe or modeled_schedule(cfg, tp, expert_split, max_tokens)
    layers = cfg.num_hidden_layers * layer_rank_bytes(cfg, tp, expert_split)
    # The embedding on rank 0; every rank its slice of the LM head's vocabulary and the final norm.
    embed = cfg.vocab_size * cfg.hidden_size * 2
    head = (Shard(tp, 0, expert_split).vocab_rows(cfg) + 1) * cfg.hidden_size * 2
    kv_per_token = cfg.num_hidden_layers * 2 * (cfg.num_key_value_heads // tp) * cfg.head_dim * 2
    scratch = scratch_bytes(cfg, tp, max_tokens, batch, moe, expert_split)
    return [RankMemory(r, layers, head + (embed if r == 0 else 0), scratch, int(CONTEXT_RESERVE), int(gpu_bytes * utilization),
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
            cfg, tp, max_tokens, moe = ModelConfig.from_checkpoint(path), a.tp or 1, a.max_tokens or 2048, None
        else:
            from export.manifest import Manifest, find_manifest
            man = Manifest.load(find_manifest(path))
            cfg, tp = man.config, a.tp or man.tp
            max_tokens, moe = a.max_tokens or man.max_tokens, man.moe
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ranks = plan(cfg, tp, a.gpu_gb * GB, a.utilization, max_tokens, a.batch, moe)
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
              "lower --max-tokens (the MoE scratch grows with it) or raise TP", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
