"""Conversation memory for chat chains: what earlier turns a new request carries.

- `BufferMemory`: the last `max_turns` user/assistant exchanges, verbatim.
- `SummaryMemory`: the last `keep_turns` exchanges verbatim; older ones are folded by the model into a running
  summary that goes first, as a system message, so a long conversation keeps its facts in a bounded prompt.
"""
from __future__ import annotations

from .llm import ChatModel

SUMMARY_PROMPT = """Update the summary of a conversation with the new lines. Keep every name, number and decision; \
drop small talk. Reply with the new summary only.

Current summary:
{summary}

New lines:
{lines}"""


class BufferMemory:
    def __init__(self, max_turns: int | None = None):
        self.max_turns = max_turns
        self.turns: list[tuple[str, str]] = []  # (user, assistant)

    def add(self, user: str, assistant: str) -> None:
        self.turns.append((user, assistant))
        if self.max_turns is not None:
            self.turns = self.turns[-self.max_turns:] if self.max_turns else []

    def messages(self) -> list[dict]:
        return [m for u, a in self.turns for m in ({"role": "user", "content": u},
                                                   {"role": "assistant", "content": a})]

    def clear(self) -> None:
        self.turns = []


class SummaryMemory(BufferMemory):
    def __init__(self, llm: ChatModel, keep_turns: int = 2, max_summary_tokens: int = 256):
        super().__init__()
        self.llm, self.keep_turns, self.max_summary_tokens = llm, keep_turns, max_summary_tokens
        self.summary = ""

    def add(self, user: str, assistant: str) -> None:
        super().add(user, assistant)
        if len(self.turns) > self.keep_turns:
            cut = len(self.turns) - self.keep_turns
            old, self.turns = self.turns[:cut], self.turns[cut:]
            lines = "\n".join(f"User: {u}\nAssistant: {a}" for u, a in old)
            prompt = SUMMARY_PROMPT.format(summary=self.summary or "(empty)", lines=lines)
            reply = self.llm.chat([{"role": "user", "content": prompt}], temperature=0.0,
                                  max_tokens=self.max_summary_tokens)
            self.summary = reply.content.strip()

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": f"Summary of the conversation so far: {self.summary}"}] \
            if self.summary else []
        return head + super().messages()

    def clear(self) -> None:
        super().clear()
        self.summary = ""
