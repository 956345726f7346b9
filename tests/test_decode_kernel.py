"""The Triton paged-decode kernel (runtime/kernels/paged_decode.py) against an independent float64 attention
written here. On the CPU it runs under Triton's interpreter (TRITON_INTERPRET=1: the same kernel
code, executed with numpy; float32 only) and on a GPU (`make test-gpu`) compiled, in bfloat16 at the
real model's head shapes, eagerly and replayed from a CUDA graph.

Tolerances: float32 inputs 1e-5 (accumulation order only); bfloat16 inputs 2e-2 absolute on outputs
of magnitude <= ~1, since the kernel, like flash attention, rounds the softmax weights to bf16 before
the P @ V product (relative error ~2^-8 per term).
"""
import importlib.util

import pytest
import torch

from tests.reference import run_interpreted

if importlib.util.find_spec("triton") is None:
    pytest.skip("the triton package is not installed", allow_module_level=True)
CASES = [
    (6, 1, 32, torch.float32, 1e-5),   # the real model's 6:1 group per KV head (TP=8), small head dim
    (8, 2, 64, torch.float32, 1e-5),
    (16, 2, 32, torch.float32, 1e-5),
]  # no bfloat16 here: Triton 3.9's interpreter computes tl.dot on bf16 wrongly (seen: errors of 1e10
#    on a plain 16x16 product); bf16 is checked compiled, on the GPU


def reference(q, k_cache, v_cache, tables, lens, scale):
    B, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = []
    for b in range(B):
        L = int(lens[b])
        slots = (tables[b][:, None] * bs + torch.arange(bs, device=tables.device)).flatten()[:L]
        k = k_cache.reshape(-1, Hkv, D)[slots].double().repeat_interleave(Hq // Hkv, 1)   # [L, Hq, D]
        v = v_cache.reshape(-1, Hkv, D)[slots].double().repeat_interleave(Hq // Hkv, 1)
        w = (torch.einsum("hd,lhd->hl", q[b].double(), k) * scale).softmax(-1)
        out.append(torch.einsum("hl,lhd->hd", w, v).reshape(-1))
    return torch.stack(out)


def case(B, Hq, Hkv, D, lens, max_blocks, dtype, device, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    nb = B * max_blocks + 3
    k = torch.randn(nb, bs, Hkv, D, generator=g).to(device, dtype)
    v = torch.randn(nb, bs, Hkv, D, generator=g).to(device, dtype)
    q = torch.randn(B, Hq, D, generator=g).to(device, dtype)
    tables = torch.randperm(nb, generator=g)[:B * max_blocks].view(B, max_blocks).to(device)  # scattered blocks
    return q, k, v, tables, torch.tensor(lens, device=device)


def check_interpreted() -> None:
    """Run in a process started with TRITON_INTERPRET=1 (it must be set before triton is imported)."""
    from runtime.kernels import paged_decode as decode_kernel

    # one token, a partial block, exactly one partition, several partitions with a partial last one
    lens = [1, 21, 64, 150]
    for Hq, Hkv, D, dtype, tol in CASES:
        q, k, v, tables, lens_t = case(len(lens), Hq, Hkv, D, lens, max_blocks=12, dtype=dtype, device="cpu")
        out = decode_kernel.paged_decode(q, k, v, tables, lens_t, 0.125, partition=64)
        assert out.dtype == dtype and out.shape == (len(lens), Hq * D)
        torch.testing.assert_close(out.double(), reference(q, k, v, tables, lens_t, 0.125), atol=tol, rtol=0)
        print(f"Hq={Hq} Hkv={Hkv} D={D} {dtype}: ok")


def test_interpreted_kernel_matches_reference():
    assert run_interpreted("test_decode_kernel").count(": ok") == len(CASES)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("Hq,Hkv", [(48, 8), (6, 1)])  # MiniMax-M2.5 at TP=1 and at TP=8
def test_compiled_kernel_matches_reference_on_gpu(Hq, Hkv):
    from runtime.kernels import paged_decode as k_mod
    lens = [1, 17, 511, 512, 513, 4000, 8192]
    q, k, v, tables, lens_t = case(len(lens), Hq, Hkv, 128, lens, max_blocks=512, dtype=torch.bfloat16,
                                   device="cuda")
    out = k_mod.paged_decode(q, k, v, tables, lens_t, 128 ** -0.5)
    torch.testing.assert_close(out.double(), reference(q, k, v, tables, lens_t, 128 ** -0.5), atol=2e-2, rtol=0)
    # and in a CUDA graph: the grid depends only on shapes, so replay with new lengths is right
    static_lens = lens_t.clone()
    graph = torch.cuda.CUDAGraph()
    k_mod.paged_decode(q, k, v, tables, static_lens, 128 ** -0.5)
    with torch.cuda.graph(graph):
        captured = k_mod.paged_decode(q, k, v, tables, static_lens, 128 ** -0.5)
    static_lens.copy_(torch.tensor([8192, 1, 2, 3, 700, 64, 1000], device="cuda"))
    graph.replay()
    torch.testing.assert_close(captured.double(), reference(q, k, v, tables, static_lens, 128 ** -0.5),
                               atol=2e-2, rtol=0)
