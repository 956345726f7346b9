"""Block-scaled float8_e4m3fn weights: the published format, both directions.

A weight W [R, C] is stored as `fp8` [R, C] and `scale_inv` [ceil(R/br), ceil(C/bc)] float32, with
W[i, j] = float(fp8[i, j]) * scale_inv[i // br, j // bc]. The last block row or column may be partial.
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def scale_grid(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    return (-(-rows // block[0]), -(-cols // block[1]))


def dequantize(fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype = torch.bfloat16, row_offset: int = 0, col_offset: int = 0,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize `fp8`, which may be a slice starting at (row_offset, col_offset) of the full weight
    whose scale grid is `scale_inv`. Multiplies in float32 and rounds once to `dtype`. With `out`
    (contiguous, of that dtype and shape) the result is written there, with no intermediate copy."""
    if fp8.dtype != torch.float8_e4m3fn:
        raise TypeError(f"expected float8_e4m3fn weights, got {fp8.dtype}")
    if fp8.dim() != 2 or scale_inv.dim() != 2:
        raise ValueError(f"expected 2-D weight and scale, got {tuple(fp8.shape)} and {tuple(scale_inv.shape)}")
    rows, cols = fp8.shape
    br, bc = block
    if not (row_offset % br or col_offset % bc or rows % br or cols % bc):
        # Whole blocks (every tensor of the published model, sliced at block boundaries):
        # broadcast one scale over each block instead of expanding the scale grid.
        gr, gc, r0, c0 = rows // br, cols // bc, row_offset // br, col_offset // bc
        s = scale_inv[r0:r0 + gr, c0:c0 + gc].float()
        if s.shape != (gr, gc):
            raise ValueError(f"scale grid {tuple(scale_inv.shape)} does not cover weight rows "
                             f"{row_offset}..{row_offset + rows} x cols {col_offset}..{col_offset + cols}")
        if out is None:
            out = torch.empty(rows, cols, dtype=dtype, device=fp8.device)
        torch.mul(fp8.float().view(gr, br, gc, bc), s[:, None, :, None], out=out.view(gr, br, gc, bc))
        return out
    ri = torch.arange(row_offset, row_offset + rows, device=scale_inv.device) // block[0]
    ci = torch.arange(col_offset, col_offset + cols, device=scale_inv.device) // block[1]
    if rows and int(ri[-1]) >= scale_inv.shape[0] or cols and int(ci[-1]) >= scale_inv.shape[1]:
        raise ValueError(f"scale grid {tuple(scale_inv.shape)} does not cover weight rows "
                         f"{row_offset}..{row_offset + rows} x cols {col_offset}..{col_offset + cols}")
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype, device=fp8.device)
    # One dimension in whole blocks (a TP slice whose other dimension starts or ends inside a block):
    # expand the scale grid along the partial dimension only and broadcast it over the whole one.
    if not (col_offset % bc or cols % bc):
        gc, c0 = cols // bc, col_offset // bc
        s = scale_inv[:, c0:c0 + gc].float().index_select(0, ri)                      # [rows, gc]
        torch.mul(fp8.float().view(rows, gc, bc), s[:, :, None], out=out.view(rows, gc, bc))
        return out
    if not (row_offset % br or rows % br):
        gr, r0 = rows // br, row_offset // br
        s = scale_inv[r0:r0 + gr].float().index_select(1, ci)                          # [gr, cols]
        torch.mul(fp8.float().view(gr, br, cols), s[:, None, :], out=out.view(gr, br, cols))
        return out
    s = scale_inv.float().index_select(0, ri).index_select(1, ci)
    torch.mul(fp8.float(), s, out=out)
    return out


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight the way the published checkpoint was: one scale per block, chosen so
    the block's largest magnitude maps to FP8_MAX. Returns (fp8 weight, float32 scale_inv)."""
    rows, cols = w.shape
    gr, gc = scale_grid(rows, cols, block)
    padded = torch.zeros(gr * block[0], gc * block[1], dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(gr, block[0], gc, block[1])
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(gr * block[0], gc * block[1])[:rows, :cols].to(torch.float8_e4m3fn)
    return q.contiguous(), scale_inv.contiguous()
