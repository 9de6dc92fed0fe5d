"""`Completion`: the one output type of `lmforge.infer`, whichever path made it.

`generate()` and `LLM.generate` return one finished `Completion` per prompt. The engine's `step()` returns one per
request that produced something or ended: while the request runs it carries that step's deltas (`new_token_ids`,
`new_text`, `new_logprobs`; `finish_reason` None, totals None), and when it finishes the totals too (`token_ids`,
`text`, `logprobs`, `finish_reason`) — what a streaming server forwards and what `LLM` collects are the same object.
"""
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
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] | None = field(default_factory=list)  # every generated id (None while running)
    text: str | None = ""  # None: no tokenizer to decode with (the engine given token ids only), or still running
    finish_reason: str | None = None  # "stop" (eos, stop id or stop string), "length", "abort", "error"; None = running
    logprobs: list[TokenLogprob] | None = None  # the engine, when asked for (`logprobs=N`)
    error: str | None = None  # finish_reason "error": what went wrong ("ExceptionType: message"); others unaffected
    request_id: str | None = None  # the engine's request id
    new_token_ids: list[int] = field(default_factory=list)  # the engine: what this step added (streaming deltas)
    new_text: str = ""
    new_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def generated_tokens(self) -> int:
        """Tokens generated in all (0 on a running request's step output, which carries deltas only)."""
        return len(self.token_ids or ())
