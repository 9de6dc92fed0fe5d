"""A contiguous, preallocated KV cache for incremental decoding.

Static shapes on purpose: every decode step writes into fixed buffers with a tensor of slot indices and attends over
the whole buffer with a mask, so the step can be captured in a CUDA graph (torch.compile "reduce-overhead").
The paged cache for serving lives in `lmforge.infer` (later); this one serves `generate()`.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig


class KVCache(nn.Module):
    """Keys/values (L, B, Hkv, S, D) plus the absolute position held in each slot (B, S), -1 where empty/padding."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (cfg.n_layers, batch_size, cfg.kv_heads, max_len, cfg.dim_per_head)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer(
            "key_positions", torch.full((batch_size, max_len), -1, dtype=torch.long, device=device), persistent=False
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write_positions(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Record the positions (B, T) of the tokens entering `slots` (T,); returns all key positions (B, S)."""
        self.key_positions.index_copy_(1, slots, positions)
        return self.key_positions

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k/v (B, Hkv, T, D) of one layer into `slots`; return that layer's full buffers (B, Hkv, S, D)."""
        k_all, v_all = self.k[layer], self.v[layer]
        k_all.index_copy_(2, slots, k)
        v_all.index_copy_(2, slots, v)
        return k_all, v_all

    def reset(self) -> None:
        self.key_positions.fill_(-1)
