"""`SamplingParams`: how each next token is picked (generate, chat, the server, eval). A module of its own, outside
`lmforge.infer` and free of torch, so the CLI's configs that extend it load without importing torch (`lmforge
--help` lists the verbs in a fraction of a second); `lmforge.infer.SamplingParams` is the same class."""
from __future__ import annotations

from pydantic import Field

from .config import Section

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
