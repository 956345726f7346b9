"""The prefill QK norm + RoPE kernel (runtime/kernels/qk_rope.py norm_rope) and the attention-in
piece it serves (runtime/piece_kernels.py attention_in) against the pieces' own PyTorch modules
(export/model.py QkRope, AttnBlock), which the transformers comparison tests check.

Under Triton's CPU interpreter in float32 (the module's ops and the kernel round nothing): 1e-5
relative to the output's scale covers 1/sqrt against rsqrt, the sums' order and the interpreter's
cos/sin. On a GPU in bf16, at the real model's heads (48 query / 8 KV of 128, rotary 64) and one
TP=8 rank's (6 / 1): the dimensions past the rotary ones (the QK norm alone) bit-identical to the
module's in 99.9% of the values at least (the kernel's 1/sqrt and PyTorch's rsqrt can differ in a
float's last bit, which flips a bf16 rounding now and then); the rotated ones, as the decode attention kernel's test holds them, within 2**-8 of the
output's norm (relative). Measured on an H200: 7% (positions below 10) to 22% (below 200K) of the
rotated values differ from PyTorch's, the largest relative differences on values near zero (the
cos and sin terms cancelling); the cause (which rounding differs) is not found yet.
"""
import importlib.util
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from export.config import parse_hf_config
from export.model import AttnBlock, QkRope
from export.tiny import PRESETS, hf_config
from tests.reference import run_interpreted

if importlib.util.find_spec("triton") is None:
    pytest.skip("the triton package is not installed", allow_module_level=True)


def config(preset: str, **kw):
    return parse_hf_config(hf_config(replace(PRESETS[preset], **kw)))


def weights(cfg, dtype, g):
    H, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    return SimpleNamespace(input_norm=1 + r(H, scale=0.1), q_proj=r(q, H, scale=H ** -0.5),
                           k_proj=r(kv, H, scale=H ** -0.5), v_proj=r(kv, H, scale=H ** -0.5),
                           q_norm=1 + r(q, scale=0.1), k_norm=1 + r(kv, scale=0.1))


def check_module_and_kernel(cfg, T, device, dtype, tp_ssq: bool):
    """QkRope's module against norm_rope on the same q/k (with given sums of squares, as at TP>1,
    or summed in the kernel, TP=1); returns (kernel q, module q, kernel k, module k)."""
    from runtime.kernels.qk_rope import norm_rope

    g = torch.Generator().manual_seed(T)
    w = weights(cfg, dtype, g)
    m = QkRope(w, cfg).to(device)
    q = (torch.randn(T, cfg.q_size, generator=g) * 3).to(device, dtype)
    k = (torch.randn(T, cfg.kv_size, generator=g) * 3).to(device, dtype)
    positions = torch.randint(0, 200_000, (T,), generator=g).to(device)
    q_ssq, k_ssq = q.float().pow(2).sum(-1, keepdim=True), k.float().pow(2).sum(-1, keepdim=True)
    want_q, want_k = m(q, k, q_ssq, k_ssq, positions)
    ssq = torch.cat([q_ssq, k_ssq], 1) if tp_ssq else None
    got_q, got_k = norm_rope(q, k, ssq, m.q_norm, m.k_norm, m.q_width, m.k_width, m.eps, positions, m.inv_freq,
                             m.rotary_dim, m.hd)
    return got_q, want_q, got_k, want_k


def check_interpreted() -> None:
    for preset, tp_ssq in (("tiny", False), ("tiny", True), ("kv8", False)):
        cfg = config(preset)
        for got, want in zip(*[iter(check_module_and_kernel(cfg, 5, "cpu", torch.float32, tp_ssq))] * 2):
            torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)
        print(f"{preset} ssq_given={tp_ssq}: ok")


def test_interpreted_kernel_matches_the_module():
    assert run_interpreted("test_qk_rope").count(": ok") == 3


def close_in_bf16(got, want, rotary_dim=None):
    """99.9% bit-identical past the rotary dimensions of each head ([..., heads, head_dim]), and the
    whole within 2**-8 of the output's norm."""
    if rotary_dim is not None:
        same = (got[..., rotary_dim:] == want[..., rotary_dim:]).float().mean().item()
        assert same >= 0.999, same
    rel = float((got.double() - want.double()).norm() / want.double().norm())
    assert rel < 2 ** -8, rel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("preset", ["real", "rank8"])
@pytest.mark.parametrize("tp_ssq", [False, True])
def test_compiled_kernel_matches_the_module_on_gpu(preset, tp_ssq):
    cfg = config(preset)
    got_q, want_q, got_k, want_k = check_module_and_kernel(cfg, 300, "cuda", torch.bfloat16, tp_ssq)
    close_in_bf16(got_q, want_q, cfg.rotary_dim)
    close_in_bf16(got_k, want_k, cfg.rotary_dim)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_attention_in_piece_matches_the_module_on_gpu():
    """The whole TP=1 "attn" piece: add + norm kernel, cuBLAS q/k/v, norm_rope, against AttnBlock."""
    from runtime.piece_kernels import attention_in

    cfg = config("real")
    g = torch.Generator().manual_seed(0)
    w = weights(cfg, torch.bfloat16, g)
    block = AttnBlock(w, cfg).cuda()
    T = 257
    residual = torch.randn(T, cfg.hidden_size, generator=g).to("cuda", torch.bfloat16)
    delta = torch.randn(T, cfg.hidden_size, generator=g).to("cuda", torch.bfloat16)
    positions = torch.arange(1000, 1000 + T, device="cuda")
    want = block(residual, delta, positions)
    got = attention_in(block, "attn", residual, delta, positions)
    assert [t.shape for t in got] == [t.shape for t in want]
    h, q, k, v = got
    assert torch.equal(h, want[0]) and torch.equal(v, want[3])  # the add, and the same cuBLAS product
    close_in_bf16(q, want[1], cfg.rotary_dim)
    close_in_bf16(k, want[2], cfg.rotary_dim)
