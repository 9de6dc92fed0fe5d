"""OpenAI request bodies (the fields lmforge honours, validated), their parsing, and the OpenAI error shape.

Unknown fields are ignored, as OpenAI-compatible servers do (clients send `user`, `metadata`, `store`, ...);
fields lmforge cannot honour are rejected with a 400 that names them rather than silently ignored.
Extensions beyond OpenAI (`top_k`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`, `return_token_ids`) go
in the body (`extra_body=` in the openai client).

A body is parsed here, not by FastAPI, so every way it can be malformed is a 400 in OpenAI's schema that says what
is wrong: not UTF-8, not JSON (NaN and Infinity included), not an object, nested deeper than `MAX_JSON_DEPTH`, a
string holding a lone UTF-16 surrogate (valid JSON, but no text: tokenizers and UTF-8 encoders refuse it), or a
field that fails validation (named, e.g. `messages.0.role`).
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects a request body may have (a tool's JSON schema needs a handful)."""


class OpenAIError(Exception):
    """An error answered in OpenAI's schema: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        """As a JSON response (ASCII-escaped: a message quoting odd input still encodes)."""
        from starlette.responses import Response

        return Response(json.dumps(self.body()), status_code=self.status, media_type="application/json")


# ----------------------------------------------------------------------------------------------- parsing


def parse_json_body(raw: bytes) -> dict:
    """A request body as a JSON object, checked for depth and lone surrogates; OpenAIError (400) otherwise."""
    if not raw.strip():
        raise OpenAIError(400, "the body is empty: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OpenAIError(400, f"the body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:  # far deeper than MAX_JSON_DEPTH: name the field from a scan of the text
        field = _deep_field(text, MAX_JSON_DEPTH)
        raise OpenAIError(400, f"{field or 'the body'}: JSON nested deeper than {MAX_JSON_DEPTH} levels",
                          param=field) from None
    except json.JSONDecodeError as e:
        raise OpenAIError(400, f"the body is not valid JSON: {e.msg} (line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # NaN / Infinity
        raise OpenAIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, f"the body must be a JSON object, not {type(data).__name__}")
    check_json(data)
    return data


_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"\s*:?|[\[\]{}]')  # strings (keys with their colon) and brackets


def _deep_field(text: str, max_depth: int) -> str | None:
    """The top-level key under which `text` first nests deeper than `max_depth` (None: not under a key)."""
    depth, key = 0, None
    for m in _TOKENS.finditer(text):
        token = m.group()
        if token[0] == '"':
            if depth == 1 and token.endswith(":"):
                key = token[:-1].rstrip()[1:-1]
        elif token in "[{":
            depth += 1
            if depth > max_depth:
                return key if key is not None and key.isidentifier() else None
        else:
            depth -= 1
    return None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def check_json(data: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Walk parsed JSON (iteratively): OpenAIError naming the field for nesting beyond `max_depth` or a string
    (value or key) with a lone surrogate."""
    stack = [(data, (), 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if depth >= max_depth:
            raise OpenAIError(400, f"{_field(path) or 'the body'}: JSON nested deeper than {max_depth} levels",
                              param=_field(path))
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                _check_text(key, path)
            if isinstance(item, (str, dict, list)):
                stack.append((item, (*path, key), depth + 1))


def _check_text(text: str, path: tuple) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            name = _field(path) or "the body"
            raise OpenAIError(400, f"{name}: the text holds a lone UTF-16 surrogate ({text[e.start]!a} at "
                                   f"{e.start}); send valid Unicode", param=_field(path)) from None


def _field(path: tuple, parts: int = 3) -> str | None:
    """A dotted field name (`messages.0.content`) from a JSON path, its first `parts` parts."""
    return ".".join(str(p) for p in path[:parts]) or None


def validation_error(errors: list[dict]) -> OpenAIError:
    """The first of a request model's validation errors (`ValidationError.errors()`) as a 400 naming the field
    (`messages.0.role`); the tags pydantic adds for the members of a union (`str`, `list[int]`) are left out."""
    err = errors[0] if errors else {}
    if err.get("type") == "json_invalid":  # FastAPI's parser (routes that leave parsing to it)
        return OpenAIError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')}")
    loc = [p for p in err.get("loc", ()) if p != "body" and not _union_tag(p)]
    param = ".".join(str(p) for p in loc) or None
    msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
    return OpenAIError(400, f"{param}: {msg}" if param else msg, param=param)


def _union_tag(part) -> bool:
    return isinstance(part, str) and (any(c in part for c in "[(-") or part in ("str", "int", "float", "bool",
                                                                                "dict", "list", "none"))


def parse_request(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """A request body validated as `model`; OpenAIError (400) naming what is wrong."""
    data = parse_json_body(raw)
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None


# ----------------------------------------------------------------------------------------------- bodies


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-2**63, lt=2**63)
    logit_bias: dict[str, float] | None = None
    # extensions (vLLM-style)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] = []
    return_token_ids: bool = False
    """Add each choice's generated `token_ids` (in stream chunks: the new ones), e.g. when there is no tokenizer."""

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("give at most 16 non-empty stop strings")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        return v


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, name, ... reach the chat template as given
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template expects them: text parts joined, other parts (images, audio) refused."""
    out = []
    for i, m in enumerate(messages):
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            bad = next((p.type for p in m.content if p.type != "text"), None)
            if bad is not None:
                raise OpenAIError(400, f"messages[{i}].content: '{bad}' parts are not supported; send text",
                                  param=f"messages[{i}].content")
            d["content"] = "".join(p.text or "" for p in m.content)
        d.setdefault("content", "")
        out.append(d)
    return out


class LoadLoraRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's body): load the PEFT LoRA adapter at `lora_path` as model `lora_name`."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's body; its optional lora_int_id is ignored)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)
