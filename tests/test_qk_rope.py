"""The QK-norm + RoPE kernels (runtime/kernels/qk_rope.py) against the model's own pieces
(export/model.py: AttnIn's sums of squares, QkRope) on the same inputs: under Triton's interpreter
on the CPU (small shapes), and compiled on a GPU at MiniMax-M2.5's width (48 query and 8 KV heads
of 128, rotary dim 64) at positions up to the 196K context.

Tolerances: the sums of squares 1e-5 relative (float32, another summation order). The rotated q and
k, compiled: within one bf16 ulp (2**-7 relative to each value's magnitude, plus one ulp of the
largest |value| for results near zero): rsqrt and cos/sin may differ from PyTorch's in the last
float32 bit, which can move a bf16 rounding. Interpreted, Triton's CPU interpreter truncates to bf16
instead of rounding at each of the five roundings: within four ulps (2**-5).
"""
import importlib.util

import pytest
import torch

from tests.reference import run_interpreted

if importlib.util.find_spec("triton") is None:
    pytest.skip("the triton package is not installed", allow_module_level=True)


def piece(heads, kv_heads, hd, rd, device):
    from export.config import parse_hf_config
    from export.model import QkRope
    from export.tiny import PRESETS, hf_config
    from dataclasses import replace

    spec = replace(PRESETS["real"], num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hd,
                   rotary_dim=rd)
    cfg = parse_hf_config(hf_config(spec))
    g = torch.Generator().manual_seed(heads)
    w = type("W", (), {"q_norm": (1 + 0.1 * torch.randn(heads * hd, generator=g)).bfloat16(),
                       "k_norm": (1 + 0.1 * torch.randn(kv_heads * hd, generator=g)).bfloat16()})
    return QkRope(w, cfg).to(device), cfg


def check(T, heads, kv_heads, hd, rd, device, compiled=True):
    from runtime.kernels.qk_rope import norm_rope, sum_squares

    m, cfg = piece(heads, kv_heads, hd, rd, device)
    g = torch.Generator().manual_seed(T)
    q = torch.randn(T, heads * hd, generator=g).to(device, torch.bfloat16)
    k = torch.randn(T, kv_heads * hd, generator=g).to(device, torch.bfloat16)
    positions = torch.randint(0, 196_608, (T,), generator=g).to(device)
    qs, ks = sum_squares(q, k)
    torch.testing.assert_close(qs, q.float().pow(2).sum(-1, keepdim=True), rtol=1e-5, atol=0)
    torch.testing.assert_close(ks, k.float().pow(2).sum(-1, keepdim=True), rtol=1e-5, atol=0)
    # the ranks' full-width sums (TP): here scaled, as another rank's share would add
    qs, ks = qs * 1.5, ks * 1.5
    want_q, want_k = m(q, k, qs, ks, positions)
    got_q = norm_rope(q, qs, m.q_norm, m.q_width, m.eps, positions, m.inv_freq, hd, rd)
    got_k = norm_rope(k, ks, m.k_norm, m.k_width, m.eps, positions, m.inv_freq, hd, rd)
    ulps = 2 ** -7 if compiled else 2 ** -5
    for got, want in ((got_q, want_q), (got_k, want_k)):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=ulps, atol=ulps * want.float().abs().max().item())


def check_interpreted() -> None:
    for T, heads, kv_heads, hd, rd in [(1, 4, 2, 32, 16), (3, 2, 1, 48, 48)]:  # partial and full rotary, hd not 2**n
        check(T, heads, kv_heads, hd, rd, "cpu", compiled=False)
        print(f"T={T} heads={heads}/{kv_heads} hd={hd} rd={rd}: ok")


def test_interpreted_kernels_match_the_model():
    assert run_interpreted("test_qk_rope").count(": ok") == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("T", [1, 8, 64])
def test_compiled_kernels_match_the_model_on_gpu(T):
    check(T, 48, 8, 128, 64, "cuda")
