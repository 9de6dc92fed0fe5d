"""Round-to-nearest weight quantizers: INT8 per output channel (symmetric) and INT4 per group (asymmetric).

These are the formats every weight-only method in `lmforge.quant` ends in: RTN computes their parameters from the
weight alone, AWQ rescales the weight first, GPTQ picks the codes column by column; all store the same tensors.

INT8, per output channel c:  scale_c = max|W_c| / 127,  q = round(W / scale_c) in [-127, 127],  W ~ q * scale_c.
  Rounding error per element <= scale_c / 2; for a row of n normal weights max|W_c| ~ sigma * sqrt(2 ln n) so the
  RMS error is about scale / sqrt(12) ~ 0.8% of sigma at n = 512..4096.

INT4, per group g of `group_size` consecutive input columns of a row (asymmetric, integer zero point):
  scale = (max(W_g) - min(W_g)) / 15,  zero = round(-min(W_g) / scale) in [0, 15],
  q = clamp(round(W / scale) + zero, 0, 15),  W ~ (q - zero) * scale.
  Error per element <= scale / 2 (plus the zero point's rounding at the group's ends, clamped); for normal weights and
  group 128 the expected range is ~5.2 sigma, so scale ~ 0.35 sigma and the RMS error ~ scale / sqrt(12) ~ 0.10 sigma.
"""
from __future__ import annotations

import torch

__all__ = ["int8_quantize", "int8_dequantize", "int4_params", "int4_quantize", "int4_dequantize", "fake_int8",
           "fake_int4", "quantize_activations_int8"]

_TINY = 1e-8  # floor for scales of all-zero rows/groups (their codes are 0 and dequantize to 0 exactly)


@torch.no_grad()
def int8_quantize(w: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (q int8 (out, in), scale (out,) in `scale_dtype`, default w's dtype).

    Codes are computed against the stored (rounded) scale, so dequantization uses exactly the scale they assume."""
    scale = (w.float().abs().amax(dim=1) / 127).clamp(min=_TINY).to(scale_dtype or w.dtype)
    q = (w.float() / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype or scale.dtype)


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"INT4 group_size {group_size} must divide in_features {in_f}")
    return w.float().view(out_f, in_f // group_size, group_size)  # (out, n_groups, group)


@torch.no_grad()
def int4_params(w: torch.Tensor, group_size: int = 128, clip: torch.Tensor | float | None = None,
                scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric INT4 parameters of w (out, in): scale (out, n_groups) in `scale_dtype` and zero uint8 (out, n_groups).

    `clip` shrinks each group's [min, max] range (a float, or (out, n_groups) ratios, as AWQ's clipping search does).
    The range always contains 0 so zero weights stay exact and the zero point lies in [0, 15]."""
    g = _groups(w, group_size)
    wmax, wmin = g.amax(dim=2).clamp(min=0), g.amin(dim=2).clamp(max=0)
    if clip is not None:
        wmax, wmin = wmax * clip, wmin * clip
    scale = ((wmax - wmin) / 15).clamp(min=_TINY).to(scale_dtype or w.dtype)
    zero = (-wmin / scale.float()).round().clamp(0, 15).to(torch.uint8)
    return scale, zero


@torch.no_grad()
def int4_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes uint8 (out, in) in [0, 15] of w under the given group parameters (group size = in / n_groups)."""
    g = _groups(w, w.shape[1] // scale.shape[1])
    q = (g / scale.float()[..., None]).round() + zero.float()[..., None]
    return q.clamp(0, 15).to(torch.uint8).view(w.shape)


def int4_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """codes uint8 (out, in), scale/zero (out, n_groups) -> (out, in) in `dtype` (default scale's)."""
    out_f, in_f = codes.shape
    g = codes.view(out_f, scale.shape[1], -1).float() - zero.float()[..., None]
    return (g * scale.float()[..., None]).view(out_f, in_f).to(dtype or scale.dtype)


def fake_int8(w: torch.Tensor) -> torch.Tensor:
    """w rounded through INT8 per-channel quantization, same dtype and shape (no gradient trick; see qat.py)."""
    return int8_dequantize(*int8_quantize(w), dtype=w.dtype)


def fake_int4(w: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    scale, zero = int4_params(w, group_size)
    return int4_dequantize(int4_quantize(w, scale, zero), scale, zero, dtype=w.dtype)


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (row) symmetric INT8: x (..., k) -> (integer-valued codes in x's dtype, scale (..., 1)).

    The codes are kept as floats: every integer in [-127, 127] is exact in bf16/fp16/fp32, and a float matmul of them
    is what both the fake-quant (QAT) and the real W8A8 forward compute, so the two agree."""
    scale = (x.detach().abs().amax(dim=-1, keepdim=True).float() / 127).clamp(min=_TINY)
    return (x.float() / scale).round().clamp(-127, 127).to(x.dtype), scale
