"""A real lmforge server on a thread (tiny random model, RAG routers, tool-calls middleware) for tests, the
browser test and examples. Everything is made locally; nothing is downloaded."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TestServer:
    url: str  # http://127.0.0.1:PORT
    engine: object
    index: object | None  # the RagIndex behind the chat page's RAG toggle
    _stop: Callable[[], None]

    def stop(self) -> None:
        self._stop()
        self.engine.shutdown()


def start_test_server(workdir: str | Path, with_rag: bool = True, n_towns: int = 8) -> TestServer:
    """Tiny checkpoint + `lmforge serve` app + /v1/embeddings (MiniLM) + the chat page (RAG over a generated town
    corpus when `with_rag`) + OpenAI tool calls, served by uvicorn on 127.0.0.1 in a daemon thread."""
    from ..serve import ServeConfig, build_server
    from ..serve.chat_page import chat_page_router
    from ..serve.embeddings import embeddings_router
    from ..serve.tool_calls import ToolCallsMiddleware
    from ..testing import make_tiny_checkpoint, serve_in_thread
    from .documents import load_documents
    from .embeddings import load_embedder
    from .index import RagIndex
    from .synthetic import town_corpus, write_corpus

    workdir = Path(workdir)
    ckpt = make_tiny_checkpoint(workdir / "tiny")
    cfg = ServeConfig(model=str(ckpt), device="cpu", served_model_name="tiny",
                      engine=dict(block_size=16, num_blocks=1024, max_model_len=4096, max_num_seqs=8))
    app, engine = build_server(cfg)
    index = None
    if with_rag:
        docs, _ = town_corpus(n_towns, seed=1)
        index = RagIndex.create(workdir / "index", load_embedder("minilm"))
        index.add_documents(load_documents(write_corpus(docs, workdir / "docs")))
    app.include_router(embeddings_router(lambda: load_embedder("minilm"), "all-minilm-l6-v2"))
    app.include_router(chat_page_router(index))
    app.add_middleware(ToolCallsMiddleware)
    try:
        url, stop = serve_in_thread(app)
    except RuntimeError:
        engine.shutdown()
        raise
    return TestServer(url, engine, index, stop)
