"""Positional schemes, each a small pure function of absolute positions.

RoPE rotates q/k; ALiBi is an additive attention bias; learned and sinusoidal positions are added to the embeddings.
All take `positions` (B, T) of absolute token positions, so left padding, KV-cache decoding and (later) packing with
per-document restarts need nothing special here.
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (rotary_dim/2,) in fp32, with linear or Llama-3 scaling applied."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s.type == "linear":
        return inv_freq / s.factor
    # llama3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    low_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, out)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, 1, T, rotary_dim/2) for the given positions, computed in fp32 then cast."""
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
