"""The attention runtime op: write the step's new K/V into the paged cache by slot, then causal
attention of every sequence's new queries over all its cached keys, through its block table.
A batch may mix prefills (many new tokens) and decodes (one). This is the portable PyTorch version
(CPU, and GPU fallback)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import profile_ranges


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor   # [T] int64: cache slot (block * block_size + offset) of each new token
    q_lens: list[int]            # new tokens per sequence, in packing order
    context_lens: list[int]      # tokens in the cache per sequence after this step's writes
    # per sequence, zero-padded: a tensor [S, M] (what the executor runs with), or lists (tests, benchmarks);
    # as rank 0 sends a step, the rows of the ranks' device tables (runtime/block_tables.py TableDelta)
    block_tables: torch.Tensor | list[list[int]] | object
    _on_device: tuple | None = None
    # the GPU prefill kernel's split of the keys, fixed (a CUDA-graph chunk, runtime/prefill_graphs.py);
    # None: chosen from the longest context
    key_split: int | None = None

    def on_device(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block tables padded [S, M], first query row, query count, context length per sequence) as
        int32 device tensors, for the GPU kernels: made once a step, shared by every layer."""
        if self._on_device is None:
            starts = [0]
            for n in self.q_lens[:-1]:
                starts.append(starts[-1] + n)
            tables = self.block_tables
            if isinstance(tables, torch.Tensor):
                tables = tables.to(device=device, dtype=torch.int32)
            else:
                width = max(len(t) for t in tables)
                tables = torch.tensor([list(t) + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                      device=device)
            self._on_device = (tables, *(torch.tensor(x, dtype=torch.int32, device=device) for x in (
                starts, self.q_lens, self.context_lens)))
        return self._on_device


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    with profile_ranges.span(profile_ranges.KV_WRITE):
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, Hq, d], k/v [T, Hkv, d] -> [T, Hq * d]. On a GPU the Triton kernel reads every sequence's
    keys in place through its block table; elsewhere each sequence's keys are copied out and SDPA
    runs on them."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    if q.is_cuda and (kernels := _kernels()) is not None:
        tables, starts, q_lens, ctx = meta.on_device(q.device)
        if max(meta.q_lens) == 1:  # decode steps run eagerly (contexts past the CUDA graphs' limit)
            return kernels.paged_decode(q, k_cache, v_cache, tables, ctx, scale)
        return kernels.paged_prefill(q, k_cache, v_cache, tables, starts, q_lens, ctx, max(meta.q_lens), scale,
                                     max_ctx=max(meta.context_lens), split=meta.key_split)
    return sdpa_prefill(q, k_cache, v_cache, meta, scale)


def sdpa_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float) -> torch.Tensor:
    """The portable version: each sequence's keys copied out of the cache, SDPA with a causal mask."""
    block_size = k_cache.shape[1]
    out, start = [], 0
    for q_len, ctx, table in zip(meta.q_lens, meta.context_lens, meta.block_tables):
        blocks = torch.as_tensor(table[: -(-ctx // block_size)], device=k_cache.device)
        keys = k_cache.index_select(0, blocks).flatten(0, 1)[:ctx]       # [ctx, Hkv, d]
        values = v_cache.index_select(0, blocks).flatten(0, 1)[:ctx]
        qs = q[start:start + q_len]
        # query j sits at position ctx - q_len + j and sees keys 0..that position
        mask = torch.ones(q_len, ctx, dtype=torch.bool, device=q.device).tril(ctx - q_len)
        o = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], keys.transpose(0, 1)[None].to(qs.dtype),
                                           values.transpose(0, 1)[None].to(qs.dtype), attn_mask=mask,
                                           scale=scale, enable_gqa=True)
        out.append(o[0].transpose(0, 1).reshape(q_len, -1))
        start += q_len
    return torch.cat(out)


@functools.cache
def _kernels():
    """The Triton attention kernels (`.paged_decode`, `.paged_prefill`), where the triton package is."""
    try:
        from .kernels import paged_decode, paged_prefill
    except ImportError:
        return None
    return SimpleNamespace(paged_decode=paged_decode.paged_decode, paged_prefill=paged_prefill.paged_prefill)


def paged_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode (one new token per sequence) with every input a tensor of fixed shape, so that the step
    can be captured in a CUDA graph. q [B, Hq, d]; block_tables [B, M]; context_lens [B].
    On a GPU the Triton kernel reads only each sequence's own blocks; the
    PyTorch version below reads M blocks per sequence and masks past each context length."""
    write_kv(k_cache, v_cache, k, v, slot_mapping)
    if q.is_cuda and (kernels := _kernels()) is not None:
        return kernels.paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
    return sdpa_decode(q, k_cache, v_cache, block_tables, context_lens, scale)


def sdpa_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    B, M = block_tables.shape
    bs = k_cache.shape[1]
    keys = k_cache[block_tables].flatten(1, 2)      # [B, M*bs, Hkv, d]
    values = v_cache[block_tables].flatten(1, 2)
    mask = torch.arange(M * bs, device=q.device)[None, :] < context_lens[:, None]   # [B, L]
    o = F.scaled_dot_product_attention(q[:, :, None, :], keys.transpose(1, 2).to(q.dtype),
                                       values.transpose(1, 2).to(q.dtype), attn_mask=mask[:, None, None, :],
                                       scale=scale, enable_gqa=True)                  # [B, Hq, 1, d]
    return o.reshape(B, -1)
