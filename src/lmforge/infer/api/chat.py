"""A multi-turn chat session: history + chat template + generate(). Used by `lmforge chat` (and later the server)."""
from __future__ import annotations

from ..sampling.logits import SamplingParams
from .generate import TokenCallback, generate


class ChatSession:
    """Keeps the conversation; each turn renders the whole history with the tokenizer's chat template."""

    def __init__(self, model, tokenizer, params: SamplingParams, system: str | None = None, compile: bool = False):
        self.model, self.tokenizer, self.params, self.compile = model, tokenizer, params, compile
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict] = []

    def prompt_ids(self, user_text: str) -> list[int]:
        messages = self.system + self.history + [{"role": "user", "content": user_text}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)

    def ask(self, user_text: str, on_token: TokenCallback | None = None) -> str:
        result = generate(self.model, [self.prompt_ids(user_text)], self.params, tokenizer=self.tokenizer,
                          on_token=on_token, compile=self.compile)[0]
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": result.text}]
        return result.text

    def reset(self) -> None:
        self.history.clear()
