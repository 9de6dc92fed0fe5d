"""Dequantize the quantized weight formats some checkpoints ship in, so they load into the full-precision model.

- MXFP4 (OCP microscaling, GPT-OSS experts): blocks of 32 FP4 (E2M1) values sharing one power-of-two scale. On disk a
  weight (..., rows, cols) is `*_blocks` uint8 (..., rows, cols/32, 16) (two values per byte, low nibble first)
  and `*_scales` uint8 (..., rows, cols/32): the E8M0 exponent biased by 127.
- FP8 block-wise (DeepSeek-V3, Kimi-K2): an e4m3 weight (out, in) plus `weight_scale_inv` fp32 (ceil(out/128),
  ceil(in/128)), one scale per 128 x 128 tile: w = fp8 * scale.
"""
from __future__ import annotations

import torch

# The 16 E2M1 values, indexed by the 4-bit code (sign bit 3, exponent bits 2-1, mantissa bit 0).
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_dequant(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., rows, G, 16) uint8 codes + (..., rows, G) uint8 exponents -> (..., rows, G * 32) values."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair up")
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32, device=blocks.device)
    codes = blocks.to(torch.uint8)
    values = torch.stack((lut[(codes & 0x0F).long()], lut[(codes >> 4).long()]), dim=-1)  # (..., G, 16, 2)
    values = values.flatten(-2)  # (..., rows, G, 32): low nibble is the even element
    exponent = scales.to(torch.int32) - 127
    out = torch.ldexp(values, exponent[..., None].float())
    return out.flatten(-2).to(dtype)


def fp8_block_dequant(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = 128,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An fp8 (out, in) weight times its per-tile scales (ceil(out/block), ceil(in/block))."""
    out_f, in_f = weight.shape
    scale = scale_inv.float().repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    return (weight.float() * scale).to(dtype)
