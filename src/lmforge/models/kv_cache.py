"""A contiguous, preallocated KV cache for incremental decoding.

Static shapes on purpose: every decode step writes into fixed buffers with a tensor of slot indices and attends over
the whole buffer with a mask, so the step can be captured in a CUDA graph (torch.compile "reduce-overhead").
The paged cache for serving lives in `lmforge.infer` (later); this one serves `generate()`.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .config import ModelConfig


class Cache(Protocol):
    """What attention calls on any cache (this static one, the ring buffer, the paged engine's pool).

    `update` stores a pair of (B, heads, T, dims) tensors per layer and returns the layer's full history; what the
    pair is comes from `ModelConfig.cache_shapes`: per-head keys and values, or MLA's latent and shared RoPE key. A
    cache that can attend itself (the paged kernel) is also an `AttendingCache`."""

    def write_positions(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def query_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Index of each new token's own key among the keys `update` returns (its slot, unless the cache moves
        keys, as the ring buffer does)."""
        ...

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class AttendingCache(Cache, Protocol):
    """A cache that attends itself (the paged engine's Triton decode kernel): `Attention` hands it q (B, H, T, D)
    and the new k/v instead of `update` + SDPA and gets (B, H, T, D) back. With `rotates`, RoPE runs inside its
    kernels: q/k come un-rotated and `rope` carries the (cos, sin) tables."""

    @property
    def rotates(self) -> bool: ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, rope=None,
               sinks: torch.Tensor | None = None) -> torch.Tensor: ...


class KVCache(nn.Module):
    """Keys/values (L, B, Hkv, S, D) plus the absolute position held in each slot (B, S), -1 where empty/padding.

    What the two tensors hold per token is `cfg.cache_shapes`: per-head keys and values, or for multi-head latent
    attention the compressed latent (L, B, 1, S, mla_kv_rank) and the shared RoPE key (L, B, 1, S, mla_rope_dim).
    The attention module decides what it writes; the cache only stores (B, heads, T, dims) pairs by slot.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device=None):
        super().__init__()
        (hk, dk), (hv, dv) = cfg.cache_shapes
        k_shape = (cfg.n_layers, batch_size, hk, max_len, dk)
        v_shape = (cfg.n_layers, batch_size, hv, max_len, dv)
        self.register_buffer("k", torch.zeros(k_shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(v_shape, dtype=dtype, device=device), persistent=False)
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

    def query_slots(self, slots: torch.Tensor) -> torch.Tensor:
        return slots  # keys stay in the slots they were written to

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k/v (B, Hkv, T, D) of one layer into `slots`; return that layer's full buffers (B, Hkv, S, D)."""
        k_all, v_all = self.k[layer], self.v[layer]
        k_all.index_copy_(2, slots, k)
        v_all.index_copy_(2, slots, v)
        return k_all, v_all

    def reset(self) -> None:
        self.key_positions.fill_(-1)


class RollingKVCache(KVCache):
    """A ring buffer for models whose every layer uses a sliding window (Mistral v0.1, Phi-3): memory for
    `window + chunk - 1` positions however long the generation runs, instead of one slot per position.

    Slot s lives at ring index s % max_len. A step of T tokens with max_len >= window + T - 1 (every decode step)
    writes first and attends over the ring: what it overwrites is older than any of its queries' windows. A longer
    step (a long prompt) attends over [ring before the write | its own keys] and then keeps its last max_len tokens.
    The attention mask still comes from positions (stale or empty entries fall outside the window or are -1).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, window: int, chunk: int = 64, dtype=torch.float32,
                 device=None):
        super().__init__(cfg, batch_size, window + chunk - 1, dtype=dtype, device=device)
        self.window = window
        self._appended = False  # the current step attends over ring + its own keys (a long prefill)

    def _fits(self, n_new: int) -> bool:
        return self.max_len >= self.window + n_new - 1

    def write_positions(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        L = self.max_len
        self._appended = not self._fits(slots.shape[0])
        if not self._appended:
            return super().write_positions(slots % L, positions)
        before = self.key_positions.clone()
        super().write_positions(slots[-L:] % L, positions[:, -L:])
        return torch.cat([before, positions], 1)  # (B, L + T)

    def query_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Index of each new token's own key among the keys `update` returns."""
        if self._appended:
            return self.max_len + torch.arange(slots.shape[0], device=slots.device)
        return slots % self.max_len

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        L = self.max_len
        if not self._appended:
            return super().update(layer, slots % L, k, v)
        k_all, v_all = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        super().update(layer, slots[-L:] % L, k[:, :, -L:], v[:, :, -L:])
        return k_all, v_all
