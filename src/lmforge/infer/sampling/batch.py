"""Per-request sampling for a whole batch at once, on the device: penalties → temperature → top-k → top-p → draw.

`generate()` samples a batch with one `SamplingParams`; the engine batches requests that each bring their own, so
every knob becomes a (B,) tensor and the pipeline of `lmforge.infer.sampling.logits` runs row-wise with no host sync
(a multi-step decode feeds the drawn tokens straight back into the next step). Draws use the exponential-race trick,
argmax(p / E) with E ~ Exp(1), which samples from p; a seeded request draws its noise from its own generator, so
its tokens do not depend on what it was batched with.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .logits import finite_logits


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, V) → (B,) indices of each row's first maximum, as `x.argmax(-1)`, in two stages: PyTorch's one-pass
    reduction spreads a single 128k-wide row over a handful of thread blocks (30 µs on an H100, 3% of a 1B model's
    decode step); as (B, chunks, V / chunks) it fills the GPU, then a (B, chunks) argmax picks the chunk."""
    B, V = x.shape
    chunks = next((c for c in (256, 128, 64, 32) if V % c == 0 and V // c >= 64), 1)
    if chunks == 1:
        return x.argmax(-1)
    values, index = x.view(B, chunks, V // chunks).max(-1)  # (B, chunks): each chunk's first maximum
    best = values.argmax(-1, keepdim=True)  # (B, 1): the first chunk holding the row's maximum
    return best[:, 0] * (V // chunks) + index.gather(1, best)[:, 0]


@dataclass
class SampleResult:
    tokens: torch.Tensor  # (B,) chosen ids
    logprob: torch.Tensor | None = None  # (B,) log-probability of the chosen id under the model
    top_ids: torch.Tensor | None = None  # (B, n) most likely ids
    top_logprobs: torch.Tensor | None = None  # (B, n)


class BatchSampler:
    """Samples the next token of each row of a batch of requests (objects with `.params`, `.token_ids`,
    `.num_prompt`, `.generator`); keeps penalty state on the device across the steps of a multi-step decode."""

    def __init__(self, rows: Sequence, vocab_size: int, device: torch.device, constraints: dict | None = None):
        self.rows, self.V, self.device = rows, vocab_size, device
        params = [r.params for r in rows]
        self.constraints = constraints or {}  # row -> callable(scores (V,), greedy, generator, token) -> token
        f32 = dict(dtype=torch.float32, device=device)
        self.greedy_all = all(p.greedy for p in params)
        self.greedy = torch.tensor([p.greedy for p in params], device=device)
        self.temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params], **f32)
        ks = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]
        self.max_k = max(ks, default=0)
        self.top_k = torch.tensor(ks, device=device) if self.max_k else None
        self.top_p = torch.tensor([p.top_p for p in params], **f32) if any(p.top_p < 1 for p in params) else None
        self.generators = [(i, r.generator) for i, (r, p) in enumerate(zip(rows, params))
                           if r.generator is not None and not p.greedy]
        self.n_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=None)

        self.seen = self.counts = None  # penalty state (set below when a row asks for penalties)
        if any(p.repetition_penalty != 1.0 for p in params):  # prompt and output tokens, as generate() does
            self.repetition = torch.tensor([p.repetition_penalty for p in params], **f32)[:, None]
            self.seen = self._scatter([r.token_ids for r in rows], torch.bool)
        if any(p.presence_penalty or p.frequency_penalty for p in params):  # output tokens only (OpenAI)
            self.presence = torch.tensor([p.presence_penalty for p in params], **f32)[:, None]
            self.frequency = torch.tensor([p.frequency_penalty for p in params], **f32)[:, None]
            self.counts = self._scatter([r.token_ids[r.num_prompt:] for r in rows], torch.float32)

    @property
    def plain_greedy(self) -> bool:
        """Every row takes the argmax of the raw logits (no penalties, logprobs or constraints) and nothing is kept
        between steps: a decode graph may sample by itself (`ModelRunner.decode`)."""
        return (self.greedy_all and self.seen is None and self.counts is None and not self.constraints
                and self.n_logprobs is None)

    def _scatter(self, ids: list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        """(B, V) counts (or presence) of the given token ids per row."""
        out = torch.zeros(len(ids), self.V, dtype=torch.float32, device=self.device)
        rows = torch.tensor([i for i, row in enumerate(ids) for _ in row], dtype=torch.long)
        cols = torch.tensor([t for row in ids for t in row], dtype=torch.long)
        if len(cols):
            out.index_put_((rows.to(self.device), cols.to(self.device)), torch.ones(len(cols), device=self.device),
                           accumulate=True)
        return out.to(dtype) if dtype == torch.float32 else out > 0

    def penalized(self, logits: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        if self.seen is not None:
            x = torch.where(self.seen, torch.where(x > 0, x / self.repetition, x * self.repetition), x)
        if self.counts is not None:
            x = x - self.frequency * self.counts - self.presence * (self.counts > 0)
        return x

    def filtered(self, x: torch.Tensor) -> torch.Tensor:
        """Temperature, then per-row top-k and top-p on penalized logits (B, V); filtered entries are -inf."""
        x = finite_logits(x / self.temperature[:, None])
        if self.top_k is not None:
            kth = x.topk(self.max_k, dim=-1).values.gather(1, (self.top_k.clamp(min=1) - 1)[:, None])
            kth = torch.where(self.top_k[:, None] > 0, kth, float("-inf"))
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p is not None:
            sorted_x, order = x.sort(dim=-1, descending=True)
            probs = sorted_x.softmax(-1)
            drop = (probs.cumsum(-1) - probs) >= self.top_p[:, None]
            drop[:, 0] = False
            drop &= (self.top_p < 1)[:, None]
            x = x.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
        return x

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        noise = torch.empty_like(probs).exponential_()
        for i, g in self.generators:
            noise[i].exponential_(generator=g)
        return (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(-1)

    def __call__(self, logits: torch.Tensor) -> SampleResult:
        """Next tokens for logits (B, V); updates the penalty state with them."""
        x = self.penalized(logits)
        if self.greedy_all:
            tokens, probs = argmax_rows(x), None
        else:
            probs = self.filtered(x).softmax(-1)
            tokens = torch.where(self.greedy, x.argmax(-1), self.draw(probs))
        if self.constraints:
            tokens = self._constrain(tokens, x, probs)
        result = SampleResult(tokens)
        if self.n_logprobs is not None:
            logp = logits.float().log_softmax(-1)
            result.logprob = logp.gather(1, tokens[:, None])[:, 0]
            if self.n_logprobs > 0:
                result.top_logprobs, result.top_ids = logp.topk(self.n_logprobs, dim=-1)
        self.observe(tokens)
        return result

    def _constrain(self, tokens: torch.Tensor, x: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
        """Let each constrained row replace its token by an allowed one (host side; constrained rows decode k=1)."""
        chosen = tokens.tolist()
        for i, pick in self.constraints.items():
            greedy = bool(self.greedy[i])
            scores = x[i] if greedy or probs is None else probs[i]
            chosen[i] = pick(scores, greedy, self.rows[i].generator, chosen[i])
        return torch.tensor(chosen, device=tokens.device)

    def observe(self, tokens: torch.Tensor) -> None:
        """Count freshly drawn tokens (B,) for the penalties of the next step."""
        rows = torch.arange(len(tokens), device=tokens.device)
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if self.counts is not None:
            self.counts[rows, tokens] += 1
