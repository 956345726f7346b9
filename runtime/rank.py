"""One tensor-parallel rank's share of a run: its backend, its KV cache (its KV heads only) and the
step executor over them. Rank 0's engine and the other ranks' serve loops are built the same way,
so every rank computes the same block count from the same config and block tables mean the same
everywhere."""
from __future__ import annotations

from export.manifest import Manifest

from .backends import make_backend
from .block_manager import BlockManager
from .config import EngineConfig
from .executor import DecodeSettings, PrefillSettings, StepExecutor
from .kv_cache import KVCache, bytes_per_block


def uses_decode_buckets(c: EngineConfig, device_type: str) -> bool:
    return c.decode_buckets if c.decode_buckets is not None else device_type == "cuda"


def kv_cache_bytes(manifest: Manifest, c: EngineConfig, device: str) -> float:
    """--kv-cache-gb, or with --gpu-memory-utilization what the memory plan leaves on the tightest
    rank (every rank holds the same number of blocks)."""
    if not c.gpu_memory_utilization:
        return c.kv_cache_gb * 2**30
    from engines.memory_plan import GB, plan

    if c.gpu_memory_gb:
        gpu = c.gpu_memory_gb * GB
    else:
        import torch
        gpu = torch.cuda.get_device_properties(torch.device(device)).total_memory
    ranks = plan(manifest.config, manifest.tp, gpu, c.gpu_memory_utilization,
                 c.max_num_batched_tokens or manifest.max_tokens, c.max_num_seqs, manifest.moe,
                 manifest.expert_split)
    left = min(r.kv_cache for r in ranks)
    if left <= 0:
        r = ranks[0]
        raise ValueError(f"the memory plan leaves no KV cache: {(r.weights + r.scratch + r.reserve) / GB:.1f} GB of "
                         f"weights, scratch and reserve against {r.budget / GB:.1f} GB; lower --max-num-batched-tokens "
                         "or raise --gpu-memory-utilization (python -m engines.memory_plan shows the table)")
    return left


def build_rank(manifest: Manifest, c: EngineConfig, rank: int, comm=None, backend=None) -> StepExecutor:
    """The rank's executor; `backend` may be given (benchmarks pass random weights made on the GPU)."""
    cfg = manifest.config
    device = c.device
    if device.startswith("cuda") and ":" not in device and manifest.tp > 1:
        device = f"cuda:{rank}"
    if device.startswith("cuda:"):
        import torch
        # The current device, not only the tensors' one: CUDA graphs capture on the current stream and
        # Triton launches on the current device, so `--device cuda:1` must make cuda:1 current.
        torch.cuda.set_device(torch.device(device))
    backend = backend or make_backend(c.backend, manifest, rank, device, c.dtype, c.engines)
    kv_heads = cfg.num_key_value_heads // manifest.tp
    per_block = bytes_per_block(cfg.num_hidden_layers, c.block_size, kv_heads, cfg.head_dim, backend.dtype)
    num_blocks = c.num_blocks or max(1, int(kv_cache_bytes(manifest, c, device)) // per_block)
    kv = KVCache(cfg.num_hidden_layers, num_blocks, c.block_size, kv_heads, cfg.head_dim, backend.dtype,
                 backend.device)
    decode = prefill = None
    if uses_decode_buckets(c, backend.device.type):
        context = min(c.graph_max_context, c.max_model_len or cfg.max_position_embeddings)
        pad = BlockManager.padding_block_of(num_blocks)
        graphs = c.cuda_graphs and backend.device.type == "cuda"
        decode = DecodeSettings(c.max_num_seqs, -(-context // c.block_size), pad, graphs)
        if graphs and c.prefill_graphs and getattr(backend, "captures_prefill", False):
            longest = c.max_model_len or cfg.max_position_embeddings
            prefill = PrefillSettings(c.max_num_batched_tokens or manifest.max_tokens, -(-longest // c.block_size),
                                      pad)
    return StepExecutor(manifest, backend, kv, rank, comm, decode, prefill)
