"""`generate()`: batched prompts with left padding, a static KV cache, the sampler, stop rules, streaming.

The decode step has static shapes (one token per row, whole-cache attention with a mask), so with `compile=True` it
runs under `torch.compile(mode="reduce-overhead")`, i.e. as a replayed CUDA graph on GPU.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..models.transformer import Transformer
from .sampling import SamplingParams, sample

TokenCallback = Callable[[int, "int | None", str], None]  # (row, token_id, new text); None id = final text flush


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (eos, stop id or stop string) or "length"


class _StopText:
    """Incremental detokenization of one row, with stop strings found across token boundaries.

    Text that could still become a stop string is held back, so a streamed piece never shows part of a stop string.
    """

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.decoder = tokenizer.stream_decoder()
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0  # chars of self.text already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text now safe to show, whether a stop string completed)."""
        before = len(self.text)
        self.text += self.decoder.step(token_id)
        hits = [at for s in self.stops if (at := self.text.find(s, max(0, before - len(s) + 1))) != -1]
        if hits:  # the earliest in the text wins, whatever the order of the stop strings
            self.text = self.text[:min(hits)]
            return self.flush(), True
        held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        piece = self.text[self.emitted:len(self.text) - held]
        self.emitted += len(piece)
        return piece, False

    def flush(self) -> str:
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece


def _decode_step(model: Transformer, compile: bool) -> Callable:
    def step(tokens, positions, cache, slots):
        return model(tokens, positions, cache=cache, slots=slots)[:, -1]

    if not compile:
        return step
    return torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    *,
    tokenizer=None,
    on_token: TokenCallback | None = None,
    compile: bool = False,
) -> list[Completion]:
    """Complete each prompt (a list of token ids). Stops at eos (model config + tokenizer), stop ids/strings, or
    max_new_tokens; `on_token(row, token_id, text)` streams every generated token as it is chosen."""
    params = params or SamplingParams()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("generate needs at least one non-empty prompt (--prompt TEXT, or text on stdin)")
    if params.stop and tokenizer is None:
        raise ConfigError("stop strings need a tokenizer: pass tokenizer=...")
    device = model.embed.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    if P + params.max_new_tokens > model.cfg.max_seq_len and model.cfg.pos == "learned":
        raise ConfigError(f"prompt ({P}) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
                          f"learned positions ({model.cfg.max_seq_len}): lower max_new_tokens")

    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids |= set(model.cfg.stop_token_ids)
        if tokenizer is not None:
            stop_ids |= set(tokenizer.stop_ids())

    pad = model.cfg.pad_token_id or 0
    tokens = torch.full((B, P), pad, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p, dtype=torch.long)  # left padding keeps every row's end aligned
    lengths = torch.tensor([len(p) for p in prompts])
    positions = torch.arange(P) - (P - lengths)[:, None]
    positions = positions.masked_fill(positions < 0, -1).to(device)
    tokens = tokens.to(device)

    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, tokens, positions >= 0)

    cache = model.new_cache(B, P + params.max_new_tokens)
    step = _decode_step(model, compile)
    if compile:
        for buf in (cache.k, cache.v, cache.key_positions):
            torch._dynamo.mark_static_address(buf)
    logits = model(tokens, positions, cache=cache, slots=torch.arange(P, device=device))[:, -1]

    decode_slots = torch.arange(P, P + params.max_new_tokens, device=device)  # no host→device copy per step
    results = [Completion(prompt_ids=list(p)) for p in prompts]
    texts = [_StopText(tokenizer, params.stop) for _ in prompts] if tokenizer is not None else None
    done = [False] * B
    next_pos = positions[:, -1:] + 1  # (B, 1)
    for t in range(params.max_new_tokens):
        next_tok = sample(logits, params, seen, generator)  # (B,)
        chosen = next_tok.tolist()
        for i in range(B):
            if done[i]:
                continue
            r = results[i]
            if chosen[i] in stop_ids:
                r.finish_reason, done[i] = "stop", True
                continue
            r.token_ids.append(chosen[i])
            piece = ""
            if texts is not None:
                piece, stop_str = texts[i].push(chosen[i])
                if stop_str:
                    r.finish_reason, done[i] = "stop", True
            if on_token is not None:
                on_token(i, chosen[i], piece)
        if all(done) or t == params.max_new_tokens - 1:
            break
        if seen is not None:
            seen.scatter_(1, next_tok[:, None], True)
        logits = step(next_tok[:, None], next_pos, cache, decode_slots[t:t + 1])
        next_pos = next_pos + 1
    for i, r in enumerate(results):
        if texts is not None:
            rest = texts[i].flush()  # text held back for a stop string that never came
            if rest and on_token is not None:
                on_token(i, None, rest)
            r.text = texts[i].text
    return results
