"""From ``DataConfig`` to tokenized train/val datasets, a report of what happened to the data, and the collate function.

Batch contract (what :func:`collate` returns; every tensor int64 ``(B, T)``, right-padded to the longest row):

- ``tokens``: input ids, padding = ``pad_id``;
- ``labels``: pre-shifted targets (``labels[b, t]`` follows ``tokens[b, :t+1]``), -100 = no loss, padding = -100;
- ``positions``: position of each token within its document (restarts at 0 per document), padding = -1;
- ``document_ids``: only for packed rows: 0, 1, 2, ... per document within the row, padding = -1.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from lmforge.config import Section
from lmforge.data.encode import IGNORE, Sample, encode_conversations, encode_documents, fit_length
from lmforge.data.formats import Conversation, Document, load_examples, resolve_sources
from lmforge.data.mixing import MixSource
from lmforge.data.packing import pack_samples
from lmforge.errors import ConfigError

__all__ = ["DataConfig", "DataReport", "TokenizedDataset", "build_datasets", "collate"]


class DataConfig(Section):
    """Where the training data is, what it looks like, and how it becomes rows of tokens."""

    path: str | list[str] | None = None
    """A data file (.json, .jsonl, .parquet, .txt), a list of them, or a directory (all its data files; with
    `dataset`, the directory holding dataset_info.json). Set this or `mix`."""
    dataset: str | None = None
    """Name(s) of entries in <path>/dataset_info.json (LLaMA-Factory's format), comma-separated."""
    format: Literal["auto", "text", "alpaca", "sharegpt", "openai"] = "auto"
    """Record format: text (pretraining), alpaca, sharegpt or openai (SFT); auto = detected from the first good
    record of each file (.txt files are always text)."""
    columns: dict[str, str] = {}
    """Format field -> column name in your files, e.g. {output: answer} (LLaMA-Factory's prompt/query/response
    names are accepted too)."""
    max_seq_len: int = Field(1024, ge=2)
    """Maximum tokens per row (per sample, or per packed row)."""
    packing: bool = False
    """Pack several samples into each row (positions restart per document and document_ids keep attention
    within a document) instead of padding one sample per row."""
    truncation: Literal["right", "drop"] = "right"
    """What to do with a sample longer than max_seq_len: right = keep its start, drop = skip it."""
    train_on_prompt: bool = False
    """SFT: also train on system/user/tool tokens (by default only assistant turns are trained)."""
    val_split: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of records held out for validation (chosen deterministically by seed)."""
    val_path: str | None = None
    """A separate validation file (same format and columns); replaces val_split."""
    max_samples: int | None = Field(None, ge=1)
    """Use only the first N good records of the training data (before the validation split)."""
    seed: int = 0
    """Seed of the validation split."""
    text_mode: Literal["blocks", "file", "lines"] = "blocks"
    """How .txt files become documents: blank-line-separated blocks, the whole file, or each non-empty line
    (unset, .txt entries of a dataset_info.json are read by lines, as LLaMA-Factory does)."""
    chunk_text: bool = True
    """Pretraining: split documents longer than max_seq_len into max_seq_len chunks instead of truncating them."""
    max_bad_row_share: float = Field(0.1, ge=0.0, le=1.0)
    """Largest share of bad rows (broken JSON, bytes that are not UTF-8, unreadable records) training accepts:
    above it the run stops before training with the counts and the first bad rows (1.0 = never stop)."""

    mix: list[MixSource] = []
    """Several datasets sampled by weight instead of `path`, e.g. [{path: domain.jsonl, weight: 1}, {path:
    general.txt, weight: 5}]; deterministic by train.seed and exactly resumable (lmforge.data.mixing)."""

    @model_validator(mode="after")
    def _one_validation_source(self):
        if self.val_path is not None and self.val_split > 0:
            raise ValueError("set either val_split or val_path, not both")
        if (self.path is None) == (not self.mix):
            raise ValueError("set data.path (one dataset) or data.mix (several, by weight), exactly one of them")
        return self


@dataclass
class DataReport:
    """What loading, encoding and packing did to the data; ``summary()`` is printed before training."""

    records_read: int = 0
    """Rows read from all files (good and bad)."""
    examples: int = 0
    """Good records (documents + conversations)."""
    bad_rows: list[tuple[str, int, str]] = field(default_factory=list)
    """First ``MAX_BAD_ROWS`` bad rows as (file, row, reason); rows are 1-based (JSONL/text: line numbers)."""
    bad_row_count: int = 0
    formats: dict[str, str] = field(default_factory=dict)
    """file -> format it was read as."""
    truncated: int = 0
    chunked: int = 0
    """Documents split into several max_seq_len chunks."""
    dropped: int = 0
    """Samples dropped: too long with truncation=drop, or no trainable target left."""
    train_samples: int = 0
    val_samples: int = 0
    train_rows: int = 0
    val_rows: int = 0
    packed_rows: int = 0
    packing_efficiency: float | None = None
    """Real tokens / (rows * max_seq_len) of the packed training rows."""
    tokens: int = 0
    """Real (non-padding) tokens in the training rows."""
    target_tokens: int = 0
    """Training targets (labels != -100)."""
    val_target_tokens: int = 0
    max_seq_len: int = 0
    notes: list[str] = field(default_factory=list)

    MAX_BAD_ROWS = 20

    def add_bad(self, file: str, row: int, reason: str) -> None:
        self.bad_row_count += 1
        if len(self.bad_rows) < self.MAX_BAD_ROWS:
            self.bad_rows.append((file, row, reason))

    def summary(self) -> str:
        files = ", ".join(f"{f.rsplit('/', 1)[-1]} ({fmt})" for f, fmt in self.formats.items())
        lines = [f"data: {self.records_read:,} records from {files}; {self.bad_row_count:,} bad"]
        lines += [f"  bad row {f}:{row}: {why}" for f, row, why in self.bad_rows[:3]]
        if self.bad_row_count > 3:
            lines.append(f"  ... {self.bad_row_count - 3:,} more bad rows (DataReport.bad_rows)")
        lines.append(f"samples: {self.train_samples:,} train / {self.val_samples:,} val; {self.truncated:,} truncated "
                     f"and {self.dropped:,} dropped at max_seq_len {self.max_seq_len}, {self.chunked:,} documents "
                     "chunked")
        share = self.target_tokens / self.tokens if self.tokens else 0.0
        line = f"tokens: {self.tokens:,} train ({self.target_tokens:,} targets, {share:.1%})"
        if self.packing_efficiency is not None:
            line += f"; packed into {self.packed_rows:,} rows (efficiency {self.packing_efficiency:.1%})"
        lines.append(line)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class TokenizedDataset(torch.utils.data.Dataset):
    """Rows of tokens, each a dict of python int lists: ``tokens``, ``labels``, ``positions`` (T,) and, for packed
    rows, ``document_ids`` (T,).

    Stored flat (int32 tensors plus row offsets), so a dataset costs ~4 bytes per token per field instead of a python
    list's ~36; unpacked rows store no positions (they are ``0..T-1``).
    """

    def __init__(self, rows: Sequence[dict[str, Sequence[int]]]):
        self.packed = bool(rows) and "document_ids" in rows[0]
        keys = ("tokens", "labels", "positions", "document_ids") if self.packed else ("tokens", "labels")
        lengths = [len(r["tokens"]) for r in rows]
        self.offsets = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)  # (N + 1,)
        total = int(self.offsets[-1])
        self._flat = {k: torch.from_numpy(np.fromiter(itertools.chain.from_iterable(r[k] for r in rows), np.int32,
                                                      count=total)) for k in keys}

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> TokenizedDataset:
        return cls([{"tokens": s.tokens, "labels": s.labels} for s in samples])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        i %= len(self)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        row = {k: v[a:b].tolist() for k, v in self._flat.items()}
        if not self.packed:
            row["positions"] = list(range(b - a))
        return row

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens per row, (N,) int64."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_target_tokens(self) -> int:
        """Total labels != -100."""
        return int((self._flat["labels"] != IGNORE).sum())


# ------------------------------------------------------------------------------------------------ building


def _load(path: str | list[str], dataset: str | None, cfg: DataConfig, report: DataReport) -> list:
    examples = []
    for source in resolve_sources(path, dataset, cfg.format, cfg.columns):
        explicit = "text_mode" in cfg.model_fields_set
        mode = cfg.text_mode if explicit or source.text_mode is None else source.text_mode
        got, n_rows, fmt = load_examples(source, mode, report.add_bad)
        report.records_read += n_rows
        report.examples += len(got)
        report.formats[str(source.path)] = fmt
        examples += got
    return examples


def _split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``round(len * fraction)`` (at least 1) examples chosen by ``seed``; both parts keep file order."""
    n_val = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    if n_val <= 0:
        return examples, []
    held = set(random.Random(seed).sample(range(len(examples)), n_val))
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def _encode(examples: list, tokenizer, cfg: DataConfig, report: DataReport) -> tuple[TokenizedDataset, int, float]:
    """Encode, fit to max_seq_len and (optionally) pack; returns (dataset, n_samples, packing efficiency)."""
    docs = [e for e in examples if isinstance(e, Document)]
    convs = [e for e in examples if isinstance(e, Conversation)]
    encoded = [(s, True) for s in encode_documents(docs, tokenizer)] if docs else []
    if convs:
        samples, unstable = encode_conversations(convs, tokenizer, cfg.train_on_prompt, report.add_bad)
        encoded += [(s, False) for s in samples]
        if unstable:
            report.notes.append(f"the chat template is not prefix-stable for {unstable:,} conversations: their "
                                "assistant turns were located by rendering each turn on its own")
    fitted: list[Sample] = []
    for sample, is_doc in encoded:
        pieces, status = fit_length(sample, cfg.max_seq_len, "chunk" if is_doc and cfg.chunk_text else cfg.truncation)
        report.truncated += status == "truncated"
        report.chunked += status == "chunked"
        report.dropped += status in ("dropped", "empty")
        fitted += pieces
    if not cfg.packing:
        return TokenizedDataset.from_samples(fitted), len(fitted), 0.0
    rows, efficiency = pack_samples(fitted, cfg.max_seq_len)
    return TokenizedDataset(rows), len(fitted), efficiency


def check_bad_share(report: DataReport, limit: float) -> None:
    """One-line ConfigError when more than `limit` of the rows read are bad: a file that is mostly broken is the
    wrong file (or a wrong format), not a few rows to skip; training on what is left would silently waste the run.
    `report` is any report with records_read / bad_row_count / bad_rows (SFT's DataReport, alignment's
    PreferenceReport)."""
    if report.bad_row_count == 0 or report.bad_row_count <= limit * report.records_read:
        return
    first = "; ".join(f"{f}:{row}: {why}" for f, row, why in report.bad_rows[:3])
    raise ConfigError(f"{report.bad_row_count:,} of {report.records_read:,} data rows are bad "
                      f"({report.bad_row_count / max(report.records_read, 1):.0%}, above data.max_bad_row_share="
                      f"{limit:g}); first: {first}. Fix the file or raise data.max_bad_row_share")


def build_datasets(cfg: DataConfig, tokenizer) -> tuple[TokenizedDataset, TokenizedDataset | None, DataReport]:
    """Load, split, encode and (optionally) pack the data of ``cfg``: ``(train, val or None, report)``.

    Bad records are counted in the report, never raised; a ConfigError is raised only for unusable configuration
    (missing files, undetectable formats) or when no training sample is left.
    """
    if cfg.mix:
        from lmforge.data.mixing import build_mixture

        return build_mixture(cfg, tokenizer)
    report = DataReport(max_seq_len=cfg.max_seq_len)
    train_ex = _load(cfg.path, cfg.dataset, cfg, report)
    if cfg.max_samples is not None:
        train_ex = train_ex[: cfg.max_samples]
    val_ex = None
    if cfg.val_path is not None:
        val_ex = _load(cfg.val_path, None, cfg, report)
    elif cfg.val_split > 0:
        train_ex, val_ex = _split(train_ex, cfg.val_split, cfg.seed)
    train, report.train_samples, efficiency = _encode(train_ex, tokenizer, cfg, report)
    if len(train) == 0:
        first = f" (first bad row: {':'.join(map(str, report.bad_rows[0]))})" if report.bad_rows else ""
        raise ConfigError(f"no usable training samples in data.path={cfg.path!r}: {report.records_read} records, "
                          f"{report.bad_row_count} bad, {report.dropped} dropped at max_seq_len {cfg.max_seq_len}"
                          f"{first}")
    report.train_rows, report.tokens, report.target_tokens = len(train), train.num_tokens, train.num_target_tokens
    if cfg.packing:
        report.packed_rows, report.packing_efficiency = len(train), efficiency
    val = None
    if val_ex is not None:
        val, report.val_samples, _ = _encode(val_ex, tokenizer, cfg, report)
        report.val_rows, report.val_target_tokens = len(val), val.num_target_tokens
    return train, val, report


# ------------------------------------------------------------------------------------------------ batching

_PAD = {"labels": IGNORE, "positions": -1, "document_ids": -1}


def collate(batch: list[dict], pad_id: int | None, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one (optionally rounded up to a multiple): int64 ``(B, T)`` tensors.

    tokens pad with ``pad_id`` (0 when the tokenizer has none: padded tokens are masked by positions -1 and never
    targets), labels with -100, positions and document_ids with -1. ``document_ids`` is included only when the rows
    have it (packed data).
    """
    if not batch:
        raise ValueError("collate needs at least one row")
    T = max(len(r["tokens"]) for r in batch)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    keys = ["tokens", "labels", "positions"] + (["document_ids"] if "document_ids" in batch[0] else [])
    out = {}
    for k in keys:
        fill = (0 if pad_id is None else pad_id) if k == "tokens" else _PAD[k]
        t = torch.full((len(batch), T), fill, dtype=torch.int64)
        for i, r in enumerate(batch):
            values = r[k] if k in r else range(len(r["tokens"]))  # rows without positions count from 0
            t[i, : len(values)] = torch.as_tensor(list(values), dtype=torch.int64)
        out[k] = t
    return out
