"""Decode steps on a GPU at fixed batch sizes ("buckets"), replayed from CUDA graphs.

A decode step (one new token per sequence) of B sequences runs at the smallest bucket >= B: the
extra rows are padding (token 0, writing its K/V to a reserved padding block, attending to one key).
Each bucket's step (every subgraph, the attention, and with tensor parallelism the NCCL all-reduces)
is captured once into a CUDA graph on static buffers and replayed after copying the step's inputs in.
With graphs off, the same padded step runs eagerly, so replay and eager compute the same thing with
the same kernels. Steps with prefills, or larger than the largest bucket, run eagerly unpadded.
A backend that needs per-bucket state to be captured (the TensorRT one: a context per bucket, shapes
set before capture) gives `capture_scope(bucket)`, entered around the bucket's warm-up and capture.
"""
from __future__ import annotations

import contextlib

import torch

from .host_copy import copy_in, set_rows

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class DecodeGraphs:
    def __init__(self, executor, max_num_seqs: int, max_blocks_per_seq: int, pad_block: int,
                 use_graphs: bool = True):
        self.ex = executor
        self.buckets = sorted({b for b in BUCKETS if b < max_num_seqs} | {max_num_seqs})
        self.max_blocks = max_blocks_per_seq
        self.pad_slot = pad_block * executor.kv.block_size
        self.use_graphs = use_graphs
        self.static: dict[int, dict[str, torch.Tensor]] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor | None] = {}

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def can_run(self, q_lens: list[int], table_width: int) -> bool:
        """table_width: the step's longest block table."""
        return (all(q == 1 for q in q_lens) and self.bucket(len(q_lens)) is not None
                and table_width <= self.max_blocks)

    def _buffers(self, b: int) -> dict[str, torch.Tensor]:
        if b not in self.static:
            dev = self.ex.backend.device
            z = lambda *s: torch.zeros(*s, dtype=torch.int64, device=dev)  # noqa: E731
            inputs = z(4 * b)  # positions, slots, ctx, ids: views of one buffer, filled by one copy
            self.static[b] = {"inputs": inputs, "positions": inputs[:b], "slots": inputs[b:2 * b],
                              "ctx": inputs[2 * b:3 * b], "ids": inputs[3 * b:], "tables": z(b, self.max_blocks),
                              "rows": torch.arange(b, device=dev)}
        return self.static[b]

    def run(self, ids, positions, slots, q_lens, context_lens, block_tables: torch.Tensor,
            carried=None) -> torch.Tensor | None:
        """block_tables: [n, width] on the device (the executor's rows, runtime/block_tables.py);
        carried: an executor.Carried whose ids (on the device) replace those rows of `ids` (async
        scheduling)."""
        n = len(q_lens)
        b = self.bucket(n)
        s = self._buffers(b)
        pad = b - n
        # one copy of the host's inputs (pinned: it does not wait for a step still running), then the
        # ids the step carries on the device (async scheduling) written over theirs
        packed = torch.cat([positions, torch.zeros(pad, dtype=torch.int64), slots,
                            torch.full((pad,), self.pad_slot, dtype=torch.int64),
                            torch.tensor(list(context_lens) + [1] * pad, dtype=torch.int64),
                            ids, torch.zeros(pad, dtype=torch.int64)])
        copy_in(s["inputs"], packed)
        if carried is not None:
            set_rows(s["ids"], carried.rows, carried.tokens)
        # on the device: the step's rows, zero past each table and in the padding rows
        s["tables"].zero_()
        s["tables"][:n, :block_tables.shape[1]].copy_(block_tables)
        if not self.use_graphs:
            out = self._forward(s)
        else:
            if b not in self.graphs:
                self._capture(b, s)
            self.graphs[b].replay()
            out = self.outputs[b]
        return None if out is None else out[:n]

    def _forward(self, s):
        return self.ex.forward(s["ids"], s["positions"], s["rows"],
                               decode=(s["slots"], s["tables"], s["ctx"]))

    def _capture(self, b: int, s) -> None:
        scope = getattr(self.ex.backend, "capture_scope", None)
        with scope(b) if scope is not None else contextlib.nullcontext():
            self._warm_up_and_capture(b, s)

    def clear(self) -> None:
        self.graphs.clear()
        self.outputs.clear()

    def _warm_up_and_capture(self, b: int, s) -> None:
        self.graphs[b], self.outputs[b] = capture(lambda: self._forward(s), self.ex.backend.device,
                                                  self.ex.graph_pool())


class CaptureError(RuntimeError):
    """A step's capture failed (its warm-up ran): the step can still run eagerly. PyTorch ends a
    capture's hold on its memory pool only when the capture succeeds, so the caching allocator keeps
    the pool listed as capturing: the next capture into it fails ("already recording to mempool",
    seen on an H200), and while it is listed the allocator skips recycling blocks freed with uses on
    other streams. The executor turns its graphs off (StepExecutor._without_graphs) and the log asks
    for a restart."""


def capture(forward, device: torch.device, pool) -> tuple[torch.cuda.CUDAGraph, object]:
    """`forward()` warmed up once on a side stream (lazy initialisations and JIT compiles must not
    happen during capture), then captured into a graph on the memory pool `pool`, which every graph
    of the executor shares (they never run at once): the graph and its output. Only this thread's
    CUDA calls are checked during capture (other threads of a server may use CUDA meanwhile); a
    failure of the capture itself raises CaptureError."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream(device)
    try:
        with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
            out = forward()
    except (RuntimeError, torch.OutOfMemoryError) as e:
        torch.cuda.set_stream(current)  # a capture that fails to end leaves its own stream current
        # the end of an invalidated capture reports only that; the op that invalidated it came before
        first = e.__context__
        raise CaptureError(f"{e}" + (f" (first: {type(first).__name__}: {first})" if first else "")) from e
    return g, out
