"""The model behind an evaluation: one small seam, so the serving engine can replace `generate()` later.

An evaluator only needs three things from a model: complete a batch of prompts, score continuations (log-likelihood)
and score a long token stream (perplexity). `LocalModel` does them in process with lmforge's `generate()` and the
native Transformer; anything with the same methods (e.g. an engine- or server-backed model) can stand in.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from ..infer import SamplingParams, generate


class EvalModel(Protocol):
    tokenizer: object

    def complete(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[str]:
        """Generated text for each prompt (token ids)."""

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[float]:
        """Sum of log p(continuation | context) for each (context ids, continuation ids)."""

    def rolling_nll(self, ids: Sequence[int], window: int, stride: int) -> tuple[float, int]:
        """(summed negative log-likelihood, tokens scored) of a long stream, sliding a window."""


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_new) windows over a stream as in the Hugging Face perplexity guide: each window is at most
    `window` tokens, starts `stride` after the previous one, and scores only its last `n_new` tokens (those no
    earlier window scored), so every token but the first is scored exactly once with up to window-1 tokens of
    context."""
    if window < 2 or stride < 1 or stride > window:
        raise ValueError(f"perplexity needs window >= 2 and 1 <= stride <= window (got window={window}, "
                         f"stride={stride})")
    out, prev_end = [], 1  # token 0 has no context and is never scored
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        if end > prev_end:
            out.append((begin, end, end - prev_end))
            prev_end = end
        if end == n_tokens:
            break
    return out


class LocalModel:
    """An lmforge Transformer + Tokenizer evaluated in this process; `batch_size` rows per forward."""

    def __init__(self, model, tokenizer, batch_size: int = 8, compile: bool = False):
        self.model, self.tokenizer, self.batch_size, self.compile = model.eval(), tokenizer, batch_size, compile

    @classmethod
    def load(cls, path: str | Path, adapter: str | None = None, device: str = "auto", dtype: str = "auto",
             batch_size: int = 8, chat_template: str | None = None, revision: str | None = None) -> LocalModel:
        """A checkpoint directory, .gguf file or Hugging Face id, with any lmforge/PEFT adapter applied."""
        from ..checkpoint import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(path, device, dtype, chat_template, require_tokenizer=True,
                                                    adapter=adapter, revision=revision)
        return cls(model, tokenizer, batch_size)

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    def complete(self, prompts, params: SamplingParams) -> list[str]:
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths pad less
        out: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            results = generate(self.model, [prompts[i] for i in idx], params, tokenizer=self.tokenizer,
                               compile=self.compile)
            for i, r in zip(idx, results):
                out[i] = r.text
        return out

    @torch.inference_mode()
    def _score(self, rows: list[list[int]], targets_from: list[int]) -> list[float]:
        """Sum of log p(row[t] | row[:t]) for t >= targets_from[i], each row scored in one forward."""
        B, T = len(rows), max(len(r) for r in rows)
        tokens = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: real tokens keep positions 0..len-1
            tokens[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        hidden = self.model.hidden_states(tokens, attention_mask=mask)  # (B, T, d)
        sums = []
        for i, r in enumerate(rows):
            pos = torch.arange(targets_from[i] - 1, len(r) - 1, device=self.device)  # predicting row[t] at t-1
            logp = F.log_softmax(self.model.logits(hidden[i, pos]).float(), dim=-1)  # (n, V)
            tgt = tokens[i, pos + 1]
            sums.append(float(logp.gather(1, tgt[:, None]).sum()))
        return sums

    def loglikelihood(self, requests) -> list[float]:
        rows = [list(c) + list(x) for c, x in requests]
        starts = [len(c) for c, _ in requests]
        for (c, x) in requests:
            if not c or not x:
                raise ValueError("log-likelihood needs a non-empty context and continuation")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out = [0.0] * len(rows)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            for i, v in zip(idx, self._score([rows[i] for i in idx], [starts[i] for i in idx])):
                out[i] = v
        return out

    def rolling_nll(self, ids, window: int, stride: int) -> tuple[float, int]:
        ids = list(ids)
        wins = sliding_windows(len(ids), window, stride)
        total, count = 0.0, 0
        for s in range(0, len(wins), self.batch_size):
            batch = wins[s:s + self.batch_size]
            rows = [ids[b:e] for b, e, _ in batch]
            starts = [len(r) - new for r, (_, _, new) in zip(rows, batch)]
            total -= sum(self._score(rows, starts))
            count += sum(new for _, _, new in batch)
        return total, count


def perplexity(nll_sum: float, n_tokens: int) -> float:
    return math.exp(nll_sum / max(n_tokens, 1))
