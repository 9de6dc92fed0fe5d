"""OpenAI `tools` / `tool_calls` for lmforge's server, as an ASGI middleware around the app (no engine change).

A chat request with `tools` is rewritten before the server sees it, and its reply is parsed after:
- if the checkpoint's chat template renders tools itself (its text uses `tools`: Qwen2.5, Llama 3.1, Hermes ...),
  the tools go to the template (`chat_template_kwargs.tools`) and tool messages pass through as they are;
- otherwise a system prompt lists the tools (JSON schemas) and asks for `<tool_call>{"name", "arguments"}</tool_call>`,
  and earlier `tool_calls` / `role: tool` messages are written out as text the plain template can show.
The reply's `<tool_call>` blocks (or a reply that is one JSON object with name + arguments/parameters) become
`message.tool_calls` with `finish_reason: "tool_calls"`. `tool_choice: "none"` drops the tools; "required" or a
named function asks for a call in the prompt. A streamed request with tools is answered as one SSE event stream
after the reply is complete (tool calls can only be told apart from text at the end).

    app = create_app(...); app.add_middleware(ToolCallsMiddleware)

The parts of a request it reads (`tools`, `tool_choice`, `messages[].tool_calls`) are validated first; a malformed
one is a 400 in OpenAI's schema naming the field. A body that is not a JSON object goes to the server untouched
(which answers it with its own 400).
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from .guard import replay_body
from .protocol import ContentPart, OpenAIError, parse_json_body, validation_error

TOOLS_PROMPT = """You can call these functions (JSON schemas):
{schemas}

To call a function, reply with one block per call and nothing else:
<tool_call>{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}</tool_call>
Function results come back in <tool_response> blocks. {choice}"""

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class ToolFunction(_Loose):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Loose):
    type: Literal["function"] = "function"
    function: ToolFunction


class CalledFunction(_Loose):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] | None = None


class ToolCall(_Loose):
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class NamedToolChoice(_Loose):
    type: Literal["function"] = "function"
    function: CalledFunction


class ToolMessage(_Loose):
    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None


class ToolsRequest(_Loose):
    """What the middleware reads of a chat request, validated before it rewrites anything."""

    messages: list[ToolMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    stream: bool = False


def _choice_text(tool_choice) -> str:
    if tool_choice == "required":
        return "You must call at least one function now."
    if isinstance(tool_choice, dict):
        return f"You must call the function {tool_choice.get('function', {}).get('name')} now."
    return "If no function is needed, answer directly."


def tools_prompt(tools: list[dict], tool_choice=None) -> str:
    schemas = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    return TOOLS_PROMPT.format(schemas=schemas, choice=_choice_text(tool_choice))


def messages_as_text(messages: list[dict]) -> list[dict]:
    """Assistant `tool_calls` and `role: tool` messages written as text, for templates that know neither."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = "\n".join("<tool_call>" + json.dumps({"name": c["function"]["name"], "arguments": _loads(
                c["function"].get("arguments"))}, ensure_ascii=False) + "</tool_call>" for c in m.pop("tool_calls"))
            m["content"] = (_text(m.get("content")) + "\n" + calls).strip()
        elif m.get("role") == "tool":
            name = m.pop("name", None) or m.get("tool_call_id", "")
            m = {"role": "user", "content": f"<tool_response name=\"{name}\">\n{_text(m.get('content'))}\n"
                                            "</tool_response>"}
        out.append(m)
    return out


def _loads(arguments):
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return arguments


def _text(content) -> str:
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(remaining content, OpenAI tool_calls) of a reply: `<tool_call>` blocks, or the whole reply as one JSON
    object with "name" and "arguments" (or "parameters"). Blocks that are not valid calls stay in the content."""
    calls, kept = [], text
    candidates = [(m.group(0), m.group(1)) for m in _BLOCK.finditer(text)]
    if not candidates and text.strip().startswith("{"):
        candidates = [(text, text.strip())]
    for whole, body in candidates:
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"],
                                   "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
        kept = kept.replace(whole, "", 1)
    return kept.strip(), calls


def template_renders_tools(tokenizer) -> bool:
    """Whether the checkpoint's chat template takes `tools` itself."""
    try:  # the template apply_chat_template would pick for a request with tools
        template = tokenizer._template_for([{}]) if tokenizer is not None else ""
    except Exception:  # noqa: BLE001 - no template: the server answers that itself
        return False
    return "tools" in (template or "")


def rewrite_request(body: dict, native: bool) -> dict:
    """The request the server gets: tools moved into the prompt (or the template kwargs), stream off."""
    body = dict(body)
    tools = body.pop("tools", None) or []
    choice = body.pop("tool_choice", None)
    body.pop("parallel_tool_calls", None)
    if choice == "none":
        tools = []
    if tools and native:
        body["chat_template_kwargs"] = {**(body.get("chat_template_kwargs") or {}), "tools": tools}
        return body
    messages = messages_as_text(body.get("messages") or [])
    if tools:
        prompt = tools_prompt(tools, choice)
        if messages and messages[0].get("role") in ("system", "developer"):
            messages[0] = {**messages[0], "content": f"{_text(messages[0].get('content'))}\n\n{prompt}"}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    body["messages"] = messages
    return body


def rewrite_response(out: dict) -> dict:
    for choice in out.get("choices", []):
        msg = choice.get("message") or {}
        content, calls = parse_tool_calls(msg.get("content") or "")
        if calls:
            msg["content"] = content or None
            msg["tool_calls"] = calls
            choice["finish_reason"] = "tool_calls"
    return out


def as_sse(out: dict) -> bytes:
    """A complete chat.completion as the chunks a streaming client expects."""
    base = {"id": out["id"], "object": "chat.completion.chunk", "created": out["created"], "model": out["model"]}
    events = []
    for c in out["choices"]:
        msg, i = c["message"], c["index"]
        delta = {"role": "assistant", "content": msg.get("content")}
        if msg.get("tool_calls"):
            delta["tool_calls"] = [{**tc, "index": n} for n, tc in enumerate(msg["tool_calls"])]
        events.append({**base, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]})
        events.append({**base, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                            "finish_reason": c["finish_reason"]}]})
    return b"".join(f"data: {json.dumps(e, ensure_ascii=False)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


class ToolCallsMiddleware:
    """Pure ASGI middleware (no body streaming is held up for other routes)."""

    def __init__(self, app, tokenizer=None):
        self.app, self.tokenizer = app, tokenizer

    def _native(self, scope) -> bool:
        tok = self.tokenizer
        if tok is None:
            state = getattr(getattr(scope.get("app"), "state", None), "lmforge", None)
            tok = getattr(state, "tokenizer", None)
        return template_renders_tools(tok)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/chat/completions"):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:  # (the server's RequestGuard, outside this middleware, has capped the size)
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        try:
            body = parse_json_body(raw)
        except OpenAIError:
            body = None  # the server answers it
        messages = body.get("messages") if body is not None else None
        wants_tools = body is not None and (body.get("tools") or any(
            isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls"))
            for m in (messages if isinstance(messages, list) else [])))
        if not wants_tools:
            return await self.app(scope, replay_body(raw, receive), send)
        try:
            ToolsRequest.model_validate(body)
        except pydantic.ValidationError as e:
            error = validation_error(e.errors(include_url=False)).response()
            await send({"type": "http.response.start", "status": error.status_code, "headers": error.raw_headers})
            return await send({"type": "http.response.body", "body": error.body})
        stream = bool(body.get("stream"))
        new = rewrite_request(body, self._native(scope))
        new["stream"] = False
        new.pop("stream_options", None)
        status, headers, parts = 500, [], []

        async def capture(message):
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status, headers = message["status"], message.get("headers", [])
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))

        await self.app(scope, replay_body(json.dumps(new).encode(), receive), capture)
        payload = b"".join(parts)
        content_type = b"application/json"
        if status == 200:
            out = rewrite_response(json.loads(payload))
            payload, content_type = (as_sse(out), b"text/event-stream") if stream else (json.dumps(out).encode(),
                                                                                        content_type)
        else:
            content_type = dict(headers).get(b"content-type", content_type)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
