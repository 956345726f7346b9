"""The paged prefill-attention kernel (runtime/kernels/paged_prefill.py) against SDPA on a contiguous
copy of each sequence's keys (the runtime's portable op, runtime/attention.py's sdpa_prefill): under Triton's CPU
interpreter in float32, and compiled on a GPU in bf16 at the real model's heads (48 query, 8 KV, 128).

Packed sequences: a chunk after cached context, a whole prompt, a single token; block tables
scattered over the cache; chunk lengths that are not multiples of the tile.
Tolerances: float32 1e-5 (online softmax vs one softmax, float32 both); bf16 on the GPU 2e-2 of the
output's scale (bf16 inputs to both, the kernel's P rounded to bf16 before the PV product).
"""
import importlib.util

import pytest
import torch

from runtime.attention import AttentionMetadata, sdpa_prefill, write_kv
from tests.reference import run_interpreted

if importlib.util.find_spec("triton") is None:
    pytest.skip("the triton package is not installed", allow_module_level=True)


def case(hq, hkv, d, bs, q_lens, ctx_lens, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = sum(-(-c // bs) for c in ctx_lens) + 3
    k_cache = torch.randn(blocks, bs, hkv, d, generator=g).to(device, dtype)
    v_cache = torch.randn(blocks, bs, hkv, d, generator=g).to(device, dtype)
    perm = torch.randperm(blocks, generator=g).tolist()
    tables, used = [], 0
    for c in ctx_lens:
        n = -(-c // bs)
        tables.append(perm[used:used + n])
        used += n
    T = sum(q_lens)
    q = torch.randn(T, hq, d, generator=g).to(device, dtype)
    k = torch.randn(T, hkv, d, generator=g).to(device, dtype)
    v = torch.randn(T, hkv, d, generator=g).to(device, dtype)
    slots = []
    for ql, c, table in zip(q_lens, ctx_lens, tables):
        slots += [table[p // bs] * bs + p % bs for p in range(c - ql, c)]
    meta = AttentionMetadata(torch.tensor(slots, device=device), q_lens, ctx_lens, tables)
    return q, k, v, k_cache, v_cache, meta


def run_both(q, k, v, k_cache, v_cache, meta, scale, **kw):
    from runtime.kernels.paged_prefill import paged_prefill

    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    ref = sdpa_prefill(q, k_cache, v_cache, meta, scale)
    out = paged_prefill(q, k_cache, v_cache, *meta.on_device(q.device), max(meta.q_lens), scale,
                        max_ctx=max(meta.context_lens), **kw)
    return out, ref


def check_interpreted() -> None:
    # grouped-query (2 and 6 query heads a KV head: 6 does not divide the tile's rows), the keys whole
    # and split over 3 programs (shares that end mid-tile, and empty shares for short sequences)
    for hq, hkv, d, bs, q_lens, ctx_lens in [(4, 2, 32, 4, [37, 70, 1], [100, 70, 9]), (6, 1, 16, 8, [5], [5]),
                                             (6, 1, 16, 8, [20, 3], [300, 3])]:
        for split in (1, 3):
            out, ref = run_both(*case(hq, hkv, d, bs, q_lens, ctx_lens, "cpu", torch.float32), d ** -0.5, split=split)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            print(f"q_lens={q_lens} ctx={ctx_lens} split={split}: ok")


def test_interpreted_kernel_matches_sdpa():
    assert run_interpreted("test_paged_prefill").count(": ok") == 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_compiled_kernel_matches_sdpa_on_gpu():
    q_lens, ctx_lens = [2048, 300, 1], [10000, 300, 4097]
    out, ref = run_both(*case(48, 8, 128, 16, q_lens, ctx_lens, "cuda", torch.bfloat16), 128 ** -0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2 * float(ref.abs().max()), rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_split_keys_match_sdpa_on_gpu():
    """One TP=8 rank's heads (6 query, 1 KV): few tiles over a long context, so the keys are split."""
    from runtime.kernels.paged_prefill import choose_split

    assert choose_split(26, 40000, torch.device("cuda")) > 1
    q_lens, ctx_lens = [200, 37], [40000, 9000]
    out, ref = run_both(*case(6, 1, 128, 16, q_lens, ctx_lens, "cuda", torch.bfloat16), 128 ** -0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2 * float(ref.abs().max()), rtol=0)
