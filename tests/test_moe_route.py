"""The MoE prologue kernel (runtime/kernels/moe_route.py: residual add + RMSNorm + float32 router +
biased top-k + renormalisation, one launch) against the model's own PyTorch ops (export/model.py: rms_norm,
Moe.route) on the same inputs: under Triton's interpreter on the CPU (small shapes), and compiled on
a GPU at MiniMax-M2.5's width (hidden 3072, 256 experts, top 8).

Tolerances, compiled: h exact (one rounding of a float32 sum, as PyTorch does); x within one bf16 ulp
(2**-7 relative: the float32 sum of squares is summed in another order, which can move the rounding);
the router's weights 1e-5 (float32 dot products in another order). Interpreted, Triton's CPU
interpreter truncates float32 to bf16 instead of rounding to nearest, at each of x's three roundings:
h and x within four ulps (2**-5), and the router is checked on the kernel's own x. The chosen experts exactly, for the tokens whose biased scores have
no near-ties (at least half of them).
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from tests.reference import run_interpreted

if importlib.util.find_spec("triton") is None:
    pytest.skip("the triton package is not installed", allow_module_level=True)


def case(T, H, E, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(T, H, generator=g).to(device, torch.bfloat16)
    b = torch.randn(T, H, generator=g).to(device, torch.bfloat16)
    norm = (1 + 0.1 * torch.randn(H, generator=g)).to(device, torch.bfloat16)
    gate = (torch.randn(E, H, generator=g) * H ** -0.5).to(device)
    bias = (0.1 * torch.randn(E, generator=g)).to(device)
    return a, b, norm, gate, bias


def torch_prologue(a, b, norm, gate, bias, k, eps=1e-6):
    from export.model import rms_norm

    h = a + b
    return (h,) + torch_route(rms_norm(h, norm, eps), gate, bias, k)


def torch_route(x, gate, bias, k):
    scores = torch.sigmoid(F.linear(x.float(), gate))
    biased = scores + bias
    _, idx = torch.topk(biased, k, dim=-1, sorted=True)
    w = torch.gather(scores, 1, idx)
    return x, idx, w / w.sum(-1, keepdim=True), biased


def clear_rows(biased, k, gap=1e-5):
    """Tokens whose k+1 largest biased scores are all more than `gap` apart: there, float32 sums in
    another order (errors ~1e-7) cannot change which experts are chosen or their order."""
    top = torch.topk(biased, k + 1, dim=-1).values
    return ((top[:, :-1] - top[:, 1:]) > gap).all(-1)


def check(T, H, E, k, device, compiled=True):
    from runtime.kernels.moe_route import route_top_k

    args = case(T, H, E, device, seed=T)
    want = torch_prologue(*args, k)
    h, x, idx, w = route_top_k(*args[:3], 1e-6, *args[3:], k)
    ulps = 2 ** -7 if compiled else 2 ** -5
    if compiled:
        assert torch.equal(h, want[0])
    else:
        torch.testing.assert_close(h.float(), want[0].float(), rtol=ulps, atol=0)
    torch.testing.assert_close(x.float(), want[1].float(), rtol=ulps, atol=0)
    if not compiled:  # the router on the kernel's own x: the interpreter's x rounding stays out of it
        want = (h,) + torch_route(x, *args[3:], k)
    clear = clear_rows(want[4], k)
    assert clear.sum() >= (T + 1) // 2, "too few tokens without near-ties to check: pick another seed"
    # sorted by biased score: the same ids in the same order
    assert torch.equal(idx[clear], want[2][clear])
    torch.testing.assert_close(w[clear], want[3][clear], rtol=1e-5, atol=1e-6)
    # again: the last block of each token sets its counter back to zero, so a second launch agrees
    again = route_top_k(*args[:3], 1e-6, *args[3:], k)
    assert all(torch.equal(a, b) for a, b in zip(again, (h, x, idx, w)))


def check_interpreted() -> None:
    for T, H, E, k in [(1, 96, 16, 4), (3, 700, 24, 2)]:  # chunks and expert blocks cut short
        check(T, H, E, k, "cpu", compiled=False)
        print(f"T={T} H={H} E={E} k={k}: ok")


def test_interpreted_kernels_match_the_model():
    assert run_interpreted("test_moe_route").count(": ok") == 2


def test_ties_go_to_the_lower_expert_id():
    """Equal biased scores: the lower id first, as the reference's sorted top-k gives on CPU; and
    negative biased scores (a negative bias) ordered as numbers, not as their bits."""
    out = run_interpreted("test_moe_route", "check_ties").split()
    assert out[-2:] == ["[[1,3,0]]", "[[6,1,2]]"], out


def check_ties() -> None:
    from runtime.kernels.moe_route import route_top_k as route

    H, E = 32, 8
    a = torch.zeros(1, H, dtype=torch.bfloat16)
    a[0, 0] = 1
    gate = torch.zeros(E, H)  # every score sigmoid(0) = 0.5: the bias alone orders them
    bias = torch.tensor([0.5, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    _, _, idx, w = route(a, torch.zeros_like(a), torch.ones(H, dtype=torch.bfloat16), 1e-6, gate, bias, 3)
    assert torch.allclose(w, torch.full_like(w, 1 / 3))
    print(str(idx.tolist()).replace(" ", ""))
    # sigmoid(0) + bias: -0.5, -0.1, -0.1, -1.5, -0.2, -2.5, -0.05, -4.5 -> 6, then 1 and 2 (tied: lower id first)
    bias = torch.tensor([-1.0, -0.6, -0.6, -2.0, -0.7, -3.0, -0.55, -5.0])
    _, _, idx, _ = route(a, torch.zeros_like(a), torch.ones(H, dtype=torch.bfloat16), 1e-6, gate, bias, 3)
    print(str(idx.tolist()).replace(" ", ""))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("T", [1, 2, 8, 32, 64])
def test_compiled_kernels_match_the_model_on_gpu(T):
    check(T, 3072, 256, 8, "cuda")
