"""Positional schemes, each a small pure function of absolute positions.

RoPE rotates q/k; ALiBi is an additive attention bias; learned and sinusoidal positions are added to the embeddings.
All take `positions` (B, T) of absolute token positions, so left padding, KV-cache decoding and (later) packing with
per-document restarts need nothing special here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig, RopeScaling


def rope_inv_freq(cfg: ModelConfig, theta: float | None = None, scaling: RopeScaling | None | str = "cfg",
                  long: bool = False) -> torch.Tensor:
    """Inverse frequencies (rotary_dim/2,) in fp32 for base `theta` (default cfg.rope_theta) and `scaling` (default
    cfg.rope_scaling), as transformers' `modeling_rope_utils` computes them. Length-dependent scalings give their
    short-context set: longrope's short factors (`long=True`: the long ones), dynamic's unscaled base."""
    dim = cfg.rotary_dim
    theta = cfg.rope_theta if theta is None else theta
    s = cfg.rope_scaling if scaling == "cfg" else scaling
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim  # (dim/2,)
    inv_freq = 1.0 / (theta ** exponents)
    if s is None or s.type == "dynamic":
        return inv_freq
    if s.type == "linear":
        return inv_freq / s.factor
    if s.type == "longrope":
        factors = torch.tensor(s.long_factor if long else s.short_factor, dtype=torch.float32)
        return 1.0 / (factors * theta ** exponents)
    if s.type == "yarn":
        return _yarn_inv_freq(dim, theta, s, _scaling_factor(cfg, s))
    # llama3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    low_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, out)


def _scaling_factor(cfg: ModelConfig, s: RopeScaling) -> float:
    """yarn/longrope without a factor: the context extension max_seq_len / original_max_seq_len (Phi-3, DeepSeek)."""
    return s.factor if s.factor is not None else cfg.max_seq_len / s.original_max_seq_len


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(dim: int, theta: float, s: RopeScaling, factor: float) -> torch.Tensor:
    """YaRN's NTK-by-parts: dims rotating more than beta_fast times over the original context keep their frequency
    (extrapolate), those under beta_slow are divided by `factor` (interpolate), a linear ramp in between."""
    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no singularity
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp  # share of each dim that keeps its original frequency
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def rope_attention_factor(cfg: ModelConfig, scaling: RopeScaling | None) -> float:
    """The multiplier yarn and longrope put on cos/sin (so on every q.k score, squared); 1 for the others."""
    s = scaling
    if s is None or s.type not in ("yarn", "longrope"):
        return 1.0
    if s.attention_factor is not None:
        return s.attention_factor
    factor = _scaling_factor(cfg, s)
    if s.type == "longrope":
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(s.original_max_seq_len))
    if s.mscale and s.mscale_all_dim:
        return _yarn_mscale(factor, s.mscale) / _yarn_mscale(factor, s.mscale_all_dim)
    return _yarn_mscale(factor)


class Rotary(nn.Module):
    """RoPE tables of one base + scaling: `forward(positions (B, T), dtype)` -> cos, sin (B, 1, T, rotary_dim/2).

    Length-dependent scalings pick their frequencies per row, from the row's longest position so far (its max
    position + 1): longrope's long factors beyond original_max_seq_len, dynamic NTK's grown base beyond max_seq_len.
    transformers picks one set per forward from the whole batch (and dynamic keeps the largest it has seen); for one
    sequence, and for its cached decode step by step, the two agree, and here a row never depends on its batch mates.
    The frequencies are buffers (they follow the model's device) rebuilt by `reset`, never saved.
    """

    def __init__(self, cfg: ModelConfig, theta: float, scaling: RopeScaling | None):
        super().__init__()
        self.cfg, self.theta, self.scaling = cfg, theta, scaling
        self.attention_factor = rope_attention_factor(cfg, scaling)
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)  # (rotary_dim/2,)
        self.register_buffer("long_inv_freq", torch.empty(0), persistent=False)  # longrope's long set

    def reset(self, device) -> None:
        self.inv_freq = rope_inv_freq(self.cfg, self.theta, self.scaling).to(device)
        if self.scaling is not None and self.scaling.type == "longrope":
            self.long_inv_freq = rope_inv_freq(self.cfg, self.theta, self.scaling, long=True).to(device)

    def frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        """(rot/2,) shared by every row, or (B, 1, rot/2) per row for longrope / dynamic."""
        s, inv = self.scaling, self.inv_freq
        if s is None or s.type not in ("longrope", "dynamic"):
            return inv
        seq_len = positions.amax(-1) + 1  # (B,) each row's length so far
        if s.type == "longrope":
            return torch.where((seq_len > s.original_max_seq_len)[:, None, None], self.long_inv_freq, inv)
        dim, max_len = self.cfg.rotary_dim, self.cfg.max_seq_len
        grown = seq_len.clamp(min=max_len).float()
        base = self.theta * ((s.factor * grown / max_len) - (s.factor - 1)) ** (dim / (dim - 2))  # (B,) fp32
        exponents = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim
        return (1.0 / base[:, None] ** exponents)[:, None]  # (B, 1, rot/2)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.clamp(min=0).float()[..., None] * self.frequencies(positions)  # (B, T, rot/2)
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos[:, None].to(dtype), sin[:, None].to(dtype)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, 1, T, rotary_dim/2) for the given positions and plain frequencies, computed in fp32 then
    cast (see `Rotary` for scalings with an attention factor or per-row frequencies)."""
    angles = positions.clamp(min=0).float()[..., None] * inv_freq  # (B, T, rot/2)
    return angles.cos()[:, None].to(dtype), angles.sin()[:, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first rotary_dim dims of x (B, H, T, D); the rest pass through (partial rotary, ChatGLM).

    Half layout (Llama/NeoX, what HF checkpoints store): pairs are (i, i + rot/2).
    Interleaved layout (GPT-J/GLM): pairs are (2i, 2i + 1).
    """
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.numel() else rotated


@dataclass(frozen=True)
class QueryScale:
    """What a NoPE layer with temperature tuning gets in place of RoPE tables: a per-position query multiplier."""

    scale: torch.Tensor  # (B, 1, T, 1)


def temperature_scale(cfg: ModelConfig, positions: torch.Tensor) -> torch.Tensor:
    """Llama 4's attention temperature of NoPE layers, 1 + scale * log(1 + floor((pos + 1) / floor_)), (B, 1, T, 1)
    in fp32. It grows slowly with the position so long contexts keep attention sharp (Nakanishi 2025)."""
    pos = positions.clamp(min=0).float()
    t = torch.log1p(torch.floor((pos + 1.0) / cfg.attn_temperature_floor)) * cfg.attn_temperature_scale + 1.0
    return t[:, None, :, None]


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (n_heads,) as in Press et al. and BLOOM: geometric for powers of two, interleaved else."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < n_heads:
        extra_base = 2.0 ** (-4.0 / closest)
        slopes += [extra_base ** (2 * i + 1) for i in range(n_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


def sinusoidal_embedding(positions: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Fixed sin/cos position embeddings (B, T, dim) from "Attention Is All You Need" (sin on even, cos on odd dims)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.clamp(min=0).float()[..., None] * inv_freq  # (B, T, dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2).to(dtype)
