"""The one attention function, and the mask every caller shares.

Masks are built once per forward from absolute positions, not per layer: `positions` (B, T) of the queries and
`key_positions` (B, S) of the keys, where -1 marks a padding token or an empty cache slot. This single rule covers
causal training, left-padded batches, KV-cache decoding over a static buffer and sliding windows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def allowed_keys(
    positions: torch.Tensor,  # (B, T) query positions, -1 = padding
    key_positions: torch.Tensor,  # (B, S) key positions, -1 = padding / empty slot
    query_slots: torch.Tensor,  # (T,) index of each query among the S keys
    sliding_window: int | None = None,
    document_ids: torch.Tensor | None = None,  # (B, T == S) packed rows: which document each token belongs to
    prefix_lengths: torch.Tensor | None = None,  # (B,) prefix-LM: positions below it attend bidirectionally
    chunk: int | None = None,  # chunked attention (Llama 4): keys in the query's aligned chunk of positions only
) -> torch.Tensor:
    """Boolean (B, 1, T, S): may query t attend to key s?

    A query sees real keys at or before its own position (and within the window), and in packed rows only keys of its
    own document. Prefix-LM: queries and keys both inside the prefix see each other regardless of order. A query
    always sees its own slot, so a padding query never has an empty row (an empty row gives NaN in softmax, and
    NaN * 0 still poisons real rows).
    """
    q, k = positions[:, :, None], key_positions[:, None, :]  # (B, T, 1), (B, 1, S)
    allowed = (k <= q) & (k >= 0)
    if sliding_window is not None:
        allowed &= (q - k) < sliding_window
    if chunk is not None:
        allowed &= torch.div(q, chunk, rounding_mode="floor") == torch.div(k, chunk, rounding_mode="floor")
    if prefix_lengths is not None:
        prefix = prefix_lengths.to(positions.device)[:, None, None]
        allowed |= (q >= 0) & (q < prefix) & (k >= 0) & (k < prefix)
    if document_ids is not None:
        allowed &= document_ids[:, :, None] == document_ids[:, None, :]
    own_slot = query_slots[:, None] == torch.arange(key_positions.shape[1], device=positions.device)  # (T, S)
    return (allowed | own_slot)[:, None]


def plain_causal(positions: torch.Tensor) -> bool:
    """Do these rows need nothing but causality? True when every row's positions are 0, 1, 2, ... with padding (-1)
    only after its last real token (right padding, as `collate` builds batches). Then SDPA's `is_causal` gives every
    real token exactly what `allowed_keys` would (its keys are the real tokens before it), while skipping the masked
    half of the work and never building or reading a (B, 1, T, S) mask; padding queries get finite values nobody
    reads. One host sync (False on the meta device, where shapes are traced)."""
    if positions.device.type == "meta":
        return False
    T = positions.shape[-1]
    real = positions >= 0  # (B, T)
    in_order = (positions == torch.arange(T, device=positions.device)) | ~real
    right_padded = real[:, 1:] <= real[:, :-1]  # no real token after a pad
    return bool(in_order.all() & right_padded.all())


def alibi_bias(
    allowed: torch.Tensor,  # (B, 1, T, S) bool
    positions: torch.Tensor,  # (B, T)
    key_positions: torch.Tensor,  # (B, S)
    slopes: torch.Tensor,  # (H,)
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive ALiBi bias (B, H, T, S): -slope * distance for allowed keys, -inf elsewhere."""
    distance = (positions[:, :, None] - key_positions[:, None, :]).to(torch.float32)  # (B, T, S)
    bias = -slopes.float()[None, :, None, None] * distance[:, None]
    return bias.masked_fill(~allowed, float("-inf")).to(dtype)


def with_prefix_keys(mask, n: int, positions: torch.Tensor, alibi_slopes: torch.Tensor | None = None):
    """`mask` over S own keys → the mask over [n prefix keys, S own keys], the prefix visible to every query.

    mask: None (plain causal, S == T), bool (B, 1, T, S) or an ALiBi bias (B, H, T, S); positions (B, T) of the
    queries. Under ALiBi prefix key j sits at position j: a query at position p gets -slope * (p - j)."""
    T = positions.shape[1]
    device = positions.device
    if mask is None:
        own = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        return torch.cat([torch.ones(T, n, dtype=torch.bool, device=device), own], dim=1)[None, None]
    if mask.dtype == torch.bool:
        return torch.cat([mask.new_ones(*mask.shape[:-1], n), mask], dim=-1)
    distance = (positions[:, None, :, None] - torch.arange(n, device=device)).float()  # (B, 1, T, n)
    bias = -alibi_slopes.float()[None, :, None, None] * distance
    return torch.cat([bias.to(mask.dtype), mask], dim=-1)


def document_block_mask(positions: torch.Tensor, document_ids: torch.Tensor, sliding_window: int | None = None,
                        prefix_lengths: torch.Tensor | None = None, chunk: int | None = None):
    """A flex_attention BlockMask for packed rows: causal within each document (positions restart per document,
    slots order the tokens), padding (-1) sees only itself; with `prefix_lengths` (B,) each document's first tokens
    see each other both ways. Built once per batch and shared by every layer with the same window."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        same = document_ids[b, q_idx] == document_ids[b, kv_idx]
        ok = (kv_idx <= q_idx) & same & (positions[b, kv_idx] >= 0)
        if sliding_window is not None:
            ok = ok & (q_idx - kv_idx < sliding_window)
        if chunk is not None:  # positions restart per document: chunks are counted within each document
            ok = ok & (positions[b, q_idx] // chunk == positions[b, kv_idx] // chunk)
        if prefix_lengths is not None:
            qp, kp, n = positions[b, q_idx], positions[b, kv_idx], prefix_lengths[b]
            ok = ok | (same & (qp >= 0) & (qp < n) & (kp >= 0) & (kp < n))
        return ok | (q_idx == kv_idx)

    B, T = document_ids.shape
    return create_block_mask(mask_mod, B, None, T, T, device=document_ids.device)


_compiled_flex = None


def flex_attend(q, k, v, block_mask, scale: float | None = None, softcap: float | None = None,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
    """flex_attention with a BlockMask (compiled once per process: eager flex is a slow reference path); a soft-cap
    is a score_mod on the scaled scores. With `sinks` (H,), each row's output is scaled by sigmoid(lse - sink): what
    one more softmax term exp(sink) does."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / softcap) * softcap
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if sinks is None:
        return _compiled_flex(q, k, v, **kwargs)
    out, lse = _compiled_flex(q, k, v, return_lse=True, **kwargs)
    return out * torch.sigmoid(lse - sinks.float()[None, :, None]).unsqueeze(-1).to(out.dtype)


def softcapped_attend(q, k, v, mask, scale: float | None, softcap: float) -> torch.Tensor:
    """Attention with soft-capped scores (Gemma 2), which SDPA cannot do: scores = cap * tanh(q.k * scale / cap),
    then the mask, softmax in fp32, @ v. Materializes the (B, H, T, S) scores, as transformers' eager path does.
    q (B, H, T, D), k/v (B, Hkv, S, D), mask as `attend` takes it (None: causal, T == S) → (B, H, T, D)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    qg = q.view(B, Hkv, G, T, D)  # each kv head's query group, without repeating k/v
    scores = (qg @ k[:, :, None].transpose(-1, -2)) * (D ** -0.5 if scale is None else scale)  # (B, Hkv, G, T, S)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
    if mask.dtype == torch.bool:  # (B, 1, T, S)
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    else:  # additive bias (B, H, T, S)
        scores = scores + mask.view(B, Hkv, G, T, S)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v[:, :, None]).view(B, H, T, v.shape[-1])


def attend(
    q: torch.Tensor,  # (B, H, T, D)
    k: torch.Tensor,  # (B, Hkv, S, D)
    v: torch.Tensor,  # (B, Hkv, S, Dv)
    mask,  # None → plain causal (T == S); bool (B, 1, T, S); float bias (B, H, T, S); or a flex BlockMask
    scale: float | None = None,  # q.k multiplier; None = 1/sqrt(D)
    softcap: float | None = None,  # scores → softcap * tanh(scores / softcap) before the mask (Gemma 2)
    sinks: torch.Tensor | None = None,  # (H,) attention-sink logits: one more term in each softmax denominator
) -> torch.Tensor:
    """Scaled dot-product attention with GQA/MQA: SDPA kernels, flex_attention for a BlockMask, the soft-capped
    path, or SDPA with one sink key. (B, H, T, Dv)."""
    B, H, T, D = q.shape
    groups = H // k.shape[1]
    if mask is not None and not isinstance(mask, torch.Tensor):
        return flex_attend(q, k, v, mask, scale, softcap, sinks)
    if softcap is not None and sinks is not None:
        raise NotImplementedError("attention with both soft-capped scores and sinks")
    if softcap is not None:
        return softcapped_attend(q, k, v, mask, scale, softcap)
    if sinks is not None:
        return _attend_with_sinks(q, k, v, mask, scale, sinks)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1, scale=scale)
    if groups > 1 and mask.dtype == torch.bool:
        # Fold each KV head's query group into the sequence axis: (B, Hkv, G*T, D). K/V are never copied, and every
        # SDPA backend accepts it (decode attends over the whole cache each step, so a K/V repeat would be costly).
        q = q.reshape(B, H // groups, groups * T, D)
        mask = mask[:, :, None].expand(B, 1, groups, T, mask.shape[-1]).reshape(B, 1, groups * T, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.reshape(B, H, T, v.shape[-1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1, scale=scale)


def _attend_with_sinks(q, k, v, mask, scale, sinks) -> torch.Tensor:
    """Softmax over [scores | sink_h] (GPT-OSS): one extra key per head whose logit is the sink (a zero key plus a
    bias) and whose value is zero, so it only enlarges the denominator. Still one SDPA call."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    if mask is None:  # plain causal, T == S
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()[None, None]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    mask = mask.expand(mask.shape[0], H, T, S)
    sink = sinks.to(q.dtype).view(1, H, 1, 1).expand(mask.shape[0], H, T, 1)
    k = torch.cat([k, k.new_zeros(*k.shape[:2], 1, k.shape[-1])], 2)
    v = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[-1])], 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.cat([mask, sink], -1), scale=scale,
                                          enable_gqa=H != k.shape[1])
