"""The OpenAI-compatible HTTP layer: requests → engine requests, engine outputs → JSON or SSE chunks.

Routes: `/v1/completions`, `/v1/chat/completions` (both with `stream`, `stream_options.include_usage`, `n`, `stop`,
`logprobs`; chat with `response_format: json_object`), `/v1/models`, `/health`, `/metrics` (Prometheus text),
`/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (vLLM's runtime LoRA routes). No model logic lives here:
everything below the HTTP shapes is the engine's.

One request never hurts another, and no input reaches a 500:
- `RequestGuard` (outermost) checks the API key before any body is read, caps the body size (413) and turns a bug
  that escapes a route into an OpenAI-schema 500 that keeps the connection alive;
- a body is parsed, validated, templated, tokenized and checked on a worker thread (`_prepare_*`), never on the
  event loop, so a multi-megabyte prompt does not stall the streams of others or /health;
- every error is a 4xx in OpenAI's schema {"error": {"message", "type", "param", "code"}} naming the field
  (404 and 405 included); a request the engine fails (its work raised) is a 400, and a stream that fails after its
  first chunk ends with an SSE error event, then `data: [DONE]`;
- a client that disconnects aborts its requests, which frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pydantic
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LmforgeError
from ..infer.api.async_engine import AsyncEngine, EngineDeadError
from ..infer import Completion, SamplingParams, TokenLogprob
from ..infer.engine import ContextLengthError
from .guard import RequestGuard
from .protocol import (ChatRequest, CompletionRequest, LoadLoraRequest, OpenAIError, UnloadLoraRequest, message_dicts,
                       parse_request, validation_error)

log = logging.getLogger("lmforge.serve")

_PARAM_NAMES = {"max_new_tokens": "max_tokens", "logprobs": "logprobs", "json_object": "response_format"}
_TEMPLATE_ARGS = frozenset({"messages", "conversation", "add_generation_prompt", "tokenize"})


class ServerState:
    def __init__(self, engine: AsyncEngine, tokenizer, model_name: str, api_key: str | None,
                 max_request_sequences: int = 128):
        self.engine, self.tokenizer, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
        self.max_request_sequences = max_request_sequences
        self.created = int(time.time())
        self._token_strs: dict[int, str] = {}

    def adapter_for(self, model: str | None) -> str | None:
        """The LoRA adapter a request's `model` names (None = the base model); 404 for unknown names."""
        if model is None or model == self.model_name:
            return None
        if model in self.engine.engine.adapters.slots:
            return model
        known = [self.model_name, *self.engine.engine.adapters.slots]
        raise OpenAIError(404, f"The model '{model}' does not exist; served models: {', '.join(known)}",
                          param="model", code="model_not_found")

    def token_str(self, token_id: int) -> str:
        if token_id not in self._token_strs:
            self._token_strs[token_id] = (self.tokenizer.decode([token_id], skip_special_tokens=False)
                                          if self.tokenizer is not None else str(token_id))
        return self._token_strs[token_id]

    def encode(self, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (call from a worker thread: the batch call lets go of the GIL while Rust works)."""
        if self.tokenizer is None:
            raise OpenAIError(400, f"{field}: the server has no tokenizer; send token ids", param=field)
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def check_sequences(self, prompts: int, n: int) -> None:
        """Refuse a request that would create more sequences (prompts × n) than `max_request_sequences`."""
        if prompts * n > self.max_request_sequences:
            param = "n" if n > 1 else "prompt"
            raise OpenAIError(400, f"{param}: {prompts} prompt(s) × n={n} = {prompts * n} sequences exceed the limit "
                                   f"of {self.max_request_sequences} per request (serve option max_request_sequences)",
                              param=param)


# ----------------------------------------------------------------------------------------------- helpers


def _engine_params(body, max_tokens: int, logprobs: int | None, json_object: bool, seed: int | None):
    fields = dict(max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                  top_p=body.top_p or 1.0, top_k=body.top_k, repetition_penalty=body.repetition_penalty,
                  presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                  stop=body.stop or [], stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos, seed=seed,
                  logprobs=logprobs, json_object=json_object)
    try:
        return SamplingParams(**fields)
    except pydantic.ValidationError as e:
        err = e.errors(include_url=False)[0]
        field = str(err["loc"][0]) if err["loc"] else "request"
        name = _PARAM_NAMES.get(field, field)
        raise OpenAIError(400, f"{name}: {err['msg']}", param=name) from None


def _validate(state: ServerState, prompt_ids: list[int], params, adapter, field: str) -> None:
    try:
        state.engine.engine.validate(prompt_ids, params, adapter)
    except ContextLengthError as e:
        raise OpenAIError(400, f"{field}: {e}", param=field, code="context_length_exceeded") from None
    except LmforgeError as e:
        raise OpenAIError(400, f"{field}: {e}", param=field) from None


def _check_unsupported(body) -> None:
    if body.logit_bias:
        raise OpenAIError(400, "logit_bias is not supported", param="logit_bias")


async def _outputs(state: ServerState, subs: list[tuple], adapter: str | None, request: Request,
                   rid: str) -> AsyncIterator[tuple[int, Completion]]:
    """(choice index, output) of several engine requests as they arrive. Leaving early, or the client going
    away (polled every half second), aborts whatever is unfinished."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, prompt_ids, params) -> None:
        try:
            async for out in state.engine.generate(prompt_ids, params, f"{rid}-{index}", adapter):
                queue.put_nowait((index, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, e))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, ids, params)) for i, ids, params in subs]
    remaining, checked = len(tasks), time.monotonic()
    try:
        while remaining:
            try:
                index, item = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                index, item = -1, ()
            if time.monotonic() - checked > 0.5:  # polled, as outputs may keep the queue busy
                if await request.is_disconnected():
                    return
                checked = time.monotonic()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise _openai_error(item)
            elif item != ():
                if item.finish_reason == "error":
                    raise OpenAIError(400, f"the request failed in the engine: {item.error}", code="request_failed")
                yield index, item
    finally:
        for t in tasks:
            t.cancel()


def _openai_error(e: Exception) -> Exception:
    """What the client gets for an exception of the engine: a request it refused is a 400; a dead engine a 500."""
    if isinstance(e, LmforgeError):
        return OpenAIError(400, str(e))
    if isinstance(e, EngineDeadError):
        return OpenAIError(500, str(e), type="server_error", code="engine_error")
    return e


def _stream_error(e: Exception) -> str:
    """The SSE error event that ends a stream which failed after it started (`data: [DONE]` follows)."""
    if not isinstance(e, OpenAIError):
        log.exception("stream failed", exc_info=e)
        e = OpenAIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
    return _sse(e.body())


def _check_complete(finals: dict, subs: list) -> None:
    if len(finals) < len(subs):  # the client went away and its requests were aborted; nobody reads this
        raise OpenAIError(499, "client disconnected", type="client_closed_request")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _lp(x: float) -> float:
    """A log-probability JSON can carry: -inf (and NaN) become -9999.0, as other OpenAI-compatible servers do."""
    return x if math.isfinite(x) else -9999.0


def _completion_logprobs(state: ServerState, entries: list[TokenLogprob], offset: int) -> dict:
    tokens = [state.token_str(e.token_id) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [_lp(e.logprob) for e in entries],
            "top_logprobs": [{state.token_str(i): _lp(lp) for i, lp in e.top} for e in entries],
            "text_offset": offsets}


def _chat_logprobs(state: ServerState, entries: list[TokenLogprob]) -> dict:
    def item(token_id: int, lp: float) -> dict:
        s = state.token_str(token_id)
        return {"token": s, "logprob": _lp(lp), "bytes": list(s.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                        for e in entries]}


# ----------------------------------------------------------------------------------------------- preparing


@dataclass
class _Prepared:
    """A request parsed, tokenized and checked (on a worker thread), ready for the engine."""

    body: CompletionRequest | ChatRequest
    adapter: str | None
    subs: list[tuple[int, list[int], SamplingParams]]  # (choice index, prompt ids, params)
    prompt_tokens: int
    echo: list[str] | None = None  # completions with echo: each prompt's text


def _seed(seed: int | None, choice: int) -> int | None:
    return None if seed is None else seed + choice  # each of n choices its own seed


def _prepare_completion(state: ServerState, raw: bytes) -> _Prepared:
    body = parse_request(raw, CompletionRequest)
    adapter = state.adapter_for(body.model)
    _check_unsupported(body)
    if body.suffix:
        raise OpenAIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise OpenAIError(400, "best_of must equal n (ranking several samples is not supported)", param="best_of")
    if body.echo and body.logprobs is not None:
        raise OpenAIError(400, "echo with logprobs is not supported (no prompt logprobs)", param="echo")
    p = body.prompt
    one = isinstance(p, str) or isinstance(p[0], int)
    state.check_sequences(1 if one else len(p), body.n)  # before tokenizing what may be thousands of prompts
    if isinstance(p, str):
        prompts = [state.encode(p, "prompt")]
    elif one:
        prompts = [list(p)]
    else:
        prompts = [state.encode(x, "prompt") if isinstance(x, str) else list(x) for x in p]
    subs = []
    for i, ids in enumerate(prompts):
        for j in range(body.n):
            params = _engine_params(body, body.max_tokens or 16, body.logprobs, False, _seed(body.seed, j))
            _validate(state, ids, params, adapter, "prompt")
            subs.append((i * body.n + j, ids, params))
    echo = [state.tokenizer.decode(ids) if state.tokenizer else "" for ids in prompts] if body.echo else None
    return _Prepared(body, adapter, subs, sum(len(ids) for ids in prompts), echo)


def _prepare_chat(state: ServerState, raw: bytes) -> _Prepared:
    body = parse_request(raw, ChatRequest)
    adapter = state.adapter_for(body.model)
    _check_unsupported(body)
    if body.tools:
        raise OpenAIError(400, "tools are not supported (the server runs with tools=false)", param="tools")
    fmt = body.response_format.type if body.response_format else "text"
    if fmt == "json_schema":
        raise OpenAIError(400, "response_format json_schema is not supported; use json_object",
                          param="response_format")
    tokenizer = state.tokenizer
    if tokenizer is None:
        raise OpenAIError(400, "the server has no tokenizer, so no chat template", param="messages")
    state.check_sequences(1, body.n)
    kwargs = body.chat_template_kwargs or {}
    if _TEMPLATE_ARGS & kwargs.keys():
        raise OpenAIError(400, f"chat_template_kwargs: {sorted(_TEMPLATE_ARGS & kwargs.keys())} are set by the server",
                          param="chat_template_kwargs")
    messages = message_dicts(body.messages)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except LmforgeError as e:
        raise OpenAIError(400, f"messages: {e}", param="messages") from None
    except Exception as e:  # noqa: BLE001 - template errors are the messages' fault (a role it refuses, ...)
        raise OpenAIError(400, f"messages: the chat template failed: {type(e).__name__}: {e}", param="messages") from None
    prompt = state.encode(text, "messages", add_special_tokens=False)  # the template writes its own bos
    engine = state.engine.engine
    limit = min(engine.max_model_len, engine.pool.capacity_tokens)
    max_tokens = body.max_completion_tokens or body.max_tokens or max(1, limit - len(prompt))
    top = body.top_logprobs or 0
    subs = []
    for j in range(body.n):
        params = _engine_params(body, max_tokens, top if body.logprobs else None, fmt == "json_object",
                                _seed(body.seed, j))
        _validate(state, prompt, params, adapter, "messages")
        subs.append((j, prompt, params))
    return _Prepared(body, adapter, subs, len(prompt))


# ----------------------------------------------------------------------------------------------- app


NOT_ENABLED = {  # routes `lmforge serve` mounts only when a setting asks for them → how to turn them on
    "/v1/embeddings": "this server does not serve embeddings; start it with --embeddings minilm (or st:DIR, "
                      "lmforge:DIR)",
    "/chat": "the chat page is off; start the server with --ui",
}


class _App(FastAPI):
    """FastAPI whose `RequestGuard` stays the outermost middleware, whatever is added after `create_app` (the tools
    middleware reads bodies: the key check and the size cap must come first)."""

    def build_middleware_stack(self):
        self.user_middleware.sort(key=lambda m: m.cls is not RequestGuard)  # stable: the rest keep their order
        return super().build_middleware_stack()


def create_app(engine: AsyncEngine, tokenizer, model_name: str, api_key: str | None = None, *,
               max_request_bytes: int = 4 * 2**20, max_request_sequences: int = 128,
               runtime_lora: bool = True) -> FastAPI:
    """The FastAPI app over a started or not-yet-started AsyncEngine (started on the first request). With `api_key`
    every route but /health and the chat page needs it; bodies over `max_request_bytes` get a 413, requests asking
    for more than `max_request_sequences` sequences (prompts × n) a 400. `runtime_lora`: serve vLLM's
    /v1/load_lora_adapter and /v1/unload_lora_adapter."""
    state = ServerState(engine, tokenizer, model_name, api_key, max_request_sequences)
    app = _App(title="lmforge", docs_url=None, redoc_url=None)
    app.state.lmforge = state
    app.add_middleware(RequestGuard, api_key=api_key, max_request_bytes=max_request_bytes)

    @app.exception_handler(OpenAIError)
    async def _openai_error_handler(request: Request, e: OpenAIError):
        return e.response()

    @app.exception_handler(RequestValidationError)  # routes whose bodies FastAPI parses (/ui, /v1/embeddings)
    async def _validation_error(request: Request, e: RequestValidationError):
        return validation_error(list(e.errors())).response()

    @app.exception_handler(StarletteHTTPException)  # 404, 405, FastAPI's body errors: in OpenAI's schema too
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"Invalid URL ({request.method} {request.url.path})",
                   405: f"Method {request.method} is not allowed for {request.url.path}"}.get(e.status_code, e.detail)
        if e.status_code == 404 and request.url.path in NOT_ENABLED:  # a route a setting turns on: say which
            message = f"{message}: {NOT_ENABLED[request.url.path]}"
        return OpenAIError(e.status_code, str(message)).response()

    @app.exception_handler(LmforgeError)
    async def _lmforge_error(request: Request, e: LmforgeError):
        return OpenAIError(400, str(e)).response()

    v1 = APIRouter(prefix="/v1")  # the key is checked by RequestGuard

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        lines = [f"lmforge_{k} {v}" for k, v in engine.stats().items() if isinstance(v, (int, float))]
        return PlainTextResponse("\n".join(lines) + "\n")

    @v1.get("/models")
    async def models():
        data = [{"id": model_name, "object": "model", "created": state.created, "owned_by": "lmforge"}]
        data += [{"id": name, "object": "model", "created": state.created, "owned_by": "lmforge",
                  "parent": model_name} for name in engine.engine.adapters.slots]
        return {"object": "list", "data": data}

    @v1.post("/completions")
    async def completions(request: Request):
        prep = await run_in_threadpool(_prepare_completion, state, await request.body())
        body, subs, adapter, echo = prep.body, prep.subs, prep.adapter, prep.echo
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            out = {"id": rid, "object": "text_completion", "created": created, "model": body.model or model_name,
                   "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        if body.stream:
            async def stream():
                try:
                    completion_tokens, offsets = 0, [0] * len(subs)
                    if echo:
                        for i, _, _ in subs:
                            yield _sse(chunk([{"index": i, "text": echo[i // body.n], "logprobs": None,
                                               "finish_reason": None}]))
                    async for i, out in _outputs(state, subs, adapter, request, rid):
                        lp = None
                        if body.logprobs is not None:
                            lp = _completion_logprobs(state, out.new_logprobs, offsets[i])
                        offsets[i] += len(out.new_text)
                        if out.new_text or lp or out.finished or (body.return_token_ids and out.new_token_ids):
                            choice = {"index": i, "text": out.new_text, "logprobs": lp,
                                      "finish_reason": out.finish_reason if out.finished else None}
                            if body.return_token_ids:
                                choice["token_ids"] = out.new_token_ids
                            yield _sse(chunk([choice]))
                        if out.finished:
                            completion_tokens += out.generated_tokens
                    if body.stream_options and body.stream_options.include_usage:
                        yield _sse(chunk([], _usage(prep.prompt_tokens, completion_tokens)))
                except Exception as e:  # noqa: BLE001 - the stream has started: the error goes into it
                    yield _stream_error(e)
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        finals = {i: out async for i, out in _outputs(state, subs, adapter, request, rid) if out.finished}
        _check_complete(finals, subs)
        choices = []
        for i, _, _ in subs:
            out = finals[i]
            text = out.text if out.text is not None else ""
            lp = _completion_logprobs(state, out.logprobs or [], 0) if body.logprobs is not None else None
            choices.append({"index": i, "text": (echo[i // body.n] if echo else "") + text, "logprobs": lp,
                            "finish_reason": out.finish_reason})
            if body.return_token_ids:
                choices[-1]["token_ids"] = out.token_ids
        return chunk(choices, _usage(prep.prompt_tokens, sum(f.generated_tokens for f in finals.values())))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        prep = await run_in_threadpool(_prepare_chat, state, await request.body())
        body, subs, adapter = prep.body, prep.subs, prep.adapter
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            out = {"id": rid, "object": "chat.completion.chunk", "created": created,
                   "model": body.model or model_name, "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        if body.stream:
            async def stream():
                try:
                    completion_tokens = 0
                    for j in range(body.n):
                        yield _sse(chunk([{"index": j, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]))
                    async for j, out in _outputs(state, subs, adapter, request, rid):
                        lp = _chat_logprobs(state, out.new_logprobs) if body.logprobs else None
                        if out.new_text or (lp and lp["content"]) or (body.return_token_ids and out.new_token_ids):
                            choice = {"index": j, "delta": {"content": out.new_text}, "logprobs": lp,
                                      "finish_reason": None}
                            if body.return_token_ids:
                                choice["token_ids"] = out.new_token_ids
                            yield _sse(chunk([choice]))
                        if out.finished:
                            completion_tokens += out.generated_tokens
                            yield _sse(chunk([{"index": j, "delta": {}, "logprobs": None,
                                               "finish_reason": out.finish_reason}]))
                    if body.stream_options and body.stream_options.include_usage:
                        yield _sse(chunk([], _usage(prep.prompt_tokens, completion_tokens)))
                except Exception as e:  # noqa: BLE001 - the stream has started: the error goes into it
                    yield _stream_error(e)
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        finals = {j: out async for j, out in _outputs(state, subs, adapter, request, rid) if out.finished}
        _check_complete(finals, subs)
        choices = [{"index": j, "message": {"role": "assistant", "content": finals[j].text or ""},
                    "logprobs": _chat_logprobs(state, finals[j].logprobs or []) if body.logprobs else None,
                    "finish_reason": finals[j].finish_reason} for j in range(body.n)]
        if body.return_token_ids:
            for c in choices:
                c["token_ids"] = finals[c["index"]].token_ids
        usage = _usage(prep.prompt_tokens, sum(f.generated_tokens for f in finals.values()))
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model or model_name,
                "choices": choices, "usage": usage}

    if runtime_lora:
        _add_lora_routes(v1, state)
    app.include_router(v1)
    return app


def _add_lora_routes(v1: APIRouter, state: ServerState) -> None:
    """vLLM's runtime LoRA routes: the adapter's files are read on a worker thread, then it is put in a free slot on
    the engine thread between two steps, so requests in flight go on undisturbed (and keep an adapter that is
    unloaded under them until they finish)."""
    from ..infer.engine.multi_lora import read_adapter

    adapters = state.engine.engine.adapters

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = parse_request(await request.body(), LoadLoraRequest)
        name = body.lora_name
        try:
            if name == state.model_name:
                raise LmforgeError(f"'{name}' is the base model's name; pick another lora_name")
            adapters.check_new(name)  # before reading any file
        except LmforgeError as e:
            raise OpenAIError(400, str(e), param="lora_name") from None
        try:
            weights = await run_in_threadpool(read_adapter, state.engine.engine.model.cfg, body.lora_path)
        except LmforgeError as e:
            raise OpenAIError(400, str(e), param="lora_path") from None
        try:
            await state.engine.call(lambda engine: engine.add_adapter(name, weights=weights))
        except LmforgeError as e:  # the same name loaded by a concurrent request meanwhile, or no free slot
            raise OpenAIError(400, str(e), param="lora_name") from None
        log.info("loaded LoRA adapter %s from %s", name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = parse_request(await request.body(), UnloadLoraRequest)
        name = body.lora_name
        if name not in adapters.slots:
            raise OpenAIError(404, f"The lora adapter '{name}' cannot be found; loaded adapters: "
                                   f"{', '.join(adapters.slots) or 'none'}", param="lora_name", code="model_not_found")
        try:
            await state.engine.call(lambda engine: engine.remove_adapter(name))
        except LmforgeError as e:  # unloaded by a concurrent request meanwhile
            raise OpenAIError(404, str(e), param="lora_name", code="model_not_found") from None
        log.info("unloaded LoRA adapter %s", name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
