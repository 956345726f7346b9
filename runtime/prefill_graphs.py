"""One sequence's prefill chunk on a GPU, padded to a fixed size and replayed from a CUDA graph.

A prefill chunk's kernels are few per layer but launched from Python (about 30 a layer), and at one
TP=8 rank's widths the host's launches took most of the time to first token (docs/BENCHMARKS.md,
prefill). A step that is one sequence's chunk of q > 1 new tokens runs at the smallest bucket >= q
(powers of two from 16, and the step size limit): the extra rows are padding at the end of the
chunk (token 0, writing its K/V to the reserved padding block). The padding rows' queries come after
every real one, so causality keeps them out of the real rows' attention; their keys past the
sequence read whatever block 0 holds (the table row is zero there), which only padding rows see; the
head reads the last real row. Each (bucket, key split) is captured once on static buffers: every
kernel reads the context length and the block table from the device, and the one host-side choice
a context makes, the attention's split of the keys over programs (kernels/paged_prefill.py
key_split), is part of the graph's key. With graphs off the same padded step runs eagerly, so replay
and eager compute the same thing. Steps of several sequences (batched prompts, prefills mixed with
decodes) run eagerly, unpadded.
"""
from __future__ import annotations

import torch

from .attention import AttentionMetadata
from .cuda_graphs import capture
from .host_copy import copy_in

MIN_BUCKET = 16


class PrefillGraphs:
    def __init__(self, executor, max_tokens: int, max_blocks_per_seq: int, pad_block: int,
                 use_graphs: bool = True):
        """max_tokens: the most tokens in a step; max_blocks_per_seq: the longest sequence's blocks."""
        self.ex = executor
        sizes = [MIN_BUCKET << i for i in range(max(0, (max_tokens // MIN_BUCKET).bit_length()))]
        self.buckets = sorted({b for b in sizes if b < max_tokens} | {max_tokens})
        bs = executor.kv.block_size
        self.max_blocks = max_blocks_per_seq
        self.pad_slot = pad_block * bs
        self.use_graphs = use_graphs
        cfg, tp = executor.manifest.config, executor.manifest.tp
        self.heads = (cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp)
        dev = executor.backend.device
        top = self.buckets[-1]
        i64 = lambda n: torch.zeros(n, dtype=torch.int64, device=dev)  # noqa: E731
        i32 = lambda *s: torch.zeros(*s, dtype=torch.int32, device=dev)  # noqa: E731
        # One set of buffers for every graph (they never run at once). The table row is wider than the
        # longest sequence by a bucket, so the padding rows' keys stay inside it.
        self.ids, self.positions, self.slots, self.rows = i64(top), i64(top), i64(top), i64(1)
        self.tables = i32(1, max_blocks_per_seq + -(-top // bs))
        self.starts, self.q_lens, self.ctx = i32(1), i32(1), i32(1)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.steps = 0  # chunks run this way (replayed or, graphs off, eagerly padded)

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def can_run(self, q_lens: list[int], table_width: int) -> bool:
        """table_width: the step's block table row."""
        return (len(q_lens) == 1 and q_lens[0] > 1 and self.bucket(q_lens[0]) is not None
                and table_width <= self.max_blocks)

    def key(self, q: int, context: int) -> tuple[int, int]:
        """(bucket, the attention's split of the keys) of a chunk of q tokens ending at `context`."""
        b = self.bucket(q)
        split = 1
        if self.ex.backend.device.type == "cuda":
            from .kernels.paged_prefill import key_split

            split = key_split(*self.heads, b, 1, context + b - q, self.ex.backend.dtype, self.ex.backend.device)
        return b, split

    def run(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, context: int,
            block_tables: torch.Tensor) -> torch.Tensor | None:
        """One sequence's chunk: ids/positions/slots [q] (host), `context` its tokens in the cache after
        this chunk, block_tables [1, width] on the device -> the last row's logits (this rank's slice)."""
        q = ids.numel()
        self.steps += 1
        key = self.key(q, context)
        b = key[0]
        pad = b - q
        z = torch.zeros(pad, dtype=torch.int64, device=ids.device)
        zh = torch.zeros(pad, dtype=torch.int64)
        copy_in(self.ids[:b], torch.cat([ids.to(torch.int64), z]))  # ids may be on the device (carried)
        copy_in(self.positions[:b], torch.cat([positions.to(torch.int64), zh]))
        copy_in(self.slots[:b], torch.cat([slots.to(torch.int64), zh + self.pad_slot]))
        self.rows.fill_(q - 1)
        self.q_lens.fill_(b)
        self.ctx.fill_(context + pad)
        self.tables.zero_()
        self.tables[:, :block_tables.shape[1]].copy_(block_tables)
        if not self.use_graphs:
            return self._forward(key, context + pad)
        if key not in self.graphs:
            self.graphs[key], self.outputs[key] = capture(lambda: self._forward(key, context + pad),
                                                          self.ex.backend.device, self.ex.graph_pool())
        self.graphs[key].replay()
        return self.outputs[key]

    def _forward(self, key: tuple[int, int], context: int):
        b, split = key
        # context_lens: the portable attention's (graphs off, CPU); the GPU kernel reads self.ctx
        meta = AttentionMetadata(self.slots[:b], [b], [context], self.tables,
                                 _on_device=(self.tables, self.starts, self.q_lens, self.ctx), key_split=split)
        return self.ex.forward(self.ids[:b], self.positions[:b], self.rows, meta=meta,
                               plan=self.ex.dispatch.plan(b, False))

    def clear(self) -> None:
        self.graphs.clear()
        self.outputs.clear()
