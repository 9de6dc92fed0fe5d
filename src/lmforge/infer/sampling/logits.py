"""Sampling parameters and the logits pipeline: penalties → temperature → top-k → top-p → draw.

Each step is a pure function of a (B, V) logits tensor, so the engine, `generate()` and tests share them.
"""
from __future__ import annotations

import torch

from ...params import MIN_TEMPERATURE, SamplingParams  # noqa: F401 - SamplingParams is part of this module's API

def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits made safe to softmax: NaN and ±inf (an overflowing penalty or temperature) become the lowest / highest
    finite float, so every row keeps a finite maximum; the -inf of top-k / top-p filtering comes after this."""
    big = torch.finfo(logits.dtype).max
    return torch.nan_to_num(logits, nan=-big, posinf=big, neginf=-big)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of tokens in `seen` (B, V bool) by `penalty` (Keskar et al. 2019)."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability sums to at least p (always >= 1)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked strictly above
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: torch.Tensor,  # (B, V)
    params: SamplingParams,
    seen: torch.Tensor | None = None,  # (B, V) bool: tokens in each row's context, for the repetition penalty
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(finite_logits(logits / params.temperature), params.top_k), params.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
