"""What a finished generation is, whichever path made it: `Completion` from `generate()` and from `LLM.generate`
(the engine), with `TokenLogprob` entries when log-probabilities were asked for. The engine's per-step
`RequestOutput` (deltas while a request runs, for streaming) carries the same totals when it finishes."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Completion", "TokenLogprob"]


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # most likely (id, logprob), best first


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = ""  # None: no tokenizer to decode with (the engine's LLM given token ids only)
    finish_reason: str = "length"  # "stop" (eos, stop id or stop string), "length", or "error" (see `error`)
    logprobs: list[TokenLogprob] | None = None  # the engine, when asked for (`logprobs=N`)
    error: str | None = None  # finish_reason "error": what went wrong; the other prompts are unaffected
