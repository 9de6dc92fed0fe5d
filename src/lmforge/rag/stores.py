"""Vector stores behind one interface: add unit vectors with their chunk records, search by cosine similarity.

| backend     | where                               | search                          | why it is here                       |
|-------------|-------------------------------------|---------------------------------|--------------------------------------|
| `faiss`     | a folder: `index.faiss` + records   | exact inner product (BLAS)      | the default: exact, fastest measured |
| `faiss-hnsw`| same                                | HNSW graph, approximate         | millions of chunks on one machine    |
| `lancedb`   | a Lance dataset folder              | exact scan (index optional)     | columnar, appendable, no server      |
| `sqlite-vec`| one SQLite file                     | exact scan in C                 | one file, transactional              |
| `numpy`     | `vectors.npy` + records             | exact matmul                    | the reference the bench measures by  |
| `qdrant`    | a Qdrant server (url)               | HNSW on the server              | scale-out; not tested without one    |

bench/rag_store.py measures recall@k against `numpy` and latency for each; docs/rag.md has the figures and the
reasons for the default. Records are JSON dicts (text, source, position, heading, ...); ids are ints in insertion
order. File-backed stores write on `save()` (and `close()`).
"""
from __future__ import annotations

import json
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError, LmforgeError

BACKENDS = ("faiss", "faiss-hnsw", "lancedb", "sqlite-vec", "numpy", "qdrant")


class VectorStore(ABC):
    backend: str
    dim: int

    @abstractmethod
    def add(self, vectors: np.ndarray, records: Sequence[dict]) -> list[int]:
        """Append (N, dim) unit vectors with N records; returns their ids."""

    @abstractmethod
    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(id, cosine similarity) of the k nearest, best first; query is (dim,) of unit length."""

    @abstractmethod
    def get(self, ids: Sequence[int]) -> list[dict]:
        """Records of `ids`, in that order."""

    @abstractmethod
    def records(self) -> Iterator[tuple[int, dict]]:
        """Every (id, record), in id order (to build the keyword index)."""

    @abstractmethod
    def __len__(self) -> int: ...

    def save(self) -> None:
        """Persist what was added (no-op where every add is already durable)."""

    def close(self) -> None:
        self.save()

    def _check(self, vectors: np.ndarray, records: Sequence[dict]) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise LmforgeError(f"{self.backend} store holds {self.dim}-dim vectors, got shape {vectors.shape}; "
                               "index and query with the same embedder")
        if len(vectors) != len(records):
            raise LmforgeError(f"{len(vectors)} vectors but {len(records)} records")
        return vectors


class _RecordTable:
    """Records as JSON rows of a plain SQLite table (stdlib sqlite3, no extension)."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(str(path), check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, record TEXT NOT NULL)")

    def add(self, start: int, records: Sequence[dict]) -> list[int]:
        ids = list(range(start, start + len(records)))
        self.db.executemany("INSERT INTO chunks VALUES (?, ?)",
                            [(i, json.dumps(r, ensure_ascii=False)) for i, r in zip(ids, records)])
        self.db.commit()
        return ids

    def get(self, ids: Sequence[int]) -> list[dict]:
        if not ids:
            return []
        rows = dict(self.db.execute(f"SELECT id, record FROM chunks WHERE id IN ({','.join('?' * len(ids))})",
                                    [int(i) for i in ids]).fetchall())
        return [json.loads(rows[int(i)]) for i in ids]

    def all(self) -> Iterator[tuple[int, dict]]:
        for i, r in self.db.execute("SELECT id, record FROM chunks ORDER BY id"):
            yield i, json.loads(r)

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]


class NumpyStore(VectorStore):
    """Exact search by one matrix product: the reference the other stores are measured against."""

    backend = "numpy"

    def __init__(self, path: str | Path, dim: int):
        self.path, self.dim = Path(path), dim
        self.path.mkdir(parents=True, exist_ok=True)
        self.table = _RecordTable(self.path / "records.db")
        f = self.path / "vectors.npy"
        self.vectors = np.load(f) if f.is_file() else np.zeros((0, dim), np.float32)  # (N, dim)

    def add(self, vectors, records):
        vectors = self._check(vectors, records)
        ids = self.table.add(len(self.vectors), records)
        self.vectors = np.concatenate([self.vectors, vectors])
        return ids

    def search(self, query, k):
        if not len(self.vectors):
            return []
        scores = self.vectors @ np.asarray(query, np.float32)  # (N,)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(i), float(scores[i])) for i in top]

    def get(self, ids):
        return self.table.get(ids)

    def records(self):
        return self.table.all()

    def __len__(self):
        return len(self.vectors)

    def save(self):
        np.save(self.path / "vectors.npy", self.vectors)


class FaissStore(VectorStore):
    """FAISS on disk: `IndexFlatIP` (exact) or `IndexHNSWFlat` (approximate, for millions of vectors)."""

    def __init__(self, path: str | Path, dim: int, kind: str = "flat", hnsw_m: int = 32, ef_search: int = 64):
        try:
            import faiss
        except ImportError:
            raise LmforgeError("the faiss store needs faiss: pip install faiss-cpu") from None
        self.faiss, self.path, self.dim, self.kind = faiss, Path(path), dim, kind
        self.backend = "faiss" if kind == "flat" else "faiss-hnsw"
        self.path.mkdir(parents=True, exist_ok=True)
        self.table = _RecordTable(self.path / "records.db")
        f = self.path / "index.faiss"
        if f.is_file():
            self.index = faiss.read_index(str(f))
        elif kind == "flat":
            self.index = faiss.IndexFlatIP(dim)
        else:
            self.index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = 4 * hnsw_m
        if kind == "hnsw":
            self.index.hnsw.efSearch = ef_search
        self._dirty = False

    def add(self, vectors, records):
        vectors = self._check(vectors, records)
        ids = self.table.add(self.index.ntotal, records)  # faiss ids are positions: keep them equal to ours
        self.index.add(vectors)
        self._dirty = True
        return ids

    def search(self, query, k):
        if not self.index.ntotal:
            return []
        scores, ids = self.index.search(np.asarray(query, np.float32)[None], min(k, self.index.ntotal))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def get(self, ids):
        return self.table.get(ids)

    def records(self):
        return self.table.all()

    def __len__(self):
        return int(self.index.ntotal)

    def save(self):
        if self._dirty:
            self.faiss.write_index(self.index, str(self.path / "index.faiss"))
            self._dirty = False


class SqliteVecStore(VectorStore):
    """sqlite-vec: vectors and records in one SQLite file. Python's sqlite3 must be able to load extensions; where
    it cannot (many builds), the `apsw` package provides a SQLite that can."""

    backend = "sqlite-vec"

    def __init__(self, path: str | Path, dim: int):
        try:
            import sqlite_vec
        except ImportError:
            raise LmforgeError("the sqlite-vec store needs sqlite-vec: pip install sqlite-vec") from None
        self.path, self.dim = Path(path), dim
        self.path.mkdir(parents=True, exist_ok=True)
        file = str(self.path / "store.db")
        db = sqlite3.connect(file, check_same_thread=False)
        if hasattr(db, "enable_load_extension"):
            db.enable_load_extension(True)
            sqlite_vec.load(db)
        else:
            db.close()
            try:
                import apsw
            except ImportError:
                raise LmforgeError("this Python's sqlite3 cannot load extensions; pip install apsw for sqlite-vec "
                                   "(or use store backend faiss)") from None
            db = apsw.Connection(file)
            db.enable_load_extension(True)
            db.load_extension(sqlite_vec.loadable_path())
        self.db = db
        self.db.execute("CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, record TEXT NOT NULL)")
        self.db.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS vectors USING vec0(embedding float[{dim}] "
                        "distance_metric=cosine)")

    def _commit(self):
        if isinstance(self.db, sqlite3.Connection):
            self.db.commit()

    def add(self, vectors, records):
        vectors = self._check(vectors, records)
        start = len(self)
        ids = list(range(start, start + len(records)))
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO chunks VALUES (?, ?)",
                            [(i, json.dumps(r, ensure_ascii=False)) for i, r in zip(ids, records)])
        self.db.executemany("INSERT INTO vectors(rowid, embedding) VALUES (?, ?)",
                            [(i, v.tobytes()) for i, v in zip(ids, vectors)])
        self.db.execute("COMMIT")
        return ids

    def search(self, query, k):
        rows = self.db.execute("SELECT rowid, distance FROM vectors WHERE embedding MATCH ? AND k = ? "
                               "ORDER BY distance", (np.asarray(query, np.float32).tobytes(), int(k))).fetchall()
        return [(int(i), 1.0 - float(d)) for i, d in rows]

    def get(self, ids):
        if not ids:
            return []
        rows = dict(self.db.execute(f"SELECT id, record FROM chunks WHERE id IN ({','.join('?' * len(ids))})",
                                    [int(i) for i in ids]).fetchall())
        return [json.loads(rows[int(i)]) for i in ids]

    def records(self):
        for i, r in self.db.execute("SELECT id, record FROM chunks ORDER BY id").fetchall():
            yield i, json.loads(r)

    def __len__(self):
        return self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def close(self):
        self.db.close()


class LanceStore(VectorStore):
    """LanceDB (embedded, columnar): one table of (id, vector, record)."""

    backend = "lancedb"

    def __init__(self, path: str | Path, dim: int):
        try:
            import lancedb
        except ImportError:
            raise LmforgeError("the lancedb store needs lancedb: pip install lancedb") from None
        self.path, self.dim = Path(path), dim
        self.db = lancedb.connect(str(self.path))
        names = self.db.list_tables().tables if hasattr(self.db, "list_tables") else self.db.table_names()
        self.table = self.db.open_table("chunks") if "chunks" in names else None
        self._count = self.table.count_rows() if self.table is not None else 0

    def add(self, vectors, records):
        vectors = self._check(vectors, records)
        ids = list(range(self._count, self._count + len(records)))
        rows = [{"id": i, "vector": v.tolist(), "record": json.dumps(r, ensure_ascii=False)}
                for i, v, r in zip(ids, vectors, records)]
        if self.table is None:
            self.table = self.db.create_table("chunks", rows)
        else:
            self.table.add(rows)
        self._count += len(rows)
        return ids

    def search(self, query, k):
        if self.table is None:
            return []
        q = self.table.search(np.asarray(query, np.float32)).distance_type("cosine").limit(k)
        rows = q.select(["id", "_distance"]).to_list()
        return [(int(r["id"]), 1.0 - float(r["_distance"])) for r in rows]

    def get(self, ids):
        if not ids or self.table is None:
            return []
        found = self.table.search().where(f"id IN ({','.join(str(int(i)) for i in ids)})").select(
            ["id", "record"]).limit(len(ids)).to_list()
        by_id = {int(r["id"]): json.loads(r["record"]) for r in found}
        return [by_id[int(i)] for i in ids]

    def records(self):
        if self.table is None:
            return
        rows = self.table.to_arrow().select(["id", "record"]).to_pylist()
        for r in sorted(rows, key=lambda r: r["id"]):
            yield int(r["id"]), json.loads(r["record"])

    def __len__(self):
        return self._count


class QdrantStore(VectorStore):
    """A Qdrant server (`pip install qdrant-client`): the path to scale past one machine. Not exercised by the tests
    (no server runs there); ids and records map to Qdrant point ids and payloads."""

    backend = "qdrant"

    def __init__(self, url: str, dim: int, collection: str = "lmforge", api_key: str | None = None):
        try:
            from qdrant_client import QdrantClient, models
        except ImportError:
            raise LmforgeError("the qdrant store needs qdrant-client: pip install qdrant-client") from None
        self.models, self.dim, self.collection = models, dim, collection
        self.client = QdrantClient(url=url, api_key=api_key)
        if not self.client.collection_exists(collection):
            self.client.create_collection(collection, vectors_config=models.VectorParams(
                size=dim, distance=models.Distance.COSINE))

    def add(self, vectors, records):
        vectors = self._check(vectors, records)
        start = len(self)
        ids = list(range(start, start + len(records)))
        self.client.upsert(self.collection, points=[self.models.PointStruct(id=i, vector=v.tolist(), payload=r)
                                                    for i, v, r in zip(ids, vectors, records)])
        return ids

    def search(self, query, k):
        res = self.client.query_points(self.collection, query=np.asarray(query).tolist(), limit=k)
        return [(int(p.id), float(p.score)) for p in res.points]

    def get(self, ids):
        by_id = {int(p.id): p.payload for p in self.client.retrieve(self.collection, ids=[int(i) for i in ids])}
        return [by_id[int(i)] for i in ids]

    def records(self):
        offset = None
        while True:
            points, offset = self.client.scroll(self.collection, limit=1024, offset=offset, with_payload=True)
            yield from sorted(((int(p.id), p.payload) for p in points), key=lambda x: x[0])
            if offset is None:
                return

    def __len__(self):
        return self.client.count(self.collection).count


def open_store(backend: str, path: str | Path, dim: int, url: str | None = None) -> VectorStore:
    """A store of `backend` at `path` (created if new); `url` is for server stores (qdrant)."""
    if backend == "faiss":
        return FaissStore(path, dim, "flat")
    if backend == "faiss-hnsw":
        return FaissStore(path, dim, "hnsw")
    if backend == "lancedb":
        return LanceStore(Path(path) / "lance", dim)
    if backend == "sqlite-vec":
        return SqliteVecStore(path, dim)
    if backend == "numpy":
        return NumpyStore(path, dim)
    if backend == "qdrant":
        if not url:
            raise ConfigError("store backend qdrant needs store_url=http://HOST:6333")
        return QdrantStore(url, dim, collection=Path(path).name or "lmforge")
    from ..errors import did_you_mean

    raise ConfigError(f"unknown store backend '{backend}'{did_you_mean(backend, BACKENDS)}; "
                      f"one of {', '.join(BACKENDS)}")
