"""Dequantization against an independent block-by-block computation, partial edge blocks included."""
import numpy as np
import pytest
import torch

from export import fp8
from tests.reference import dequant_reference, read_fp8_numpy


@pytest.mark.parametrize("rows,cols", [(128, 128), (256, 384), (192, 256), (300, 130), (5, 7), (256, 192)])
def test_dequantize_matches_block_loop(rows, cols):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    w = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))
    q, s = fp8.quantize(w, (128, 128))
    assert s.shape == fp8.scale_grid(rows, cols, (128, 128))
    ref = dequant_reference(q.view(torch.uint8).numpy(), s.numpy())
    got = fp8.dequantize(q, s, (128, 128), torch.float32).numpy()
    # Same float32 product of the same two numbers: exact.
    np.testing.assert_array_equal(got, ref)
    # BF16 output is that product rounded once.
    got16 = fp8.dequantize(q, s, (128, 128), torch.bfloat16)
    np.testing.assert_array_equal(got16.float().numpy(), torch.from_numpy(ref).bfloat16().float().numpy())
    # Quantization itself: e4m3 has 3 mantissa bits, so relative error per element <= 2^-4,
    # plus the subnormal floor of each block (2^-9 of its scale).
    err = (torch.from_numpy(got) - w).abs()
    bound = w.abs() * 2 ** -4 + s.max() * 2 ** -9
    assert (err <= bound).all()


@pytest.mark.parametrize("r0,r1,c0,c1", [(0, 64, 0, 300), (100, 200, 3, 259), (128, 300, 128, 130), (299, 300, 0, 1), (128, 256, 0, 256)])
def test_dequantize_slice_with_offset(r0, r1, c0, c1):
    """A rank's slice, dequantized from the scale blocks that cover it, equals the same slice of the
    whole dequantized weight, even where the slice starts inside a block."""
    g = torch.Generator().manual_seed(7)
    q, s = fp8.quantize(torch.randn(300, 300, generator=g), (128, 128))
    full = dequant_reference(q.view(torch.uint8).numpy(), s.numpy())
    sub_scale = s[r0 // 128: -(-r1 // 128), c0 // 128: -(-c1 // 128)]
    got = fp8.dequantize(q[r0:r1, c0:c1], sub_scale, (128, 128), torch.float32, r0 % 128, c0 % 128)
    np.testing.assert_array_equal(got.numpy(), full[r0:r1, c0:c1])


def test_dequantize_rejects_scale_grid_too_small():
    q, s = fp8.quantize(torch.randn(256, 256), (128, 128))
    with pytest.raises(ValueError, match="does not cover"):
        fp8.dequantize(q, s[:1], (128, 128))


def test_checkpoint_partial_blocks_dequantized_right(tiny_ckpt):
    """The embedded checkpoint has partial edge blocks (intermediate 192 = 128 + 64): the reader's
    BF16 weights equal the independent dequantization rounded to BF16."""
    from export.checkpoint import Checkpoint

    ck = Checkpoint(tiny_ckpt)
    assert ck.config.intermediate_size % 128  # the toy must exercise partial blocks
    lw = ck.layer(1, torch.bfloat16)
    for e in (0, 5):
        for name, got in (("w1", lw.w13[e, :192]), ("w3", lw.w13[e, 192:]), ("w2", lw.w2[e])):
            b, s = read_fp8_numpy(tiny_ckpt, f"model.layers.1.block_sparse_moe.experts.{e}.{name}")
            ref = torch.from_numpy(dequant_reference(b, s)).bfloat16()
            assert torch.equal(got, ref), name
    b, s = read_fp8_numpy(tiny_ckpt, "model.layers.1.self_attn.q_proj")
    assert torch.equal(lw.q_proj, torch.from_numpy(dequant_reference(b, s)).bfloat16())
