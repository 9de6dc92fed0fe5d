"""The paged KV cache for serving: a pool of fixed-size blocks, per-sequence block tables, prefix caching.

Two halves:

- `BlockPool` is pure bookkeeping on the host: reference-counted block ids, a free list in LRU order, and the prefix
  cache (full blocks indexed by a chained hash of their tokens, verified by token ids on every hit). A freed block that
  holds a hashed prefix stays findable until the allocator hands it out again.
- `PagedKVCache` holds the tensors, K/V of every layer as a flat pool of token slots (L, num_blocks * block_size,
  Hkv, D), and speaks the model's duck-typed cache interface (`write_positions` once per forward, `update` per
  layer). Each forward is described by a `PagedBatch` (built by `paged_batch` from block tables, on the device, so a
  decode step can be captured in a CUDA graph): the slots the new tokens fill, and, per row, a gathered view of the
  slots its queries attend to, laid out as [context (C) | new tokens (T)].

Block 0 is never allocated: padding tokens write there and empty view entries read from there (masked out by
position -1), so stray writes never touch a live sequence.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...models.attention import attend as sdpa_attend
from ...models.config import ModelConfig
from ..kernels.options import DEFAULT, KernelOptions

NULL_BLOCK = 0


# ------------------------------------------------------------------------------------------------ block pool


def block_hashes(token_ids: Sequence[int], block_size: int, namespace: str = "", start: int = 0,
                 parent: int | None = None) -> list[tuple[int, tuple[int, ...]]]:
    """Chained keys `(hash, tokens)` of the full blocks of `token_ids`, from block index `start` on.

    A block's hash covers its parent's hash (the whole prefix) and `namespace` (e.g. the LoRA adapter, whose K/V
    differ); `parent` is the hash of block `start - 1` when continuing a chain.
    """
    if parent is None:
        parent = hash(("lmforge-prefix", namespace))
    out = []
    for i in range(start, len(token_ids) // block_size):
        tokens = tuple(token_ids[i * block_size:(i + 1) * block_size])
        parent = hash((parent, tokens))
        out.append((parent, tokens))
    return out


class BlockPool:
    """Reference-counted KV blocks with an LRU free list and a prefix cache of full blocks.

    Block ids are 1..num_blocks-1 (0 is the null block). `ref[b]` counts the sequences using block b; a block with
    ref 0 is free, and if it holds a cached prefix it is still found by `lookup` until `allocate` recycles it
    (least recently freed first).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.cached: dict[int, int] = {}  # chained hash -> block id
        self.key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # block id -> (hash, tokens), to verify hits
        self.stats = {"prefix_cache_queries": 0, "prefix_cache_hits": 0, "prefix_cache_hit_tokens": 0}

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (ref 1), evicting their cached prefixes; None (and nothing taken) if fewer are free."""
        if n > len(self.free):
            return None
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            key = self.key_of.pop(b, None)
            if key is not None and self.cached.get(key[0]) == b:
                del self.cached[key[0]]
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: Sequence[int]) -> int:
        """Drop one reference to each block; return how many became free. Tail blocks are queued for eviction
        first, so a shared prefix outlives the suffixes that hang off it."""
        freed = 0
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
                freed += 1
        return freed

    def lookup(self, keys: Sequence[tuple[int, tuple[int, ...]]]) -> list[int]:
        """Blocks holding the longest cached prefix of `keys` (from `block_hashes`), each verified by its tokens."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for key in keys:
            b = self.cached.get(key[0])
            if b is None or self.key_of.get(b) != key:
                break
            hits.append(b)
        return hits

    def count_lookup(self, queried_blocks: int, hit_blocks: int) -> None:
        self.stats["prefix_cache_queries"] += queried_blocks
        self.stats["prefix_cache_hits"] += hit_blocks
        self.stats["prefix_cache_hit_tokens"] += hit_blocks * self.block_size

    def acquire(self, blocks: Sequence[int]) -> None:
        """Take a reference to cached blocks found by `lookup` (taking them off the free list if unused)."""
        for b in blocks:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1

    def free_after_acquire(self, blocks: Sequence[int]) -> int:
        """How many blocks `allocate` could hand out after `acquire(blocks)`."""
        return len(self.free) - sum(1 for b in blocks if self.ref[b] == 0)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (blocks in use keep their contents, free ones are just free); returns how many
        were forgotten. Needed whenever the weights change: cached K/V were computed with the old ones."""
        n = len(self.cached)
        self.cached.clear()
        self.key_of.clear()
        return n

    def register(self, block: int, key: tuple[int, tuple[int, ...]]) -> None:
        """Make a full, computed block findable by its chained key (the first block with a given key wins)."""
        if self.enable_prefix_caching and key[0] not in self.cached and block not in self.key_of:
            self.cached[key[0]] = block
            self.key_of[block] = key


# ------------------------------------------------------------------------------------------------ model-facing cache


@dataclass
class PagedBatch:
    """What one forward writes and reads, all on the model's device.

    positions (B, T) of the new tokens (-1 = padding); write_slots (B*T,) pool slots they fill; view_slots (B, C+T)
    and key_positions (B, C+T) the slots each row attends to and their positions ([context | new tokens], -1 = empty);
    query_slots (T,) = C..C+T-1, the view index of each query (what the model passes back as `slots`).
    """

    positions: torch.Tensor
    write_slots: torch.Tensor
    view_slots: torch.Tensor
    key_positions: torch.Tensor
    query_slots: torch.Tensor
    # decode through the paged kernel (no view): block tables (B, W), keys per row (B,), a static bound on them
    block_tables: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    max_context: int = 0
    # RoPE tables (B, D/2) of the new tokens for kernels that rotate q/k themselves: built with the batch, outside
    # the compiled forward, so every layer's kernel reads the same buffers (inside it, inductor rebuilt them per layer)
    rope_cos: torch.Tensor | None = None
    rope_sin: torch.Tensor | None = None

    @property
    def context(self) -> int:
        return self.view_slots.shape[1] - self.positions.shape[1]


def paged_batch(
    block_tables: torch.Tensor,  # (B, W) block ids per row (unused entries anything, e.g. 0)
    starts: torch.Tensor,  # (B,) tokens already in the cache per row = position of its first new token
    lengths: torch.Tensor,  # (B,) new tokens per row (<= T); 0 for a padding row
    T: int,  # new tokens per row, padded
    C: int,  # context slots in the view; must be >= every row's start
    block_size: int,
) -> PagedBatch:
    """Build a `PagedBatch` from block tables with tensor ops only (no host sync: capturable in a CUDA graph)."""
    device = block_tables.device
    W = block_tables.shape[1]

    def slots_of(pos: torch.Tensor) -> torch.Tensor:  # pool slot of each absolute position
        # a position outside the table (padding rows of a replayed graph may hold any) maps into the null block: a
        # stray write can never land in a live block (clamping it to the last column would overwrite that block)
        col = pos // block_size
        inside = (col >= 0) & (col < W)
        block = torch.where(inside, block_tables.gather(1, col.clamp(0, W - 1)), NULL_BLOCK)
        return block * block_size + pos % block_size

    t = torch.arange(T, device=device)
    new_pos = starts[:, None] + t  # (B, T)
    real = t < lengths[:, None]
    positions = torch.where(real, new_pos, -1)
    write = torch.where(real, slots_of(new_pos), 0)
    if C > 0:
        c = torch.arange(C, device=device).expand(len(starts), C)
        in_ctx = c < starts[:, None]
        ctx_slots = torch.where(in_ctx, slots_of(c), 0)
        view_slots = torch.cat([ctx_slots, write], 1)
        key_positions = torch.cat([torch.where(in_ctx, c, -1), positions], 1)
    else:
        view_slots, key_positions = write, positions
    return PagedBatch(positions, write.reshape(-1), view_slots, key_positions, t + C)


def paged_decode_batch(block_tables: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, block_size: int,
                       max_context: int, rope: tuple | None = None) -> PagedBatch:
    """A one-token-per-row batch for the paged decode kernel: no gathered view (C = 0; the model's mask is then
    (B, 1, 1, 1) and unused), keys per row = start + 1 (0 for padding rows). `rope` = (rotary, dtype), `rotary` the
    model's one RoPE table (`positions, dtype -> cos, sin`, a `Rotary`): also the RoPE tables of the new tokens, as
    the model computes them (only for models whose RoPE layers all share that table)."""
    batch = paged_batch(block_tables, starts, lengths, 1, 0, block_size)
    batch.block_tables = block_tables
    batch.seq_lens = torch.where(lengths > 0, starts + 1, 0)
    batch.max_context = max_context
    if rope is not None:
        rotary, dtype = rope
        cos, sin = rotary(batch.positions, dtype)  # (B, 1, 1, D/2)
        batch.rope_cos, batch.rope_sin = cos.reshape(len(cos), -1), sin.reshape(len(sin), -1)
    return batch


class PagedKVCache(nn.Module):
    """K/V pools (L, num_blocks * block_size, Hkv, D) behind the model's cache interface.

    Set `batch` (a `PagedBatch`) before each forward. `update` scatters the new keys/values into their slots and
    returns each row's gathered view (B, Hkv, C+T, D); with no context (C == 0: a fresh prefill) it returns the new
    K/V directly, no gather.
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device=None,
                 kernels: KernelOptions = DEFAULT):
        super().__init__()
        self.num_blocks, self.block_size, self.kernels = num_blocks, block_size, kernels
        self.windows = [cfg.layer_window(i) if hasattr(cfg, "layer_window") else cfg.sliding_window
                        for i in range(cfg.n_layers)]
        (hk, dk), (hv, dv) = cfg.cache_shapes  # per-head K/V, or MLA's latent and shared RoPE key
        slots = num_blocks * block_size
        zeros = {"dtype": dtype, "device": device}
        self.register_buffer("k", torch.zeros(cfg.n_layers, slots, hk, dk, **zeros), persistent=False)
        self.register_buffer("v", torch.zeros(cfg.n_layers, slots, hv, dv, **zeros), persistent=False)
        self.batch: PagedBatch | None = None
        # the decode kernels can apply RoPE themselves: half layout (Llama/NeoX) over the whole head
        self.kernel_rope = cfg.pos == "rope" and not cfg.rope_interleaved and cfg.rotary_dim == cfg.dim_per_head
        self.scale = getattr(cfg, "attn_scale", None)  # None: 1/sqrt(head_dim)
        self.softcap = getattr(cfg, "attn_logit_softcap", None)  # Gemma 2's tanh cap on the scores

    @property
    def rotates(self) -> bool:
        """Does `attend` take un-rotated q/k (and the cos/sin) for this batch? Kernel decode batches only."""
        return self.kernel_rope and self.batch is not None and self.batch.seq_lens is not None

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return cfg.n_layers * block_size * cfg.cache_values_per_token * torch.finfo(dtype).bits // 8

    def query_slots(self, slots: torch.Tensor) -> torch.Tensor:
        return slots  # the batch view's keys are indexed by position in the sequence

    def write_positions(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Key positions (B, C+T) of the batch's view. The batch numbers tokens by their index in the sequence; a
        model that shifts every position of a row by a constant (prefix/prompt methods put n virtual tokens first)
        passes its shifted `positions`, and the keys shift with them -- else a query at p + n would see the keys
        up to p + n, n tokens into its future."""
        batch = self.batch
        if positions is batch.positions:  # the runner's own tensor: nothing shifted (and no extra kernels)
            return batch.key_positions
        offset = positions[:, :1] - batch.positions[:, :1]  # (B, 1); padding rows: -1 - (-1) = 0
        return torch.where(batch.key_positions >= 0, batch.key_positions + offset, batch.key_positions)

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k/v (B, Hkv, T, D) of one layer → written to the pool; returns the view (B, Hkv, C+T, D). (k and v may
        differ in heads and dims: MLA writes its latent and shared RoPE key.)"""
        batch = self.batch
        if batch.seq_lens is not None:  # a kernel decode batch has no view: update() alone would attend to nothing
            raise RuntimeError("PagedKVCache.update on a paged-kernel decode batch; the model must call attend()")
        B, T = k.shape[0], k.shape[2]
        k_pool, v_pool = self.k[layer], self.v[layer]  # (slots, H, D)
        k_pool.index_copy_(0, batch.write_slots, k.transpose(1, 2).reshape(B * T, *k_pool.shape[1:]))
        v_pool.index_copy_(0, batch.write_slots, v.transpose(1, 2).reshape(B * T, *v_pool.shape[1:]))
        if batch.context == 0:
            return k, v
        S = batch.view_slots.shape[1]
        index = batch.view_slots.reshape(-1)
        k_all = k_pool.index_select(0, index).view(B, S, *k_pool.shape[1:]).transpose(1, 2)
        v_all = v_pool.index_select(0, index).view(B, S, *v_pool.shape[1:]).transpose(1, 2)
        return k_all, v_all

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask,
               rope: tuple[torch.Tensor, torch.Tensor] | None = None, sinks: torch.Tensor | None = None
               ) -> torch.Tensor:
        """The model hook (see `model_calls_cache_attend`): write k/v, attend q (B, H, T, D) → (B, H, T, D).
        Decode batches built by `paged_decode_batch` go through the Triton kernels; the rest gather + SDPA.
        `rope` = (cos, sin) (B, 1, 1, D/2) when `rotates`: q/k come un-rotated and the kernels rotate them.
        `sinks` (H,): attention-sink logits (GPT-OSS); the kernel has none, so the runner never sends such a model
        there (see ModelRunner._use_paged_kernel)."""
        batch = self.batch
        if batch.seq_lens is None:
            return sdpa_attend(q, *self.update(layer, None, k, v), mask, self.scale, self.softcap, sinks)
        if sinks is not None:
            raise RuntimeError("the paged decode kernel has no attention sinks; decode through the gathered view")
        from ..kernels.paged_attention import paged_decode

        if rope is None:
            cos = sin = None
        elif batch.rope_cos is not None:  # the batch's tables: the same positions, computed once per step
            cos, sin = batch.rope_cos, batch.rope_sin
        else:
            cos, sin = (t.reshape(len(t), -1) for t in rope)
        return paged_decode(q, k, v, self.k, self.v, layer, batch.write_slots, batch.block_tables, batch.seq_lens,
                            self.block_size, batch.max_context, self.windows[layer] or 0, cos, sin, self.scale or 0.0,
                            self.softcap or 0.0, self.kernels.pdl)


def model_calls_cache_attend(model) -> bool:
    """Whether `model`'s attention hands a cache that attends itself (`AttendingCache`: this pool) its attention, so
    the paged kernel can replace update + SDPA: `Attention.mix` does, for every layer of a plain `Attention` when no
    prompt method adds prefix keys/values. Latent attention (MLA) does not: it updates and attends its latents."""
    from ...models.transformer import Attention

    return getattr(model, "prompt_encoder", None) is None and all(isinstance(b.attn, Attention) for b in model.layers)
