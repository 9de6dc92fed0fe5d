"""`SamplingParams`: how each next token is picked and when a sequence stops — the one parameter class of
`generate()`, the engine, `LLM`, the server and eval. A module of its own, outside `lmforge.infer` and free of torch,
so the CLI's configs that extend it load without importing torch (`lmforge --help` lists the verbs in a fraction of
a second); `lmforge.infer.SamplingParams` is the same class."""
from __future__ import annotations

from pydantic import Field

from .config import Section

MIN_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily: dividing logits by less overflows float32 to inf (and softmax to NaN)."""


class SamplingParams(Section):
    """How to pick each next token. temperature 0 means greedy (argmax). The last four fields (OpenAI-style penalties,
    logprobs, JSON mode) are served by the engine (`LLM`, `lmforge serve`); `generate()`, the simple reference path,
    refuses them."""

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
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """Engine only (LLM, lmforge serve): subtracted from the logit of every token already generated (OpenAI
    semantics; >0 discourages repeats)."""
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """Engine only: subtracted once per earlier occurrence of a token in the generated text."""
    logprobs: int | None = Field(None, ge=0, le=20)
    """Engine only: return the chosen token's log-probability and this many most likely alternatives (None = off)."""
    json_object: bool = False
    """Engine only: constrain the output to one JSON object that parses (needs a tokenizer)."""

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def engine_only(self) -> list[str]:
        """The fields set away from their defaults that only the engine serves (see the class docstring)."""
        return [f for f in ENGINE_ONLY if getattr(self, f) != type(self).model_fields[f].default]


ENGINE_ONLY = ("presence_penalty", "frequency_penalty", "logprobs", "json_object")
