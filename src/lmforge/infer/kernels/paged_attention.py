"""Paged decode attention in Triton: each sequence's one new query attends straight over its KV blocks.

The gather path (`PagedKVCache.update`) copies every row's context into a dense (B, Hkv, C, D) view per layer, then
runs SDPA over it with a mask: about three passes over the K/V and padding up to the longest row. This kernel reads
each K/V slot once, through the block table, and stops at each row's own length.

Grid: (sequence, kv head, split). A program loads the G query heads that share its kv head, walks its share of the
context CHUNK tokens at a time (online softmax, fp32 accumulators), and either writes the normalized output or, when
the context is split across programs to fill the GPU (small batches, long contexts), partial (max, sum, acc)
that the last of the row's programs to finish merges (an arrival counter per row and kv head, so no second
launch). Rows with length 0 (padding rows of a CUDA-graph bucket) produce zeros. In the decode op the program
holding a row's newest key position also writes the new K/V (no write launch either), attending over them from
registers; under programmatic dependent launch each program loads its first chunk of older keys and values before
waiting for the kernel that produced q.

Scale 1/sqrt(D) or the model's (Gemma: query_pre_attn_scalar); supports GQA/MQA, sliding windows and tanh soft-capped
scores (Gemma 2); no ALiBi (that path keeps SDPA).
Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (how the tests check it without a GPU).
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None  # CPU wheels of torch ship without it
CHUNK = 64  # context tokens per inner-loop iteration


def kernel_available(device: torch.device) -> bool:
    return HAS_TRITON and (device.type == "cuda" or interpreter_active())


def interpreter_active() -> bool:
    """TRITON_INTERPRET=1 and triton really in interpreter mode: triton decides per function when it is decorated,
    so a triton imported before the variable was set runs its own library (tl.zeros, ...) compiled, and an
    interpreted kernel calling it fails ("Cannot call @triton.jit'd outside of the scope of a kernel")."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    lang = sys.modules.get("triton.language")
    if lang is None:
        return True  # triton gets imported later, under the interpreter
    return type(getattr(lang, "zeros", None)).__name__ == "InterpretedFunction"


_KERNEL = None


def load_kernel():
    """The jitted kernel module, imported on first use (importing triton reads TRITON_INTERPRET)."""
    global _KERNEL
    if _KERNEL is None:
        from . import paged_attention_kernel

        _KERNEL = paged_attention_kernel
    return _KERNEL


def choose_splits(batch: int, kv_heads: int, max_context: int, target_programs: int = 264) -> int:
    """Split long contexts across programs when batch * kv_heads alone would leave the GPU idle: at batch 1 a
    program walking the whole context chunk after chunk is latency-bound (each chunk waits on its loads), so
    splits go down to one CHUNK each; merging the partials costs the last program of each row a few loads."""
    if batch * kv_heads >= target_programs:
        return 1
    return max(1, min(math.ceil(target_programs / (batch * kv_heads)), math.ceil(max_context / CHUNK), 64))


def paged_decode_attention(
    q: torch.Tensor,  # (B, H, 1, D) one query per row
    k_pool: torch.Tensor,  # (slots, Hkv, D) this layer's keys (new ones already written, unless new_kv)
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,  # (B, W) int
    seq_lens: torch.Tensor,  # (B,) keys per row = position of the query + 1; 0 for a padding row
    block_size: int,
    max_context: int,  # an upper bound of seq_lens (static per CUDA graph): sizes the splits
    window: int | None = None,
    splits: int | None = None,
    cos: torch.Tensor | None = None,  # (B, D/2): rotate q (RoPE, half layout) as it is loaded
    sin: torch.Tensor | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # k, v (B, Hkv, 1, D), slots (B,)
    scale: float | None = None,  # q.k multiplier; None = 1/sqrt(D)
    softcap: float | None = None,  # scores -> softcap * tanh(scores / softcap) before the softmax (Gemma 2)
    pdl: bool = True,  # programmatic dependent launch where the GPU has it (`KernelOptions.pdl`)
) -> torch.Tensor:
    """softmax(q k^T * scale) v over each row's first seq_lens keys (and within `window`): (B, H, 1, D).

    `new_kv` = (k, v, slots): write each row's new key (rotated too, with cos/sin) and value at its slot (the slot
    of key position seq_lens - 1), inside the same launch; the pool's old entry there is never read."""
    B, H, T, D = q.shape
    Hkv = k_pool.shape[1]
    G = H // Hkv
    splits = splits or choose_splits(B, Hkv, max_context)
    per_split = -(-max(max_context, 1) // splits)
    per_split = -(-per_split // CHUNK) * CHUNK
    q2 = q.reshape(B, H, D)
    if q2.stride(-1) != 1:
        q2 = q2.contiguous()
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    acc = stats = arrived = out  # unused when splits == 1
    if splits > 1:
        acc = torch.empty(B, Hkv, splits, G, D, dtype=torch.float32, device=q.device)
        stats = torch.empty(B, Hkv, splits, G, 2, dtype=torch.float32, device=q.device)
        arrived = arrival_counters(_ARRIVALS, q.device, B * Hkv)
    k_new = v_new = slots = q2
    stride_nb = stride_nh = 0
    if new_kv is not None:
        k_new, v_new = new_kv[0][:, :, 0], new_kv[1][:, :, 0]  # (B, Hkv, D) views
        if k_new.stride(-1) != 1 or v_new.stride() != k_new.stride():
            k_new, v_new = k_new.contiguous(), v_new.contiguous()
        slots, stride_nb, stride_nh = new_kv[2], k_new.stride(0), k_new.stride(1)
    kernel = _KERNEL or load_kernel()
    rope = cos is not None
    kernel.paged_decode_kernel[(B, Hkv, splits)](
        q2, k_pool, v_pool, block_tables, seq_lens, out, acc, stats, cos if rope else q2, sin if rope else q2,
        k_new, v_new, slots, arrived,
        scale or 1.0 / math.sqrt(D), q2.stride(0), q2.stride(1), k_pool.stride(0), k_pool.stride(1),
        block_tables.stride(0), stride_nb, stride_nh, per_split, window or 0, softcap or 1.0,
        G=G, GP=max(16, kernel.next_power_of_2(G)), D=D, DP=max(16, kernel.next_power_of_2(D)),
        BLOCK_SIZE=block_size, CHUNK=CHUNK, SPLITS=splits, IEEE=q2.dtype == torch.float32, ROPE=rope,
        WRITE_KV=new_kv is not None, SOFTCAP=bool(softcap), **_pdl(q2, pdl),
    )
    return out[:, :, None]


_ARRIVALS: dict[torch.device, torch.Tensor] = {}


def arrival_counters(pool: dict, device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters that a kernel's programs count their arrivals on (here: the split programs of one
    (row, kv head)); the last to arrive resets its counter, so one buffer per `pool` and device serves every launch
    (and every replay of a captured graph). Allocated on first use, which is an eager warm-up before any capture."""
    buf = pool.get(device)
    if buf is None or buf.numel() < n:
        buf = pool[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


def _pdl(x: torch.Tensor, pdl: bool) -> dict:
    from .gemv import pdl_options  # (gemv imports this module)

    return pdl_options(x.device, pdl)


@torch.library.custom_op("lmforge::paged_decode", mutates_args=("k_pools", "v_pools"))
def paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pools: torch.Tensor, v_pools: torch.Tensor,
                 layer: int, slots: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 block_size: int, max_context: int, window: int, cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None, scale: float = 0.0, softcap: float = 0.0, pdl: bool = True
                 ) -> torch.Tensor:
    """One layer's decode attention over the paged cache, new K/V written first: q (B, H, 1, D), k/v (B, Hkv, 1, D),
    pools (L, slots, Hkv, D) of every layer, slots (B,) where each row's new key goes (its key position
    seq_lens - 1) → (B, H, 1, D). One launch: the program holding a row's last position writes the new K/V, and
    split contexts are merged by their last program. With cos/sin (B, D/2), q and k come un-rotated and the kernel
    applies RoPE as it loads them. `scale` 0 = 1/sqrt(D); `softcap` 0 = none; `pdl` = `KernelOptions.pdl`.

    A custom op that mutates the pools in place, so torch.compile calls it as is: traced as plain ops, the scatter
    into a slice of the (L, slots, ...) buffers made inductor clone and copy back whole pools every step."""
    return paged_decode_attention(q, k_pools[layer], v_pools[layer], block_tables, seq_lens, block_size,
                                  max_context, window or None, cos=cos, sin=sin, new_kv=(k, v, slots),
                                  scale=scale or None, softcap=softcap or None, pdl=pdl)


@paged_decode.register_fake
def _(q, k, v, k_pools, v_pools, layer, slots, block_tables, seq_lens, block_size, max_context, window, cos=None,
      sin=None, scale=0.0, softcap=0.0, pdl=True):
    return torch.empty_like(q)
