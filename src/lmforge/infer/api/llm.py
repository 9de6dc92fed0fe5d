"""Offline batch inference on the serving engine: `LLM(model).generate(prompts, params)`.

    llm = LLM("./ckpt")                       # a checkpoint directory, .gguf file or Hugging Face id (or a loaded
                                              # Transformer + tokenizer, e.g. from checkpoint.load_model_and_tokenizer)
    outs = llm.generate(["Hello", "Bonjour"], SamplingParams(temperature=0, max_new_tokens=32))  # Completions
    print(outs[0].text)

Every prompt becomes an engine request; the engine batches them continuously, so prompts of very different lengths
cost what they need, not what the longest one needs.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ...checkpoint import load_model_and_tokenizer
from ...errors import ConfigError, LmforgeError
from ...models.transformer import Transformer
from ..engine.core import Engine, EngineConfig
from ..sampling.logits import SamplingParams
from .outputs import Completion


class LLM:
    """A model plus an engine, for generating many completions at once."""

    def __init__(self, model: str | Path | Transformer, tokenizer=None, *, config: EngineConfig | None = None,
                 adapters: dict[str, str] | None = None, device: str = "auto", dtype: str = "auto", **engine_kwargs):
        if not isinstance(model, Transformer):
            model, loaded_tok = load_model_and_tokenizer(model, device, dtype)
            tokenizer = tokenizer or loaded_tok
        if engine_kwargs:
            config = (config or EngineConfig()).model_copy(update=engine_kwargs)
            config = EngineConfig.model_validate(config.model_dump())
        self.engine = Engine(model, tokenizer, config, adapters)
        self.tokenizer = tokenizer

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 adapter: str | None | Sequence[str | None] = None) -> list[Completion]:
        """Complete every prompt (text needs a tokenizer; token id lists pass through); outputs in prompt order.
        `params` and `adapter` may be one value for all prompts or one per prompt."""
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self._encode(p) for p in prompts]
        n = len(ids)
        params = list(params) if isinstance(params, (list, tuple)) else [params] * n
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        if len(params) != n or len(adapters) != n:
            raise ConfigError(f"got {n} prompts but {len(params)} params and {len(adapters)} adapters; "
                              "give one value or one per prompt")
        engine = self.engine
        order = [engine.add_request(p, sp, adapter=a) for p, sp, a in zip(ids, params, adapters)]
        done, wanted = {}, set(order)
        try:
            while len(done) < n:
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                if not engine.has_unfinished() and len(done) < n:
                    raise LmforgeError("the engine stopped with requests unfinished")  # a bug, never expected
        except BaseException:
            for rid in order:
                engine.abort(rid)
            raise
        return [done[r] for r in order]

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("text prompts need a tokenizer; pass token ids or LLM(model, tokenizer)")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]
