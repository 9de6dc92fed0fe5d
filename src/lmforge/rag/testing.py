"""A real lmforge server on a thread (tiny random model, RAG routers, tool-calls middleware) for tests, the
browser test and examples. Everything is made locally; nothing is downloaded."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TestServer:
    url: str  # http://127.0.0.1:PORT
    engine: object
    index: object | None  # the RagIndex behind the chat page's RAG toggle
    _server: object
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self.engine.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_test_server(workdir: str | Path, with_rag: bool = True, n_towns: int = 8) -> TestServer:
    """Tiny checkpoint + `lmforge serve` app + /v1/embeddings (MiniLM) + the chat page (RAG over a generated town
    corpus when `with_rag`) + OpenAI tool calls, served by uvicorn on 127.0.0.1 in a daemon thread."""
    import uvicorn

    from ..serve import ServeConfig, build_server
    from ..serve.chat_page import chat_page_router
    from ..serve.embeddings import embeddings_router
    from ..serve.tool_calls import ToolCallsMiddleware
    from ..testing import make_tiny_checkpoint
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
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    if not server.started:
        engine.shutdown()
        raise RuntimeError("the test server did not start within 30 s")
    return TestServer(f"http://127.0.0.1:{server.config.port}", engine, index, server, thread)
