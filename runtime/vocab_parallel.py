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

Two extras, only on the steps that need them (an unconstrained step without logprobs pays nothing):
- a grammar's bitmask (runtime/constrained.py) for some rows: each rank sets its slice's disallowed
  entries to -inf before the candidates are chosen, so greedy and sampled rows see exactly the
  masked distribution at any TP;
- logprobs: each rank's logsumexp over its slice and its top n, taken before the mask (the model's
  raw distribution, as vLLM reports by default), gathered in one collective: rank 0 combines the
  logsumexps and picks the global top n from the candidates. The full logits never move for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_CANDIDATES = 1024  # beyond this top_k the full logits are cheaper to gather than to select


def candidates_needed(params) -> int:
    """1 (all greedy), k (the largest top_k of the sampled rows), or 0 (full logits)."""
    sampled = [p for p in params if p.temperature != 0]
    if not sampled:
        return 1
    ks = [p.top_k for p in sampled]
    return max(ks) if all(0 < k <= MAX_CANDIDATES for k in ks) else 0


@dataclass
class StepExtras:
    """What a step needs beyond its candidates, sent to every rank with the step (None: nothing).
    mask_rows: the logits rows a grammar constrains; mask: their bitmasks [len(mask_rows), ceil(V/32)]
    int32 (bit j of word w allows token 32 w + j); top_logprobs: None, or how many alternatives the
    step's logprobs requests need (0: only the logsumexp, for the sampled token's logprob)."""
    mask_rows: list[int] = field(default_factory=list)
    mask: torch.Tensor | None = None
    top_logprobs: int | None = None


@dataclass
class LogprobStats:
    """Rank 0's view of the raw distribution of each row: logsumexp [N] and the top n [N, n]."""
    lse: torch.Tensor
    top_values: torch.Tensor
    top_ids: torch.Tensor


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

    def apply_mask(self, local: torch.Tensor, rows: list[int], mask: torch.Tensor) -> torch.Tensor:
        """local [N, rows] with the given rows' disallowed ids of this rank's slice set to -inf (a copy:
        the head's output buffer may be a CUDA graph's)."""
        ids = torch.arange(self.start, self.start + self.valid, device=local.device)
        words = mask.to(local.device)[:, ids >> 5]  # [R, valid]
        allowed = ((words >> (ids & 31).to(torch.int32)) & 1).bool()
        out = local.clone()
        at = torch.tensor(rows, device=local.device)
        out[at, :self.valid] = local[at, :self.valid].masked_fill(~allowed, float("-inf"))
        return out

    def logprob_stats(self, local: torch.Tensor, n: int) -> LogprobStats | None:
        """Each row's float32 logsumexp over the whole vocabulary and its top n (ids, raw logits), from
        each rank's slice; on rank 0, None on the others."""
        part = local[:, :self.valid].float()
        lse = torch.logsumexp(part, dim=-1, keepdim=True)
        n = min(n, self.valid)
        values, ids = torch.topk(part, n, dim=-1) if n else (part[:, :0], part[:, :0].long())
        if self.comm.world == 1:
            return LogprobStats(lse[:, 0], values, ids)
        packed = torch.cat([lse.double(), values.double(), (ids + self.start).double()], dim=-1)
        parts = self.comm.all_gather(packed)  # [world, N, 1 + 2n]
        if self.comm.rank != 0:
            return None
        lse = torch.logsumexp(parts[..., 0], dim=0).float()
        values = parts[..., 1:1 + n].permute(1, 0, 2).reshape(local.shape[0], -1)
        ids = parts[..., 1 + n:].permute(1, 0, 2).reshape(local.shape[0], -1)
        top = torch.topk(values, n, dim=-1)  # values are distinct per id; equal values keep rank order
        return LogprobStats(lse, top.values.float(), ids.gather(1, top.indices).long())
