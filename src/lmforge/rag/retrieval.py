"""Retrieval: BM25 keyword search, vector search, and both fused by reciprocal rank fusion, with thresholds.

Why hybrid: an embedder maps "error E-4721" and "error E-4712" to nearly the same point, while BM25 matches the
exact token; embeddings find paraphrases BM25 cannot. Reciprocal rank fusion (score = Σ 1 / (rrf_k + rank)) needs no
score calibration between the two lists. The relevance thresholds drop weak candidates *before* fusion:
`min_score` is the cosine similarity a vector hit needs, `min_keyword_score` the share of the query's keyword weight
(Σ idf of its terms) a keyword hit must reach; a query about nothing in the corpus can then return no hits at all.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..errors import ConfigError
from .chunking import _CJK

Mode = Literal["hybrid", "vector", "keyword"]

_WORD = re.compile(rf"[^\W_{_CJK}]+|[{_CJK}]+")
_CJK_RUN = re.compile(rf"^[{_CJK}]+$")
STOPWORDS = frozenset("""a an and are as at be by did do does for from had has have how i in is it its of on or
that the their there these this to was were what when where which who whom why will with you your""".split())


def keyword_tokens(text: str) -> list[str]:
    """BM25 terms: lower-cased words and numbers (stopwords dropped); CJK runs as characters plus bigrams."""
    out = []
    for w in _WORD.findall(text.lower()):
        if _CJK_RUN.match(w):
            out += list(w) + [w[i: i + 2] for i in range(len(w) - 1)]
        elif w not in STOPWORDS:
            out.append(w)
    return out


class BM25:
    """Okapi BM25 over a list of texts (ids are list positions), with postings as numpy arrays."""

    def __init__(self, texts: Iterable[str] = (), k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        self.lengths: list[int] = []
        self._postings: dict[str, list[tuple[int, int]]] = defaultdict(list)  # term → [(doc, tf)]
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.add(texts)

    def add(self, texts: Iterable[str]) -> None:
        for text in texts:
            doc = len(self.lengths)
            terms = Counter(keyword_tokens(text))
            self.lengths.append(sum(terms.values()))
            for term, tf in terms.items():
                self._postings[term].append((doc, tf))
                self._arrays.pop(term, None)

    def __len__(self) -> int:
        return len(self.lengths)

    def idf(self, term: str) -> float:
        df = len(self._postings.get(term, ()))
        return math.log(1 + (len(self) - df + 0.5) / (df + 0.5))

    def _posting(self, term: str) -> tuple[np.ndarray, np.ndarray]:
        if term not in self._arrays:
            docs, tfs = zip(*self._postings[term])
            self._arrays[term] = np.array(docs), np.array(tfs, dtype=np.float32)
        return self._arrays[term]

    def scores(self, query: str) -> tuple[np.ndarray, float]:
        """(BM25 score of every document (N,), the query's weight Σ idf over its terms found in the corpus)."""
        scores = np.zeros(len(self), np.float32)
        terms = [t for t in keyword_tokens(query) if t in self._postings]
        if not terms:
            return scores, 0.0
        lengths = np.asarray(self.lengths, np.float32)
        avg = max(lengths.mean(), 1e-6)
        for term in terms:  # repeated query terms count again, as in Lucene
            docs, tf = self._posting(term)
            norm = self.k1 * (1 - self.b + self.b * lengths[docs] / avg)
            scores[docs] += self.idf(term) * tf * (self.k1 + 1) / (tf + norm)
        return scores, sum(self.idf(t) for t in terms) + 1e-9 * len(terms)

    def search(self, query: str, k: int) -> list[tuple[int, float, float]]:
        """(doc, BM25 score, share of the query weight matched) of the k best documents with a positive score."""
        scores, weight = self.scores(query)
        hits = np.flatnonzero(scores > 0)
        top = hits[np.argsort(-scores[hits], kind="stable")][:k]
        return [(int(i), float(scores[i]), float(scores[i] / weight)) for i in top]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], rrf_k: int = 60) -> list[tuple[int, float]]:
    """Fuse ranked id lists: score(id) = Σ over lists 1 / (rrf_k + rank), rank from 1; best first."""
    fused: dict[int, float] = defaultdict(float)
    for ranking in rankings:
        for rank, doc in enumerate(ranking, start=1):
            fused[doc] += 1.0 / (rrf_k + rank)
    return sorted(fused.items(), key=lambda x: (-x[1], x[0]))


@dataclass
class Hit:
    id: int
    record: dict  # text, source, position, start, end, heading, metadata
    score: float  # what ranked it: fused RRF score (hybrid), cosine (vector) or BM25 (keyword)
    vector_score: float | None = None  # cosine similarity, when the vector search found it
    keyword_score: float | None = None  # share of the query's keyword weight matched, when BM25 found it
    extra: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.record.get("text", "")

    @property
    def source(self) -> str:
        return self.record.get("source", "")

    @property
    def citation(self) -> str:
        """`source#position` (and the heading), what a cited answer shows."""
        head = self.record.get("heading")
        return f"{self.source}#{self.record.get('position', 0)}" + (f" ({head})" if head else "")


class Retriever:
    """Top-k chunks for a query from a vector store (+ embedder) and a BM25 index over the same ids."""

    def __init__(self, store, embedder, bm25: BM25 | None = None, mode: Mode = "hybrid", k: int = 5,
                 min_score: float = 0.0, min_keyword_score: float = 0.0, candidates: int = 30, rrf_k: int = 60):
        if mode not in ("hybrid", "vector", "keyword"):
            raise ConfigError(f"retrieval mode must be hybrid, vector or keyword (got '{mode}')")
        if mode != "vector" and bm25 is None:
            raise ConfigError(f"retrieval mode '{mode}' needs a keyword index (bm25)")
        self.store, self.embedder, self.bm25, self.mode, self.k = store, embedder, bm25, mode, k
        self.min_score, self.min_keyword_score = min_score, min_keyword_score
        self.candidates, self.rrf_k = max(candidates, k), rrf_k

    def search(self, query: str, k: int | None = None) -> list[Hit]:
        return self.search_many([query], k)[0]

    def search_many(self, queries: list[str], k: int | None = None) -> list[list[Hit]]:
        """`search` for several queries, their embeddings computed in one batch (evaluation, benches)."""
        k = k or self.k
        vectors = self.embedder.embed(queries) if self.mode != "keyword" else [None] * len(queries)  # (Q, dim)
        return [self._search(q, v, k) for q, v in zip(queries, vectors)]

    def _search(self, query: str, q_vector, k: int) -> list[Hit]:
        vector: dict[int, float] = {}
        keyword: dict[int, tuple[float, float]] = {}
        if self.mode != "keyword":
            vector = {i: s for i, s in self.store.search(q_vector, self.candidates) if s >= self.min_score}
        if self.mode != "vector":
            keyword = {i: (s, share) for i, s, share in self.bm25.search(query, self.candidates)
                       if share >= self.min_keyword_score}
        if self.mode == "vector":
            ranked = list(vector.items())
        elif self.mode == "keyword":
            ranked = [(i, s) for i, (s, _) in keyword.items()]
        else:
            ranked = reciprocal_rank_fusion([list(vector), list(keyword)], self.rrf_k)
        ranked = ranked[:k]
        records = self.store.get([i for i, _ in ranked])
        return [Hit(i, rec, s, vector.get(i), keyword[i][1] if i in keyword else None)
                for (i, s), rec in zip(ranked, records)]
