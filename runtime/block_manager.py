"""Paged KV-cache bookkeeping: fixed-size blocks, a free list, reference counts, and prefix caching.

A full block is identified by a hash chained over every token before it, so two sequences that share
a prefix share its blocks, and a conversation's next turn finds the blocks of the earlier turns.
A freed block keeps its hash and contents until it is handed out again (least recently freed
first), so a cache hit can revive it. A block is hashed once, when it fills: the sequence keeps the
chained hash of its last registered block, so a step's work does not grow with the context.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from .sequence import Sequence


def chain_hash(prev: bytes | None, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(prev or b"", digest_size=16)
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))  # one C call a block, not one per token
    return h.digest()


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: bytes | None = None
    tokens: list[int] = field(default_factory=list)


class BlockManager:
    """reserve_padding: the last block is kept out of use for the padding rows of fixed-size decode
    steps (runtime/cuda_graphs.py writes their K/V there); `padding_block` names it."""

    def __init__(self, num_blocks: int, block_size: int, reserve_padding: bool = False):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block size must be a power of two, got {block_size}")
        usable = num_blocks - 1 if reserve_padding else num_blocks
        if usable < 1:
            raise ValueError("the KV cache needs at least one usable block")
        self.block_size = block_size
        self.padding_block = self.padding_block_of(num_blocks) if reserve_padding else None
        self.blocks = [Block(i) for i in range(usable)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(usable))
        self.by_hash: dict[bytes, int] = {}

    @staticmethod
    def padding_block_of(num_blocks: int) -> int:
        return num_blocks - 1

    @property
    def num_usable(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_free(self) -> Block:
        bid, _ = self.free.popitem(last=False)
        b = self.blocks[bid]
        if b.hash is not None and self.by_hash.get(b.hash) == bid:
            del self.by_hash[b.hash]  # evicted from the prefix cache
        b.hash, b.tokens, b.ref_count = None, [], 1
        return b

    def _cached_hits(self, seq: Sequence) -> list[int]:
        """Blocks of the prefix cache that hold this sequence's leading full blocks. The block holding
        the last token is never a hit: that token must be computed to get the next one's logits."""
        bs, tokens, hits, h = self.block_size, seq.tokens, [], None
        for i in range((len(tokens) - 1) // bs):
            chunk = tokens[i * bs:(i + 1) * bs]
            h = chain_hash(h, chunk)
            bid = self.by_hash.get(h)
            if bid is None or self.blocks[bid].tokens != chunk:
                break
            hits.append(bid)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_hits(seq)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self.blocks_needed(len(seq)) - len(hits) + revived <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached ones."""
        assert not seq.block_table
        hits = self._cached_hits(seq)
        for bid in hits:
            b = self.blocks[bid]
            if b.ref_count == 0:
                del self.free[bid]
            b.ref_count += 1
        seq.block_table = hits + [self._take_free().id for _ in range(self.blocks_needed(len(seq)) - len(hits))]
        seq.num_computed = seq.num_cached_prompt = len(hits) * self.block_size
        seq.num_hashed = len(hits)
        seq.last_hash = self.blocks[hits[-1]].hash if hits else None

    def can_append(self, seq: Sequence) -> bool:
        return self.blocks_needed(len(seq)) <= len(seq.block_table) or self.num_free > 0

    def append(self, seq: Sequence) -> None:
        """Make room for the sequence's newest token."""
        if self.blocks_needed(len(seq)) > len(seq.block_table):
            seq.block_table.append(self._take_free().id)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks that filled with computed tokens since the last call in the
        prefix cache (the ones before are registered already: their chain ends in seq.last_hash)."""
        bs, tokens = self.block_size, seq.tokens
        full = min(seq.num_computed, len(tokens)) // bs  # a block that ends in a pending token waits for it
        for i in range(seq.num_hashed, full):
            b = self.blocks[seq.block_table[i]]
            if b.hash is None:
                b.tokens = tokens[i * bs:(i + 1) * bs]
                b.hash = chain_hash(seq.last_hash, b.tokens)
                self.by_hash.setdefault(b.hash, b.id)
            seq.last_hash = b.hash
        seq.num_hashed = max(seq.num_hashed, full)

    def free_seq(self, seq: Sequence) -> None:
        for bid in reversed(seq.block_table):  # tail first: the head of a prefix stays cached longest
            b = self.blocks[bid]
            b.ref_count -= 1
            assert b.ref_count >= 0, f"block {bid} freed twice"
            if b.ref_count == 0:
                self.free[bid] = None
        seq.block_table = []
        seq.num_computed = seq.num_hashed = 0
        seq.last_hash = None

    def check(self, live: list[Sequence]) -> None:
        """Invariants (for tests): reference counts equal table memberships; free means unreferenced."""
        counts = [0] * len(self.blocks)
        for s in live:
            assert len(set(s.block_table)) == len(s.block_table), f"sequence {s.id} holds a block twice"
            for bid in s.block_table:
                counts[bid] += 1
        for b in self.blocks:
            assert b.ref_count == counts[b.id], f"block {b.id}: ref_count {b.ref_count}, held by {counts[b.id]}"
            assert (b.ref_count == 0) == (b.id in self.free), f"block {b.id}: free-list membership is wrong"
        for h, bid in self.by_hash.items():
            assert self.blocks[bid].hash == h
