"""Named ranges around what launches the kernels of an eager step: each piece the torch backend runs
(the manifest's subgraphs), the attention op and its KV writes, and the MoE kernels' routing and
experts. A profile of the step then groups kernel time by the range that launched it
(bench/prefill_parts.py). Off unless `recording()` turns them on: otherwise `span` returns one
shared no-op context (a global read per call), so the runtime pays nothing measurable."""
from __future__ import annotations

import contextlib

import torch

PIECE = "piece:"  # + the subgraph's piece (export/layout.py): embed, attn, post, head, ...
ATTENTION = "attention"  # the attention step (runtime/executor.py)
KV_WRITE = "kv_write"  # the new keys and values into the paged cache (runtime/attention.py)
ROUTER = "router"  # the MoE kernels' gate and top-k (runtime/piece_kernels.py; its fused kernel: + add, norm)
EXPERTS = "experts"  # the MoE kernels' experts, with their sort/align of the pairs

_NULL = contextlib.nullcontext()
_enabled = False


def span(name: str):
    """A torch.profiler.record_function range named `name` while recording, else a no-op."""
    return torch.profiler.record_function(name) if _enabled else _NULL


@contextlib.contextmanager
def recording():
    """The ranges on for the duration (a benchmark's profile); off again after."""
    global _enabled
    _enabled = True
    try:
        yield
    finally:
        _enabled = False
