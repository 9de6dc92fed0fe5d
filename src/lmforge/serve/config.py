"""`lmforge serve MODEL`: load a checkpoint, start the engine, serve the OpenAI API with uvicorn."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..config import Section
from ..infer.engine import EngineConfig


class ServeConfig(Section):
    model: str = Field(description="checkpoint directory (config.json + safetensors + tokenizer), .gguf file or "
                                   "Hugging Face id (org/name)")
    revision: str | None = None
    """Branch, tag or commit of a Hugging Face id (default: main); HF_HUB_OFFLINE=1 reads only the local cache."""
    adapter: str | None = None
    """Adapter applied to the served model itself (any lmforge trains: LoRA, DoRA, IA3, prefix, prompt ...)."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 for every interface)."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port (0 = any free port)."""
    served_model_name: str | None = None
    """The `model` name clients use; default: the Hugging Face id, or the checkpoint directory's name."""
    api_key: str | None = None
    """If set, every route but /health and the chat page (/v1, /ui, /metrics, /openapi.json) needs
    `Authorization: Bearer <api_key>`."""
    max_request_bytes: int = Field(4 * 2**20, ge=1024)
    """Largest request body in bytes; a larger one gets a 413 before it is read (Content-Length) or as soon as it
    passes the limit (chunked)."""
    max_request_sequences: int = Field(128, ge=1)
    """Most sequences one request may create (prompts × n); more is a 400."""
    timeout_keep_alive: float = Field(30.0, gt=0)
    """Seconds an idle keep-alive connection stays open. Longer than clients keep idle pooled connections (httpx
    and the openai SDK: 5 s), so the server never closes one just as a client reuses it (uvicorn's 5 s default
    failed 5 of 16,000 requests of a pooled soak test with a read error)."""
    device: str = "auto"
    """cpu, cuda, cuda:1 ... or auto (cuda when available)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; auto = bfloat16 on a GPU that supports it, else float32."""
    chat_template: str | None = None
    """Built-in template name (llama3, chatml, qwen, mistral, alpaca) or Jinja text, when the checkpoint has none."""
    adapters: dict[str, str] = {}
    """LoRA adapters to serve beside the base model, name → PEFT directory (adapters.sql=./sql-lora); a request
    picks one by sending its name as `model`."""
    runtime_lora: bool = True
    """Serve POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter {lora_name} (vLLM's
    routes; behind api_key like every /v1 route)."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """Logging level of the server and of uvicorn's access log."""
    ui: bool = False
    """Serve the browser chat page at /chat (streaming, sampling controls, RAG toggle with cited sources)."""
    rag_store: str | None = None
    """A `lmforge rag index` folder for the chat page's RAG toggle."""
    embeddings: str | None = None
    """Serve POST /v1/embeddings with minilm, st:DIR or lmforge:DIR (a separate embedder, loaded on first use)."""
    tools: bool = True
    """Accept OpenAI `tools` / `tool_calls` in chat requests."""
    engine: EngineConfig = EngineConfig()
    """Engine capacity and batching (engine.max_num_seqs=128, engine.gpu_memory_utilization=0.8, ...)."""


def build_server(cfg: ServeConfig):
    """(FastAPI app, AsyncEngine) for a config: model and tokenizer loaded, engine built (not yet started)."""
    from ..infer.api.async_engine import AsyncEngine
    from ..infer.engine import Engine
    from .app import create_app

    from ..checkpoint import load_model_and_tokenizer
    from ..hub import is_hub_id

    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype, cfg.chat_template,
                                                adapter=cfg.adapter, revision=cfg.revision)
    engine = AsyncEngine(Engine(model, tokenizer, cfg.engine, cfg.adapters))
    name = cfg.served_model_name or (cfg.model if is_hub_id(cfg.model) else Path(cfg.model).resolve().name)
    app = create_app(engine, tokenizer, name, cfg.api_key, max_request_bytes=cfg.max_request_bytes,
                     max_request_sequences=cfg.max_request_sequences, runtime_lora=cfg.runtime_lora)
    if cfg.ui or cfg.rag_store or cfg.embeddings or cfg.tools:
        from .chat_page import mount_extras

        device = "cpu" if cfg.device == "auto" else cfg.device
        mount_extras(app, ui=cfg.ui, rag_store=cfg.rag_store, embeddings=cfg.embeddings, tools=cfg.tools,
                     api_key=cfg.api_key, device=device)
    return app, engine


def run_serve(cfg: ServeConfig) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app, engine = build_server(cfg)
    engine.start()
    try:
        # log_config=None: uvicorn's loggers go through the handler configured above; its own dictConfig would
        # first close every handler in the process (see lmforge.testing.serve_in_thread)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, log_config=None,
                    timeout_keep_alive=cfg.timeout_keep_alive)
    finally:
        engine.shutdown()
