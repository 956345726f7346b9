"""Continuous batching with chunked prefill: every step runs, in one packed batch and within the
step's token budget, first every running sequence's next token (decodes), then the next chunk of
each running prompt that is not computed yet, then new prompts, first come first served, each as
much of it as the budget has left (vLLM's default order). So a prompt longer than a step runs over
several steps, beside the decodes. A prompt's blocks are all taken when it is admitted. When the
KV cache is full, the newest running sequence is preempted: its blocks are freed and it is
recomputed later (the prefix cache usually finds most of its blocks again, also those of a prompt
preempted between its chunks).

With async scheduling (runtime/llm_engine.py) a sequence may have a pending token: sampled by the
step in flight, not yet known to the host. It counts in len(seq), so the sequence decodes it next
(its id comes from the device). A sequence whose pending token will end it by length is not
scheduled again, and a preempted one is not readmitted until its pending token is known (its
prompt is recomputed from `tokens`)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new: list[int]  # tokens each sequence computes this step (a prompt chunk, or 1)

    def completes(self, i: int) -> bool:
        """Whether sequence i has all its tokens computed after this step (so it samples one)."""
        return self.seqs[i].num_computed + self.num_new[i] == len(self.seqs[i])


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int | None = None):
        self.blocks = blocks
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = Status.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        seqs, num_new = [], []
        budget = self.max_num_batched_tokens
        # Running sequences: decodes first, then the prompts still being prefilled, oldest first.
        decoding = [s for s in self.running if len(s) - s.num_computed == 1]
        prefilling = [s for s in self.running if len(s) - s.num_computed > 1]
        for seq in decoding + prefilling:
            if seq.status is not Status.RUNNING:  # preempted below to make room for an older one
                continue
            if seq.pending and self._ends_at_pending(seq):  # its step in flight gave its last token
                continue
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING or budget < 1:
                continue
            self.blocks.append(seq)
            seqs.append(seq)
            num_new.append(min(len(seq) - seq.num_computed, budget))
            budget -= num_new[-1]
        # Then waiting prompts, first come first served, while blocks and budget last.
        while self.waiting and len(self.running) < self.max_num_seqs and budget >= 1:
            seq = self.waiting[0]
            if seq.pending or not self.blocks.can_allocate(seq):  # pending: preempted with a step in flight
                break
            self.blocks.allocate(seq)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            num_new.append(min(len(seq) - seq.num_computed, budget))
            budget -= num_new[-1]
        return ScheduledBatch(seqs, num_new)

    def _ends_at_pending(self, seq: Sequence) -> bool:
        """Whether the sequence's pending tokens reach its max_tokens or the longest sequence."""
        return (len(seq.output) + seq.pending >= seq.params.max_tokens
                or (self.max_model_len is not None and len(seq) >= self.max_model_len))

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free_seq(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
