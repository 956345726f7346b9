"""The toy writer's fast path (presets with `fast`): a real-scale checkpoint in minutes, not hours.

Every quantized weight is random FP8 bytes with two exponent bits fixed (one random byte per
weight and two bitwise operations: no float weight is made and quantized, a table lookup was 6x
slower): the sign and mantissa are uniform and the exponent is one of 4..7, so every value is
finite (an e4m3fn NaN needs exponent 15) and within 1/8..1.875 in magnitude, a 15x range as a
normal's bulk has. A random gain per 128x128 block in its scale gives W the std the slow path
gives (1/sqrt(cols), times the block gains). Every tensor has its own generator, seeded by (seed, its name): the bytes
do not depend on which process writes them or in what order. The shards are planned from the
shapes alone (the published order: the embedding, then each layer starting a shard, then the final
norm and the LM head) and written by worker processes side by side, one shard in memory per worker.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from . import fp8

SHARD_LIMIT = 2 << 30  # bytes per shard at most, as the slow path (and the published files)
# e4m3fn bits: sign, 4 exponent, 3 mantissa. Clearing the exponent's top bit and setting the next
# keeps exponents 4..7 (values 2^-3 .. 1.875).
FP8_CLEAR, FP8_SET = 0b1_0111_111, 0b0_0100_000
_VALUES = torch.from_numpy((np.arange(256, dtype=np.uint8) & FP8_CLEAR) | FP8_SET).view(torch.float8_e4m3fn).float()
FP8_STD = float(_VALUES.pow(2).mean().sqrt())  # the raw values' std (mean 0: the sign is uniform)


def tensor_shapes(spec, block) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor, in the published order; kind: embed, head, norm, fp8,
    scale, gate, bias."""
    H, I, E, V = spec.hidden_size, spec.intermediate_size, spec.num_local_experts, spec.vocab_size
    q, kv = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
    out = [("model.embed_tokens.weight", (V, H), "embed")]

    def quantized(name, rows, cols):
        out.append((name + ".weight", (rows, cols), "fp8"))
        out.append((name + ".weight_scale_inv", fp8.scale_grid(rows, cols, block), "scale"))

    for n in range(spec.num_hidden_layers):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (H,), "norm"), (p + "post_attention_layernorm.weight", (H,), "norm")]
        quantized(p + "self_attn.q_proj", q, H)
        quantized(p + "self_attn.k_proj", kv, H)
        quantized(p + "self_attn.v_proj", kv, H)
        quantized(p + "self_attn.o_proj", H, q)
        out += [(p + "self_attn.q_norm.weight", (q,), "norm"), (p + "self_attn.k_norm.weight", (kv,), "norm"),
                (p + "block_sparse_moe.gate.weight", (E, H), "gate"),
                (p + "block_sparse_moe.e_score_correction_bias", (E,), "bias")]
        for e in range(E):
            for w, (rows, cols) in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
                quantized(p + f"block_sparse_moe.experts.{e}.{w}", rows, cols)
    out += [("model.norm.weight", (H,), "norm"), ("lm_head.weight", (V, H), "head")]
    return out


_BYTES = {"embed": 2, "head": 2, "norm": 2, "fp8": 1, "scale": 4, "gate": 4, "bias": 4}


def plan_shards(shapes, limit: int = SHARD_LIMIT) -> list[list[tuple[str, tuple[int, ...], str]]]:
    """Tensors grouped into shards: a new shard at the first tensor of each layer and of the final
    norm, and whenever the next tensor would pass `limit`."""
    shards, size = [[]], 0
    for name, shape, kind in shapes:
        nbytes = _BYTES[kind] * int(np.prod(shape))
        starts = name.endswith(".input_layernorm.weight") or name == "model.norm.weight"
        # (a scale never leaves its weight: the split falls before the weight)
        if shards[-1] and (starts or kind != "scale" and size + nbytes > limit):
            shards.append([])
            size = 0
        shards[-1].append((name, shape, kind))
        size += nbytes
    return shards


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def make_tensor(seed: int, name: str, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    """Any tensor but a scale (made with its weight's width: make_shard)."""
    g = _rng(seed, name)
    n = int(np.prod(shape))
    if kind == "fp8":
        raw = np.frombuffer(bytearray(g.bytes(n)), np.uint8)
        np.bitwise_and(raw, FP8_CLEAR, out=raw)
        np.bitwise_or(raw, FP8_SET, out=raw)
        return torch.from_numpy(raw).view(torch.float8_e4m3fn).reshape(shape)
    normal = lambda std: torch.from_numpy(g.standard_normal(shape, np.float32) * np.float32(std))  # noqa: E731
    H = shape[-1]
    if kind == "norm":
        return (1.0 + normal(0.1)).to(torch.bfloat16)
    if kind == "embed":
        return normal(1.0).to(torch.bfloat16)
    if kind == "head":
        return normal(3.0 / H ** 0.5).to(torch.bfloat16)
    if kind == "gate":
        return normal(1.0 / H ** 0.5)
    return normal(0.1)  # bias


def make_shard(seed: int, entries) -> dict[str, torch.Tensor]:
    """A shard's tensors. A scale is the block's gain times 1/sqrt(cols) over the table's std, so the
    weight has the slow path's std (its weight is in the same shard: they are planned together)."""
    cols = {name.removesuffix(".weight"): shape[1] for name, shape, kind in entries if kind == "fp8"}
    out = {}
    for name, shape, kind in entries:
        if kind == "scale":
            gain = np.exp(0.5 * _rng(seed, name).standard_normal(shape, np.float32))
            out[name] = torch.from_numpy(gain / np.float32(cols[name.removesuffix(".weight_scale_inv")] ** 0.5
                                                           * FP8_STD))
        else:
            out[name] = make_tensor(seed, name, shape, kind)
    return out


def _write_one(path: str, seed: int, entries) -> str:
    torch.set_num_threads(1)
    save_file(make_shard(seed, entries), path, metadata={"format": "pt"})
    return path


def write_shards(d: Path, spec, seed: int, block, jobs: int | None = None) -> tuple[dict[str, str], int]:
    """Write every shard into `d` (named -of-N as published) with `jobs` processes; returns the
    weight map (tensor name -> shard file) and the tensors' total bytes."""
    shards = plan_shards(tensor_shapes(spec, block))
    names = [f"model-{i:05d}-of-{len(shards) + 1:05d}.safetensors" for i in range(len(shards))]
    jobs = jobs or min(len(shards), len(os.sched_getaffinity(0)))
    # Largest first, so the embedding and the LM head do not end up last, alone.
    order = sorted(range(len(shards)), key=lambda i: -sum(_BYTES[k] * int(np.prod(s)) for _, s, k in shards[i]))
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        for f in [pool.submit(_write_one, str(d / names[i]), seed, shards[i]) for i in order]:
            f.result()
    total = sum(_BYTES[k] * int(np.prod(s)) for entries in shards for _, s, k in entries)
    return {name: names[i] for i, entries in enumerate(shards) for name, _, _ in entries}, total
