"""Sampling parameters and the logits pipeline: penalties → temperature → top-k → top-p → draw.

Each step is a pure function of a (B, V) logits tensor, so the engine, `generate()` and tests share them.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..config import Section

MIN_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily: dividing logits by less overflows float32 to inf (and softmax to NaN)."""


class SamplingParams(Section):
    """How to pick each next token. temperature 0 means greedy (argmax)."""

    max_new_tokens: int = Field(128, ge=1)
    """Most tokens to generate per prompt."""
    temperature: float = Field(1.0, ge=0.0)
    """Softmax temperature; 0 (or anything under 1e-5) means greedy (argmax)."""
    top_k: int = Field(0, ge=0)
    """Keep only the k most likely tokens (0 = off)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling: keep the smallest set with this much probability (1 = off)."""
    repetition_penalty: float = Field(1.0, gt=0.0)
    """CTRL-style penalty on tokens already in the context (>1 discourages repeats)."""
    stop: list[str] = []
    """Stop strings (need a tokenizer); the stop string is cut from the returned text."""
    stop_token_ids: list[int] = []
    """Extra stop token ids beside the model's and tokenizer's eos."""
    ignore_eos: bool = False
    """Keep generating past eos (benchmarks)."""
    seed: int | None = Field(None, ge=-2**63, lt=2**64)
    """Seed for sampling; the same seed and prompts give the same tokens."""

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


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
