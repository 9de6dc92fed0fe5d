"""Chains: retrieval QA with cited sources, map-reduce summarization, and a chat with memory — each a few model
calls over any `ChatModel` (an OpenAI-compatible endpoint, lmforge's own server by default).

Retrieval QA numbers the retrieved chunks [1]..[k] in the prompt, asks for bracketed citations, and maps the
numbers in the answer back to the chunks (`Answer.cited`). With no chunk above the relevance thresholds it answers
`no_answer` without calling the model: nothing to ground an answer in.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .chunking import TokenCounter, chunk_text, simple_token_count
from .llm import ChatModel
from .memory import BufferMemory
from .prompts import PromptTemplate
from .retrieval import Hit, Retriever

QA_SYSTEM = ("Answer the question using only the numbered sources. After each statement, cite the sources it comes "
             "from as [1], [2]. If the sources do not contain the answer, say that you do not know.")
QA_USER = PromptTemplate("Sources:\n{sources}\n\nQuestion: {question}")
NO_ANSWER = "I could not find anything about that in the documents."

_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def format_sources(hits: Sequence[Hit]) -> str:
    return "\n\n".join(f"[{i}] ({h.citation})\n{h.text}" for i, h in enumerate(hits, start=1))


def qa_messages(question: str, hits: Sequence[Hit], history: Sequence[dict] = (), system: str = QA_SYSTEM,
                template: PromptTemplate = QA_USER) -> list[dict]:
    """The chat messages of a retrieval-QA request (also what the chat page's RAG toggle sends)."""
    return [{"role": "system", "content": system}, *history,
            {"role": "user", "content": template.format(sources=format_sources(hits), question=question)}]


def cited_numbers(text: str) -> list[int]:
    """Source numbers cited in an answer ("[2]", "[1, 3]"), in order of first appearance."""
    nums = [int(n) for m in _CITATION.finditer(text) for n in m.group(1).split(",")]
    return list(dict.fromkeys(nums))


@dataclass
class Answer:
    text: str
    sources: list[Hit]  # what was retrieved and shown to the model, numbered from 1
    cited: list[Hit] = field(default_factory=list)  # the sources the answer cites (valid numbers only)


class RetrievalQA:
    def __init__(self, llm: ChatModel, retriever: Retriever, k: int | None = None, system: str = QA_SYSTEM,
                 template: PromptTemplate = QA_USER, no_answer: str = NO_ANSWER, **params):
        self.llm, self.retriever, self.k = llm, retriever, k
        self.system, self.template, self.no_answer = system, template, no_answer
        self.params = {"temperature": 0.0, **params}

    def ask(self, question: str, history: Sequence[dict] = ()) -> Answer:
        hits = self.retriever.search(question, self.k)
        if not hits:
            return Answer(self.no_answer, [])
        reply = self.llm.chat(qa_messages(question, hits, history, self.system, self.template), **self.params)
        text = reply.content.strip()
        cited = [hits[n - 1] for n in cited_numbers(text) if 1 <= n <= len(hits)]
        return Answer(text, hits, cited)


MAP_PROMPT = PromptTemplate("Summarize this part of a longer document in a few sentences. Keep names, numbers "
                            "and conclusions.\n\n{text}")
REDUCE_PROMPT = PromptTemplate("Combine these summaries of consecutive parts of one document into a single "
                               "summary of the whole.\n\n{text}")


@dataclass
class Summary:
    text: str
    parts: list[str]  # the map step's summaries
    rounds: int  # reduce rounds (each one summarizes groups of summaries that did not fit together)


def summarize(llm: ChatModel, text: str, chunk_tokens: int = 1500, count_tokens: TokenCounter | None = None,
              max_rounds: int = 4, **params) -> Summary:
    """Map-reduce summary of a long text: summarize each chunk (map), then combine the summaries (reduce),
    regrouping and summarizing again while they do not fit in one `chunk_tokens` prompt."""
    count = count_tokens or simple_token_count
    params = {"temperature": 0.0, **params}

    def ask(template: PromptTemplate, body: str) -> str:
        return llm.chat([{"role": "user", "content": template.format(text=body)}], **params).content.strip()

    spans = chunk_text(text, chunk_tokens, 0, count)
    if len(spans) <= 1:
        single = ask(MAP_PROMPT, text)
        return Summary(single, [single], 0)
    parts = [ask(MAP_PROMPT, text[a:b]) for a, b, _ in spans]
    current, rounds = parts, 0
    while True:
        rounds += 1
        joined = "\n\n".join(current)
        if count(joined) <= chunk_tokens or rounds >= max_rounds:
            return Summary(ask(REDUCE_PROMPT, joined), parts, rounds)
        groups, group = [], []
        for s in current:  # regroup consecutive summaries into prompts that fit
            if group and count("\n\n".join(group + [s])) > chunk_tokens:
                groups.append(group)
                group = []
            group.append(s)
        groups.append(group)
        current = [ask(REDUCE_PROMPT, "\n\n".join(g)) for g in groups]


class ConversationChain:
    """A chat that remembers: each `send` carries the memory's messages, then stores the new exchange."""

    def __init__(self, llm: ChatModel, memory: BufferMemory | None = None, system: str | None = None, **params):
        self.llm, self.memory, self.system, self.params = llm, memory or BufferMemory(), system, params

    def send(self, text: str) -> str:
        head = [{"role": "system", "content": self.system}] if self.system else []
        messages = head + self.memory.messages() + [{"role": "user", "content": text}]
        reply = self.llm.chat(messages, **self.params).content.strip()
        self.memory.add(text, reply)
        return reply
