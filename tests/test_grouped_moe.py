"""The grouped-GEMM MoE kernels for prefill (runtime/kernels/grouped_moe.py) against the experts
computed here in float64 from the same weights: under Triton's interpreter on the CPU (float32, small
shapes, experts with no tokens and groups longer than a block), and compiled on a GPU in bf16 at a
real TP=8 expert shard (256 experts of 3072 x 192) for prefill-sized T.

Tolerances: float32 (interpreter, IEEE dots) against float64: 1e-5 of the output's scale; bf16 on
the GPU against float64 from the same bf16 inputs: 2e-2 of the scale (a is rounded to bf16 once
before the down GEMM; accumulation is float32).
"""
import importlib.util

import pytest
import torch

from tests.reference import run_interpreted
from tests.test_moe_kernel import reference

if importlib.util.find_spec("triton") is None:
    pytest.skip("the triton package is not installed", allow_module_level=True)


def case(T, k, E, H, inter, device, dtype, seed=0, skew=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(device, dtype)
    w13 = (torch.randn(E, 2 * inter, H, generator=g) * H ** -0.5).to(device, dtype)
    w2 = (torch.randn(E, H, inter, generator=g) * inter ** -0.5).to(device, dtype)
    if skew:  # most tokens on a few experts: groups of several blocks, and experts with none
        experts = torch.stack([torch.randperm(min(E, k + 2), generator=g)[:k] for _ in range(T)])
    else:
        experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    weights[0, -1] = 0.0  # an expert on another rank (expert parallelism) contributes nothing
    return x, experts.to(device), weights.to(device), w13, w2


def check_interpreted() -> None:
    from runtime.kernels.grouped_moe import Tiles, align_by_expert, grouped_moe

    experts = torch.tensor([[2, 0], [2, 1], [2, 0]])
    pairs, owner = align_by_expert(experts, 4, 4)
    assert pairs.tolist()[:12] == [1, 5, 6, 6, 3, 6, 6, 6, 0, 2, 4, 6] and owner.tolist()[:4] == [0, 1, 2, -1]
    # several chunks of pairs, experts not a power of two: against a stable sort by expert
    g = torch.Generator().manual_seed(1)
    experts = torch.randint(0, 12, (300, 4), generator=g)
    experts[:40] = 5  # one expert's group over several blocks
    pairs, owner = align_by_expert(experts, 12, 8)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    got = [p for p in pairs.tolist() if p < flat.numel()]
    assert got == order.tolist()
    counts = torch.bincount(flat, minlength=12)
    want_owner = [e for e in range(12) for _ in range(-(-int(counts[e]) // 8))]
    assert owner.tolist()[:len(want_owner)] == want_owner and set(owner.tolist()[len(want_owner):]) <= {-1}
    rows = torch.nonzero(pairs < flat.numel()).flatten()
    assert all(owner[r // 8] == flat[pairs[r]] for r in rows.tolist())  # every pair in a block of its expert
    for T, k, E, H, inter, skew, block in [(5, 2, 8, 96, 40, False, 16), (37, 3, 8, 72, 48, True, 16)]:
        args = case(T, k, E, H, inter, "cpu", torch.float32, skew=skew)
        out = grouped_moe(*args, tiles=Tiles(block=block))
        ref = reference(*args)
        torch.testing.assert_close(out.double(), ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
        print(f"T={T} k={k} E={E} H={H} I={inter}: ok")


def test_interpreted_kernels_match_reference():
    assert run_interpreted("test_grouped_moe").count(": ok") == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("T", [64, 1000])
def test_compiled_kernels_match_reference_on_gpu(T):
    from runtime.kernels.grouped_moe import grouped_moe

    x, experts, weights, w13, w2 = case(T, 8, 256, 3072, 192, "cuda", torch.bfloat16)
    out = grouped_moe(x, experts, weights, w13, w2)
    sample = torch.randperm(T)[:16]  # the float64 reference loops over tokens: check a sample
    ref = reference(x[sample], experts[sample], weights[sample], w13, w2)
    torch.testing.assert_close(out[sample].double(), ref, atol=2e-2 * float(ref.abs().max()), rtol=0)
