"""The vocabulary-parallel LM head's last step: from each rank's slice of the logits to what rank 0's
sampler needs, moving as little as the step's requests allow.

Each rank holds the logits [N, rows] of vocabulary ids [rank * rows, (rank + 1) * rows) (the last
slice padded; padding masked here). Per step, rank 0 says how many candidates a row needs:
- 1: every row is greedy: each rank's max and first argmax, gathered (8 bytes a row a rank). The
  assembled row's argmax is the full vocabulary's: the lowest id among equal maxima.
- k > 1: every sampled row has 0 < top_k <= k: each rank's top k, gathered. The global top k lies
  among them, so top-k (then top-p) sampling sees the same distribution (up to exact float ties at
  the k-th value across a rank's boundary).
- 0: a row without top-k (or a larger one): the full logits are gathered.
Rank 0 assembles [N, V] float32 logits, -inf where no candidate was sent, for the sampler as is.
"""
from __future__ import annotations

import torch

MAX_CANDIDATES = 1024  # beyond this top_k the full logits are cheaper to gather than to select


def candidates_needed(params) -> int:
    """1 (all greedy), k (the largest top_k of the sampled rows), or 0 (full logits)."""
    sampled = [p for p in params if p.temperature != 0]
    if not sampled:
        return 1
    ks = [p.top_k for p in sampled]
    return max(ks) if all(0 < k <= MAX_CANDIDATES for k in ks) else 0


class VocabGather:
    def __init__(self, comm, vocab_size: int, rows: int):
        self.comm, self.vocab, self.rows = comm, vocab_size, rows
        self.start = comm.rank * rows
        self.valid = max(0, min(rows, vocab_size - self.start))  # the rest is padding

    def finish(self, local: torch.Tensor, k: int) -> torch.Tensor | None:
        """local [N, rows] float32 -> [N, V] on rank 0, None on the others."""
        if self.comm.world == 1:
            return local[:, :self.vocab]
        if self.valid < self.rows:
            local = local.clone()
            local[:, self.valid:] = float("-inf")
        if k == 0:
            parts = self.comm.all_gather(local.contiguous())  # [world, N, rows]
            if self.comm.rank != 0:
                return None
            return parts.permute(1, 0, 2).reshape(local.shape[0], -1)[:, :self.vocab]
        if k == 1:
            values, ids = local.max(-1, keepdim=True)  # the first maximum
        else:
            values, ids = torch.topk(local, min(k, self.rows), dim=-1)
        # one gather of values and ids together, in float64 (ids exact up to 2**53)
        packed = torch.cat([values.double(), (ids + self.start).double()], dim=-1)
        parts = self.comm.all_gather(packed)  # [world, N, 2k]
        if self.comm.rank != 0:
            return None
        n, half = local.shape[0], packed.shape[-1] // 2
        values = parts[..., :half].permute(1, 0, 2).reshape(n, -1).to(local.dtype)
        ids = parts[..., half:].permute(1, 0, 2).reshape(n, -1).long()
        # padding ids (a last slice shorter than k) land in one extra column, dropped
        ids = ids.clamp(max=self.vocab)
        out = torch.full((n, self.vocab + 1), float("-inf"), dtype=local.dtype, device=local.device)
        return out.scatter_(1, ids, values)[:, :self.vocab]
