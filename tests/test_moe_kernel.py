"""The fused gather-MoE kernels (runtime/kernels/fused_moe.py) against the gather form computed here in
float64 from the same bf16 weights: under Triton's interpreter on the CPU (small shapes), and compiled
on a GPU at a real TP=8 expert shard (256 experts of 3072 x 192), where the model's own PyTorch form
(export/model.py, bf16 intermediates) is compared too.

Tolerances: against float64, 1e-4 relative to the output's scale (the kernel accumulates in float32);
against the PyTorch bf16 form, 2e-2 (that form rounds y, silu(y1)*y3 and each expert's output to bf16).
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from tests.reference import run_interpreted

if importlib.util.find_spec("triton") is None:
    pytest.skip("the triton package is not installed", allow_module_level=True)


def case(T, k, E, H, inter, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(device, torch.bfloat16)
    w13 = (torch.randn(E, 2 * inter, H, generator=g) * H ** -0.5).to(device, torch.bfloat16)
    w2 = (torch.randn(E, H, inter, generator=g) * inter ** -0.5).to(device, torch.bfloat16)
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(device)
    weights = torch.rand(T, k, generator=g).to(device)
    weights[0, -1] = 0.0  # an expert on another rank (expert parallelism) contributes nothing
    return x, experts, weights, w13, w2


def reference(x, experts, weights, w13, w2):
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for j, e in enumerate(experts[t].tolist()):
            y = w13[e].double() @ x[t].double()
            a = F.silu(y[:inter]) * y[inter:]
            out[t] += weights[t, j].double() * (w2[e].double() @ a)
    return out


def check_interpreted() -> None:
    from runtime.kernels.fused_moe import gather_moe

    for T, k, E, H, inter in [(1, 4, 16, 256, 48), (3, 2, 8, 320, 100)]:  # partial blocks on every axis
        args = case(T, k, E, H, inter, "cpu")
        out = gather_moe(*args)
        ref = reference(*args)
        torch.testing.assert_close(out.double(), ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
        print(f"T={T} k={k} E={E} H={H} I={inter}: ok")


def test_interpreted_kernels_match_reference():
    assert run_interpreted("test_moe_kernel").count(": ok") == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("T", [1, 4, 16])
def test_compiled_kernels_match_reference_and_the_pytorch_form_on_gpu(T):
    from runtime.kernels.fused_moe import gather_moe

    x, experts, weights, w13, w2 = case(T, 8, 256, 3072, 192, "cuda")
    out = gather_moe(x, experts, weights, w13, w2)
    ref = reference(x, experts, weights, w13, w2)
    torch.testing.assert_close(out.double(), ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    # the arithmetic of the PyTorch gather form (bf16 intermediates), given the same routing
    flat = experts.reshape(-1)
    y = (w13.index_select(0, flat).view(T, 8, 384, 3072) @ x[:, None, :, None]).squeeze(-1)
    a = F.silu(y[..., :192]) * y[..., 192:]
    o = (w2.index_select(0, flat).view(T, 8, 3072, 192) @ a[..., None]).squeeze(-1)
    torch_form = (o.float() * weights[..., None]).sum(1)
    # and rounded once to bf16, as the decode layer takes it
    one = gather_moe(x, experts, weights, w13, w2, out_dtype=torch.bfloat16)
    assert torch.equal(one, out.to(torch.bfloat16))
    torch.testing.assert_close(out, torch_form, atol=2e-2 * float(torch_form.abs().max()), rtol=0)
