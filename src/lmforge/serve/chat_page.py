"""The browser chat page (`lmforge serve --ui`): GET /chat (and / redirects there), its static files, and two small
JSON routes the page uses besides the OpenAI API:

- GET  /ui/config  → {"rag": bool, "chunks": int, "k": int}: whether a RAG index is loaded;
- POST /ui/rag     {"question", "history"?, "k"?} → {"messages", "sources"}: the retrieval-QA prompt
  (`lmforge.rag.chains.qa_messages`, the same one `lmforge rag ask` sends) and the numbered sources, which the page
  then streams through /v1/chat/completions and shows under the reply.

The page is plain HTML/CSS/JS in `serve/static/` (no build step): a model/adapter picker fed by /v1/models,
temperature / top-p / max-tokens sliders, streaming over server-sent events, a stop button and the RAG toggle.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field

from .protocol import OpenAIError

STATIC = Path(__file__).parent / "static"
_FILES = {"chat.js": "text/javascript", "chat.css": "text/css"}


class RagRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    question: str = Field(min_length=1)
    history: list[dict] = []
    k: int | None = Field(None, ge=1, le=20)


def chat_page_router(index=None, k: int = 4, mode: str = "hybrid", min_score: float = 0.0,
                     dependencies: Sequence[Callable] = ()) -> APIRouter:
    """Routes of the chat page; `index` (a `lmforge.rag.RagIndex`) enables the RAG toggle. `dependencies` guard the
    /ui JSON routes (pass the server's API-key check; the page sends the key the user types)."""
    router = APIRouter()
    guarded = [Depends(d) for d in dependencies]
    retriever = index.retriever(mode=mode, k=k, min_score=min_score) if index is not None else None

    @router.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/chat")

    @router.get("/chat", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "chat.html", media_type="text/html")

    @router.get("/chat/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in _FILES:
            raise OpenAIError(404, f"no static file '{name}'")
        return FileResponse(STATIC / name, media_type=_FILES[name])

    @router.get("/ui/config", dependencies=guarded)
    async def config():
        return {"rag": retriever is not None, "chunks": len(index) if index is not None else 0, "k": k}

    @router.post("/ui/rag", dependencies=guarded)
    async def rag(body: RagRequest):
        from ..rag.chains import qa_messages

        if retriever is None:
            raise OpenAIError(400, "the server has no RAG index; start it with one (rag_store=DIR)", param="question")
        hits = await run_in_threadpool(retriever.search, body.question, body.k)
        sources = [{"n": i, "citation": h.citation, "source": h.source, "text": h.text,
                    "score": round(h.score, 4)} for i, h in enumerate(hits, start=1)]
        history = [{"role": m.get("role"), "content": m.get("content", "")} for m in body.history
                   if m.get("role") in ("user", "assistant")]
        messages = qa_messages(body.question, hits, history) if hits else [
            *history, {"role": "user", "content": body.question}]
        return {"messages": messages, "sources": sources}

    return router


def mount_extras(app, *, ui: bool = False, rag_store: str | None = None, embeddings: str | None = None,
                 tools: bool = True, api_key: str | None = None, device: str = "cpu") -> None:
    """Add the application features to a server app made by `create_app`, as `lmforge serve` options:
    the chat page (`ui`, with RAG over the `rag_store` index), POST /v1/embeddings (`embeddings`: minilm, st:DIR or
    lmforge:DIR, loaded on first use) and OpenAI tools (`tools`). Every route added honours the server's API key."""
    from .embeddings import bearer_key, embeddings_router

    key = [bearer_key(api_key)]
    if embeddings:
        from ..rag.embeddings import load_embedder

        app.include_router(embeddings_router(lambda: load_embedder(embeddings, device), dependencies=key))
    if ui:
        index = None
        if rag_store:
            from ..rag.index import RagIndex

            index = RagIndex.open(rag_store, device=device)
        app.include_router(chat_page_router(index, dependencies=key))
    if tools:
        from .tool_calls import ToolCallsMiddleware

        app.add_middleware(ToolCallsMiddleware)
