"""Continuous batching: every step runs all running sequences' next token plus as many waiting
prompts as the limits allow, in one packed batch. When the KV cache is full, the newest running
sequence is preempted: its blocks are freed and it is recomputed later (prefix caching usually
finds most of its blocks again)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new: list[int]  # tokens each sequence computes this step (prompt remainder, or 1)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
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
        # Running sequences first: each needs room for its newest token.
        for seq in list(self.running):
            if seq not in self.running:  # preempted below to make room for an older one
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
            num_new.append(len(seq) - seq.num_computed)
            budget -= num_new[-1]
        # Then waiting prompts, first come first served, while they fit.
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.blocks.allocate(seq)
            if len(seq) - seq.num_computed > budget:
                self.blocks.free_seq(seq)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            num_new.append(len(seq) - seq.num_computed)
            budget -= num_new[-1]
        return ScheduledBatch(seqs, num_new)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free_seq(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
