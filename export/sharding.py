"""Which part of each weight one tensor-parallel rank holds.

Attention is split by heads (q/k/v rows, o_proj columns, the QK-norm weights with them). Experts are
split either by intermediate dim (w1/w3 rows, w2 columns; every rank holds every expert) or, as
expert parallelism, by whole experts. The LM head is split by vocabulary rows. Norms, the router gate
and its bias are replicated; the embedding table lives on rank 0.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig

EXPERT_SPLITS = ("intermediate", "expert")


class ShardingError(ValueError):
    """The requested tensor parallelism does not divide the model."""


@dataclass(frozen=True)
class Shard:
    tp: int = 1
    rank: int = 0
    expert_split: str = "intermediate"

    def check(self, cfg: ModelConfig) -> None:
        """Raise a ShardingError, before any work starts, if this split cannot be made."""
        if self.expert_split not in EXPERT_SPLITS:
            raise ShardingError(f"expert split {self.expert_split!r} is not one of {EXPERT_SPLITS}")
        if self.tp < 1 or not (0 <= self.rank < self.tp):
            raise ShardingError(f"rank {self.rank} is not in 0..{self.tp - 1}")
        problems = []
        if cfg.num_attention_heads % self.tp:
            problems.append(f"num_attention_heads={cfg.num_attention_heads}")
        if cfg.num_key_value_heads % self.tp:
            problems.append(f"num_key_value_heads={cfg.num_key_value_heads}")
        if self.expert_split == "intermediate" and cfg.intermediate_size % self.tp:
            problems.append(f"intermediate_size={cfg.intermediate_size}")
        if self.expert_split == "expert" and cfg.num_experts % self.tp:
            problems.append(f"num_local_experts={cfg.num_experts}")
        if problems:
            valid = [t for t in range(1, cfg.num_key_value_heads + 1)
                     if not cfg.num_attention_heads % t and not cfg.num_key_value_heads % t
                     and not (cfg.intermediate_size if self.expert_split == "intermediate"
                              else cfg.num_experts) % t]
            raise ShardingError(f"TP={self.tp} does not divide {', '.join(problems)}; "
                                f"valid TP sizes for this model: {valid}")

    def _part(self, n: int) -> tuple[int, int]:
        per = n // self.tp
        return self.rank * per, (self.rank + 1) * per

    def q_rows(self, cfg: ModelConfig) -> tuple[int, int]:
        h0, h1 = self._part(cfg.num_attention_heads)
        return h0 * cfg.head_dim, h1 * cfg.head_dim

    def kv_rows(self, cfg: ModelConfig) -> tuple[int, int]:
        h0, h1 = self._part(cfg.num_key_value_heads)
        return h0 * cfg.head_dim, h1 * cfg.head_dim

    def inter_range(self, cfg: ModelConfig) -> tuple[int, int]:
        if self.expert_split == "expert":
            return 0, cfg.intermediate_size
        return self._part(cfg.intermediate_size)

    def vocab_rows(self, cfg: ModelConfig) -> int:
        """LM-head rows per rank (vocabulary-parallel): ceil(V / tp); the last rank's slice is padded
        with zero rows to this size, and the runtime masks the padding."""
        return -(-cfg.vocab_size // self.tp)

    def vocab_range(self, cfg: ModelConfig) -> tuple[int, int]:
        """The vocabulary ids whose logits this rank computes."""
        per = self.vocab_rows(cfg)
        return min(cfg.vocab_size, self.rank * per), min(cfg.vocab_size, (self.rank + 1) * per)

    def expert_range(self, cfg: ModelConfig) -> tuple[int, int]:
        if self.expert_split == "intermediate":
            return 0, cfg.num_experts
        return self._part(cfg.num_experts)
