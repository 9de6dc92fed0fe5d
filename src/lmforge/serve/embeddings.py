"""`POST /v1/embeddings` (OpenAI's shape) over any `lmforge.rag` embedder: MiniLM, a local sentence-transformers
model, or an lmforge checkpoint mean-pooled.

    app.include_router(embeddings_router(lambda: load_embedder("minilm"), "all-minilm-l6-v2"))

The embedder may be given as a zero-argument function: it is then loaded on the first request, not at startup.
Embedding runs in the threadpool so it does not stall the event loop (and with it the streams of other requests).
"""
from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Sequence
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from .protocol import OpenAIError


def bearer_key(api_key: str | None) -> Callable:
    """A FastAPI dependency requiring `Authorization: Bearer <api_key>` (it lets everything through when api_key is
    None): the server's key check, for routers included outside the app factory."""
    async def check(request: Request) -> None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise OpenAIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")

    return check


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


def embeddings_router(embedder, model_name: str | None = None, prefix: str = "/v1",
                      dependencies: Sequence[Callable] = (), max_inputs: int = 2048) -> APIRouter:
    """A router with POST {prefix}/embeddings; `dependencies` (e.g. the server's API-key check) guard it."""
    router = APIRouter(prefix=prefix, dependencies=[Depends(d) for d in dependencies])
    lock = threading.Lock()
    loaded: list = [] if callable(embedder) and not hasattr(embedder, "embed") else [embedder]

    def get():
        with lock:  # one load, even when the first requests arrive together
            if not loaded:
                loaded.append(embedder())
        return loaded[0]

    @router.post("/embeddings")
    async def embeddings(body: EmbeddingRequest):
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise OpenAIError(400, "input: must not be empty", param="input")
        if not all(isinstance(t, str) for t in texts):
            raise OpenAIError(400, "input: token ids are not supported; send text", param="input")
        if len(texts) > max_inputs:
            raise OpenAIError(400, f"input: at most {max_inputs} texts per request (got {len(texts)})", param="input")
        if any(not t for t in texts):
            raise OpenAIError(400, "input: texts must not be empty strings", param="input")
        emb = await run_in_threadpool(get)
        name = model_name or emb.name
        if body.model is not None and body.model != name:
            raise OpenAIError(404, f"The model '{body.model}' does not exist; the embedding model is '{name}'",
                              param="model", code="model_not_found")
        if body.dimensions is not None and body.dimensions != emb.dim:
            raise OpenAIError(400, f"dimensions: this model gives {emb.dim} dimensions only", param="dimensions")
        vectors = await run_in_threadpool(emb.embed, texts)  # (N, dim) float32
        tokens = sum(emb.count_tokens(t) for t in texts)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.tobytes()).decode() if body.encoding_format == "base64"
                 else v.tolist()} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return router
