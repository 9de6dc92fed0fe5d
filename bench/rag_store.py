"""Vector store choice for lmforge.rag: recall@k against exact search, query latency, build time and size on disk,
for every embedded store, with the exact numpy search (the reference) measured in the same run.

Data: passages of the generated town corpus (lmforge.rag.synthetic, 5 sections per town) embedded with
all-MiniLM-L6-v2 (384 dims; on the GPU when there is one), queries = the corpus's questions embedded the same way.
Per store, one JSON line: build (add in batches of 10,000 + save) seconds, MB on disk, reopen seconds, single-query
latency p50/p95 (ms, k results), recall@k vs the exact top-k, and answer hit@5 (the chunk with the answer among the
top 5, the end task). `--source random` uses clustered random unit vectors instead (no embedder: big sizes fast).

    python bench/rag_store.py                                   # the GPU-host run (defaults: 100,000 passages)
    python bench/rag_store.py --n-vectors 2000 --queries 200    # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def corpus(n_vectors: int, n_queries: int, seed: int):
    """(passages, [(query, answer)] , passage index of each answer's town section) from the town corpus."""
    from lmforge.rag.chunking import chunk_document
    from lmforge.rag.documents import Document
    from lmforge.rag.synthetic import town_corpus

    docs, qas = town_corpus(max(1, n_vectors // 5), seed=seed)
    passages, sources = [], []
    for name, text in docs.items():
        for c in chunk_document(Document(text, name), max_tokens=200, overlap=0):
            passages.append(c.embed_text)
            sources.append(name)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(qas), size=min(n_queries, len(qas)), replace=False)
    queries = [qas[i] for i in picked]
    return passages[:n_vectors], sources[:n_vectors], queries


def embed(texts, device: str, batch_size: int) -> tuple[np.ndarray, float]:
    from lmforge.rag.embeddings import SentenceTransformerEmbedder

    emb = SentenceTransformerEmbedder(device=device, batch_size=batch_size)
    emb.embed(texts[:batch_size])  # warm-up
    t = time.perf_counter()
    vecs = emb.embed(texts)
    return vecs, time.perf_counter() - t


def random_vectors(n: int, n_queries: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, n // 100), dim)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    q = x[rng.integers(0, n, n_queries)] + 0.3 * rng.standard_normal((n_queries, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def measure(backend: str, root: Path, vectors: np.ndarray, records: list[dict], queries: np.ndarray, k: int,
            exact: list[list[int]] | None, answers: list[tuple[str, str]] | None, sources: list[str]) -> dict:
    from lmforge.rag.stores import open_store

    path = root / backend
    dim = vectors.shape[1]
    t = time.perf_counter()
    store = open_store(backend, path, dim)
    for i in range(0, len(vectors), 10_000):
        store.add(vectors[i: i + 10_000], records[i: i + 10_000])
    store.close()
    build = time.perf_counter() - t
    t = time.perf_counter()
    store = open_store(backend, path, dim)
    reopen = time.perf_counter() - t
    for q in queries[:10]:  # warm-up
        store.search(q, k)
    lat, results = [], []
    for q in queries:
        t = time.perf_counter()
        results.append([i for i, _ in store.search(q, k)])
        lat.append((time.perf_counter() - t) * 1000)
    out = {"backend": backend, "n": len(vectors), "dim": dim, "k": k, "queries": len(queries),
           "build_s": round(build, 3), "disk_mb": round(dir_mb(path), 2), "reopen_s": round(reopen, 3),
           "p50_ms": round(statistics.median(lat), 3), "p95_ms": round(float(np.percentile(lat, 95)), 3)}
    if exact is not None:
        out["recall_at_k"] = round(float(np.mean([len(set(r) & set(e)) / len(e) for r, e in zip(results, exact)])), 4)
    if answers is not None:
        hits = 0
        for r, (source, answer) in zip(results, answers):
            got = store.get(r[:5])
            hits += any(g["source"] == source and answer in g["text"] for g in got)
        out["answer_hit_at_5"] = round(hits / len(answers), 4)
    store.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-vectors", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--backends", default="numpy,faiss,faiss-hnsw,sqlite-vec,lancedb")
    p.add_argument("--source", choices=["minilm", "random"], default="minilm")
    p.add_argument("--dim", type=int, default=384, help="for --source random")
    p.add_argument("--device", default="auto", help="embedder device: auto = cuda when available")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args()

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    backends = [b for b in args.backends.split(",") if b]
    if "numpy" in backends:  # the reference goes first
        backends.remove("numpy")
    backends.insert(0, "numpy")
    lines = []

    def emit(obj):
        print(json.dumps(obj), flush=True)
        lines.append(obj)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(obj) + "\n")

    answers = None
    if args.source == "minilm":
        passages, sources, qas = corpus(args.n_vectors, args.queries, args.seed)
        vectors, secs = embed(passages, device, args.batch_size)
        queries, _ = embed([q.question for q in qas], device, args.batch_size)
        answers = [(q.source, q.answer) for q in qas]
        records = [{"text": t, "source": s} for t, s in zip(passages, sources)]
        emit({"step": "embed", "device": device, "passages": len(passages), "seconds": round(secs, 2),
              "passages_per_s": round(len(passages) / secs, 1)})
    else:
        vectors, queries = random_vectors(args.n_vectors, args.queries, args.dim, args.seed)
        sources = [""] * len(vectors)
        records = [{"text": ""} for _ in range(len(vectors))]

    root = Path(tempfile.mkdtemp(prefix="lmforge-rag-bench-"))
    try:
        ref = queries @ vectors.T  # (Q, N) exact cosine
        part = np.argpartition(-ref, args.k - 1, axis=1)[:, : args.k]  # (Q, k), unordered
        exact = [list(map(int, row)) for row in part]  # recall compares sets: order is not needed
        rows = []
        for backend in backends:
            try:
                row = measure(backend, root, vectors, records, queries, args.k, exact, answers, sources)
            except Exception as e:  # noqa: BLE001 - a store that is not installed is reported, not fatal
                row = {"backend": backend, "error": f"{type(e).__name__}: {e}"}
            emit(row)
            rows.append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    cols = ["backend", "recall_at_k", "answer_hit_at_5", "p50_ms", "p95_ms", "build_s", "reopen_s", "disk_mb"]
    print(f"\n{len(vectors):,} vectors x {vectors.shape[1]} dims, {len(queries)} queries, k={args.k}", file=sys.stderr)
    print("  ".join(f"{c:>15}" for c in cols), file=sys.stderr)
    for r in rows:
        print("  ".join(f"{str(r.get(c, r.get('error', '-') if c == 'recall_at_k' else '-'))[:15]:>15}"
                        for c in cols), file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
