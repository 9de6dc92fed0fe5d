"""`generate()`: batched prompts with left padding, a static KV cache, the sampler, stop rules, streaming.

This is the simple reference path: one batch, one `SamplingParams` for every row, a cache sized for the longest
prompt, decoded in lock step until every row stops. `lmforge generate`/`chat` and eval use it, and the tests check
the engine against it. Serving, many requests of different lengths, per-request settings (penalties, logprobs, JSON
mode, adapters) and paged memory are the engine's (`lmforge.infer.engine`, `LLM`); both return `Completion` and
share the stop handling of `lmforge.infer.sampling.stops`.

The decode step has static shapes (one token per row, whole-cache attention with a mask), so with `compile=True` it
runs under `torch.compile(mode="reduce-overhead")`, i.e. as a replayed CUDA graph on GPU.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ...errors import ConfigError
from ...models.transformer import Transformer
from ..sampling.logits import SamplingParams, sample
from ..sampling.stops import StopText
from .outputs import Completion

TokenCallback = Callable[[int, "int | None", str], None]  # (row, token_id, new text); None id = final text flush


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
    """Complete each prompt (a list of token ids): the simple reference path (see the module docstring; the engine
    is the serving path). Stops at eos (model config + tokenizer), stop ids/strings, or max_new_tokens;
    `on_token(row, token_id, text)` streams every generated token as it is chosen."""
    params = params or SamplingParams()
    if params.engine_only():
        raise ConfigError(f"{', '.join(params.engine_only())}: served by the engine only, not by generate() (the "
                          "simple reference path); use lmforge.infer.LLM or lmforge serve, or leave the default")
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
    texts = [StopText(tokenizer, params.stop) for _ in prompts] if tokenizer is not None else None
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
        r.finish_reason = r.finish_reason or "length"
        if texts is not None:
            rest = texts[i].flush()  # text held back for a stop string that never came
            if rest and on_token is not None:
                on_token(i, None, rest)
            r.text = texts[i].text
    return results
