"""The language-model side of chains and agents: any OpenAI-compatible chat endpoint (lmforge's own server by
default), reached with plain HTTP (httpx), plus a scripted model for deterministic tests and demos.

A chat model here is anything with `chat(messages, **params) -> ChatReply`; params are OpenAI's (`temperature`,
`max_tokens`, `stop`, `n`, `seed`, `tools`, ...). `ChatReply.choices` holds all n texts; `.content` the first.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import LmforgeError

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def parsed_arguments(self) -> dict:
        try:
            args = json.loads(self.arguments or "{}")
        except json.JSONDecodeError as e:
            raise LmforgeError(f"tool call '{self.name}': arguments are not valid JSON ({e.msg})") from None
        if not isinstance(args, dict):
            raise LmforgeError(f"tool call '{self.name}': arguments must be a JSON object")
        return args


@dataclass
class ChatReply:
    choices: list[str]
    tool_calls: list[ToolCall] = field(default_factory=list)  # of the first choice
    finish_reason: str | None = None

    @property
    def content(self) -> str:
        return self.choices[0] if self.choices else ""


class ChatModel(Protocol):
    def chat(self, messages: Sequence[dict], **params) -> ChatReply: ...


class OpenAIChat:
    """Chat completions from an OpenAI-compatible server (`lmforge serve MODEL` listens on DEFAULT_BASE_URL)."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, model: str | None = None, api_key: str | None = None,
                 timeout: float = 300.0, **defaults):
        import httpx

        self.base_url, self.defaults = base_url.rstrip("/"), defaults
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self._model = model

    @property
    def model(self) -> str:
        """The model to ask for: as given, else the first the server lists."""
        if self._model is None:
            data = self._request("GET", "/models")["data"]
            if not data:
                raise LmforgeError(f"{self.base_url}/models lists no model")
            self._model = data[0]["id"]
        return self._model

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        try:
            r = self.http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise LmforgeError(f"cannot reach {self.base_url}{path} ({e}); is the server running "
                               "(`lmforge serve MODEL`)?") from None
        if r.status_code != 200:
            try:
                msg = r.json()["error"]["message"]
            except Exception:  # noqa: BLE001 - not OpenAI's error shape
                msg = r.text[:300]
            raise LmforgeError(f"{self.base_url}{path}: HTTP {r.status_code}: {msg}")
        return r.json()

    def _body(self, messages: Sequence[dict], params: dict) -> dict:
        return {"model": self.model, "messages": list(messages), **self.defaults,
                **{k: v for k, v in params.items() if v is not None}}

    def chat(self, messages: Sequence[dict], **params) -> ChatReply:
        out = self._request("POST", "/chat/completions", self._body(messages, params))
        choices = sorted(out["choices"], key=lambda c: c["index"])
        first = choices[0]["message"]
        calls = [ToolCall(c["function"]["name"], c["function"].get("arguments") or "{}", c.get("id", ""))
                 for c in first.get("tool_calls") or []]
        return ChatReply([c["message"].get("content") or "" for c in choices], calls, choices[0].get("finish_reason"))

    def stream(self, messages: Sequence[dict], **params) -> Iterator[str]:
        """The reply's text as it is generated (server-sent events)."""
        import httpx

        body = {**self._body(messages, params), "stream": True}
        try:
            with self.http.stream("POST", "/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise LmforgeError(f"{self.base_url}/chat/completions: HTTP {r.status_code}: "
                                       f"{r.read().decode()[:300]}")
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    for choice in json.loads(line[6:]).get("choices", []):
                        if choice.get("delta", {}).get("content"):
                            yield choice["delta"]["content"]
        except httpx.HTTPError as e:
            raise LmforgeError(f"cannot reach {self.base_url} ({e}); is the server running?") from None

    def close(self) -> None:
        self.http.close()


Reply = str | ChatReply | Callable[[Sequence[dict], dict], "str | ChatReply"]


class ScriptedChat:
    """Answers from a script, in order: strings, ChatReply objects, or functions of (messages, params). Records
    every request in `.requests`, so a test can check what a chain actually sent."""

    def __init__(self, replies: Sequence[Reply]):
        self.replies, self.requests = list(replies), []

    def chat(self, messages: Sequence[dict], **params) -> ChatReply:
        self.requests.append({"messages": [dict(m) for m in messages], **params})
        if not self.replies:
            raise LmforgeError("ScriptedChat ran out of replies")
        n = params.get("n") or 1
        texts = []
        for _ in range(n):
            reply = self.replies.pop(0)
            reply = reply(messages, params) if callable(reply) else reply
            if isinstance(reply, ChatReply):
                if n == 1:
                    return reply
                reply = reply.content
            texts.append(reply)
        return ChatReply(texts)
