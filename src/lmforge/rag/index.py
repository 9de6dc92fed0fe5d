"""A RAG index on disk: a folder holding `store.json` (what built it) and the vector store's files.

    index = RagIndex.create("runs/rag", load_embedder("minilm"))        # backend faiss by default
    index.add_documents(load_documents("docs/"))
    hits = index.retriever(mode="hybrid", k=5).search("how do I install it?")
    index = RagIndex.open("runs/rag")                                   # later: same embedder, from the manifest

The keyword (BM25) index is rebuilt from the stored chunk texts when an index is opened: it takes well under a
second per 10,000 chunks and can never drift from the vectors.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError, LmforgeError
from .chunking import chunk_documents
from .documents import Document
from .embeddings import Embedder, load_embedder
from .retrieval import BM25, Mode, Retriever
from .stores import VectorStore, open_store

MANIFEST = "store.json"


class RagIndex:
    def __init__(self, path: Path, store: VectorStore, embedder: Embedder, manifest: dict):
        self.path, self.store, self.embedder, self.manifest = path, store, embedder, manifest
        self.bm25 = BM25(_keyword_text(r) for _, r in store.records())

    @classmethod
    def create(cls, path: str | Path, embedder: Embedder, backend: str = "faiss", max_tokens: int | None = None,
               overlap: int = 32, store_url: str | None = None) -> RagIndex:
        """A new, empty index at `path` (an existing one is an error: open it, or pick another folder)."""
        path = Path(path)
        if (path / MANIFEST).is_file():
            raise LmforgeError(f"{path} already holds a RAG index; open it (RagIndex.open) or choose a new folder")
        limit = getattr(embedder, "max_tokens", 256)
        max_tokens = max_tokens or min(limit, 200)
        if max_tokens > limit:
            raise ConfigError(f"chunk max_tokens {max_tokens} exceeds the embedder's window of {limit} tokens")
        manifest = {"format": 1, "backend": backend, "dim": embedder.dim, "embedder": embedder.name,
                    "max_tokens": max_tokens, "overlap": overlap, "store_url": store_url, "documents": [],
                    "chunks": 0}
        store = open_store(backend, path, embedder.dim, store_url)
        index = cls(path, store, embedder, manifest)
        index._write_manifest()
        return index

    @classmethod
    def open(cls, path: str | Path, embedder: Embedder | None = None, device: str = "cpu") -> RagIndex:
        """An existing index; the embedder named in its manifest is loaded unless one is given (it must match)."""
        path = Path(path)
        f = path / MANIFEST
        if not f.is_file():
            raise LmforgeError(f"{path}: no RAG index here (no {MANIFEST}); build one with `lmforge rag index DOCS "
                               f"--store {path}`")
        manifest = json.loads(f.read_text())
        embedder = embedder or load_embedder(manifest["embedder"], device=device)
        if embedder.name != manifest["embedder"] or embedder.dim != manifest["dim"]:
            raise ConfigError(f"{path} was indexed with embedder '{manifest['embedder']}' ({manifest['dim']} dims); "
                              f"query it with the same one, not '{embedder.name}' ({embedder.dim} dims)")
        store = open_store(manifest["backend"], path, manifest["dim"], manifest.get("store_url"))
        return cls(path, store, embedder, manifest)

    def add_documents(self, docs: list[Document], batch_size: int = 256) -> int:
        """Chunk, embed and store documents (and index their keywords); returns the number of chunks added."""
        chunks = chunk_documents(docs, self.manifest["max_tokens"], self.manifest["overlap"],
                                 self.embedder.count_tokens)
        for i in range(0, len(chunks), batch_size):
            batch = chunks[i: i + batch_size]
            vectors = self.embedder.embed([c.embed_text for c in batch])  # (B, dim)
            records = [{"text": c.text, "source": c.source, "position": c.position, "start": c.start, "end": c.end,
                        "heading": c.heading, "metadata": c.metadata} for c in batch]
            self.store.add(vectors, records)
            self.bm25.add(_keyword_text(r) for r in records)
        self.manifest["documents"] = sorted({*self.manifest["documents"], *(d.source for d in docs)})
        self.manifest["chunks"] = len(self.store)
        self.save()
        return len(chunks)

    def retriever(self, mode: Mode = "hybrid", k: int = 5, min_score: float = 0.0, min_keyword_score: float = 0.0,
                  **kw) -> Retriever:
        return Retriever(self.store, self.embedder, self.bm25, mode, k, min_score, min_keyword_score, **kw)

    def __len__(self) -> int:
        return len(self.store)

    def save(self) -> None:
        self.store.save()
        self._write_manifest()

    def close(self) -> None:
        self.store.close()
        self._write_manifest()

    def _write_manifest(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / MANIFEST).write_text(json.dumps(self.manifest, indent=1, ensure_ascii=False))


def _keyword_text(record: dict) -> str:
    return f"{record.get('heading', '')}\n{record.get('text', '')}"
