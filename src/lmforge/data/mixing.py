"""Mix several datasets by weight, deterministically and resumably (``data.mix``).

Continued pretraining on domain data alone forgets general skills; mixing in general data fixes it (Chinese-LLaMA
cites domain:general = 1:5)::

    data:
      mix:
        - {path: zh_domain.jsonl, weight: 1}
        - {path: general.txt, weight: 5}

Each source is loaded, encoded and (optionally) packed on its own with the data section's settings (a source may
override its format, columns, text_mode and max_samples). The trainer then draws rows from the sources in a fixed
interleave: source k's j-th draw sits at "virtual time" ``(j + 1/2) / p_k`` (``p_k`` = its share of the weights) and
draws are taken in time order (Webster's apportionment, sequentially). After any number ``t`` of draws, source k has
had ``p_k * t`` of them give or take one, so the ratio holds in every window, not just on average. Within a source,
rows come in a fresh seeded permutation per pass, so a small source is repeated (upsampled) and a large one is
subsampled, without replacement inside a pass.

The whole order is a function of (sizes, weights, seed, draws so far): the sampler's state is one integer, saved in
the trainer checkpoint where the single-dataset sampler keeps its own (``{"epoch", "index"}``), so a resumed run
draws exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import Field

from lmforge.config import Section
from lmforge.errors import ConfigError

if TYPE_CHECKING:
    from lmforge.data.dataset import DataConfig, DataReport, TokenizedDataset

__all__ = ["MixSource", "MixedDataset", "MixtureSampler", "build_mixture"]


class MixSource(Section):
    """One dataset of a mixture and its sampling weight; unset fields come from the data section."""

    path: str | list[str]
    """A data file, a list of them, or a directory (as data.path)."""
    weight: float = Field(1.0, gt=0)
    """Relative sampling weight: with weights 1 and 5 the first source gives 1/6 of the training rows."""
    dataset: str | None = None
    """Entries of <path>/dataset_info.json (LLaMA-Factory's format), as data.dataset."""
    format: Literal["auto", "text", "alpaca", "sharegpt", "openai"] | None = None
    """Record format of this source; default: data.format."""
    columns: dict[str, str] | None = None
    """Column map of this source; default: data.columns."""
    text_mode: Literal["blocks", "file", "lines"] | None = None
    """How this source's .txt files become documents; default: data.text_mode."""
    max_samples: int | None = Field(None, ge=1)
    """Use only the first N good records of this source."""


class MixtureSampler:
    """Row indices of a ``MixedDataset`` in weighted-interleave order (see the module docstring).

    Duck-types the trainer's ``EpochSampler``: ``take(n)``, ``state()`` and settable ``epoch`` / ``index``
    (``index`` = rows drawn so far; ``epoch`` is always 0, kept so checkpoints have the same shape).
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int = 0):
        if len(sizes) != len(weights) or not sizes:
            raise ConfigError("a mixture needs one weight per source and at least one source")
        if any(n <= 0 for n in sizes):
            raise ConfigError(f"mixture source {[n > 0 for n in sizes].index(False)} has no rows")
        total = float(sum(weights))
        self.sizes = [int(n) for n in sizes]
        self.shares = np.array([w / total for w in weights], dtype=np.float64)  # (K,) p_k
        self.offsets = [0, *itertools.accumulate(self.sizes)]
        self.seed = seed
        self.epoch = 0
        self._index = 0
        self._counts = np.zeros(len(sizes), dtype=np.int64)  # draws per source at position self._index
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    # ---------------------------------------------------------------- state
    @property
    def index(self) -> int:
        return self._index

    @index.setter
    def index(self, value: int) -> None:
        """Seek (resume): the per-source counts after ``value`` draws, computed without replaying the rows."""
        self._counts = np.zeros(len(self.sizes), dtype=np.int64)
        self._index = 0
        self._sources(int(value))

    def state(self) -> dict:
        return {"epoch": 0, "index": self._index}

    # ---------------------------------------------------------------- order
    def _sources(self, n: int) -> np.ndarray:
        """Source of each of the next ``n`` draws, (n,) int64; advances the counts.

        The next n draws of source k are among its next ceil((n + K) p_k) + 2 virtual times (a window of n draws
        spans less than n + K time units), so sorting those candidates is enough.
        """
        K = len(self.sizes)
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        cand_src, cand_time = [], []
        for k in range(K):
            m = math.ceil((n + K) * self.shares[k]) + 2
            j = self._counts[k] + np.arange(m, dtype=np.int64)
            cand_time.append((j + 0.5) / self.shares[k])
            cand_src.append(np.full(m, k, dtype=np.int64))
        times, srcs = np.concatenate(cand_time), np.concatenate(cand_src)
        order = np.lexsort((srcs, times))[:n]  # by time, ties by source index
        chosen = srcs[order]
        self._counts += np.bincount(chosen, minlength=K)
        self._index += n
        return chosen

    def _perm(self, k: int, epoch: int) -> np.ndarray:
        key = (k, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.sizes):
                self._perms.clear()
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + k) * 1_000_033 + epoch)
            self._perms[key] = torch.randperm(self.sizes[k], generator=g).numpy()
        return self._perms[key]

    def take(self, n: int) -> list[int]:
        """The next ``n`` global row indices (source offset + row)."""
        start = self._counts.copy()
        chosen = self._sources(n)
        out = np.empty(n, dtype=np.int64)
        for k in range(len(self.sizes)):
            where = np.nonzero(chosen == k)[0]
            draws = start[k] + np.arange(len(where))  # source k's draw numbers
            size = self.sizes[k]
            for epoch in np.unique(draws // size):
                sel = draws // size == epoch
                out[where[sel]] = self.offsets[k] + self._perm(k, int(epoch))[draws[sel] % size]
        return out.tolist()


class MixedDataset(torch.utils.data.Dataset):
    """Several tokenized datasets behind one index space (source k's rows start at ``offsets[k]``), with the
    weights the trainer's sampler needs (``sampler(seed)``)."""

    def __init__(self, parts: Sequence[TokenizedDataset], weights: Sequence[float], names: Sequence[str]):
        self.parts, self.weights, self.names = list(parts), [float(w) for w in weights], list(names)
        self.offsets = [0, *itertools.accumulate(len(p) for p in self.parts)]
        self.packed = all(getattr(p, "packed", False) for p in self.parts)

    def __len__(self) -> int:
        """All sources' rows once: what `train.epochs` counts (prefer `train.max_steps` for mixtures)."""
        return self.offsets[-1]

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        k = bisect.bisect_right(self.offsets, i) - 1
        return self.parts[k][i - self.offsets[k]]

    def source_of(self, i: int) -> int:
        return bisect.bisect_right(self.offsets, i) - 1

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.parts)

    @property
    def num_target_tokens(self) -> int:
        return sum(p.num_target_tokens for p in self.parts)

    def sampler(self, seed: int) -> MixtureSampler:
        return MixtureSampler([len(p) for p in self.parts], self.weights, seed)


def _merge_reports(total: DataReport, part: DataReport) -> None:
    for name in ("records_read", "examples", "bad_row_count", "truncated", "chunked", "dropped", "train_samples",
                 "val_samples", "train_rows", "val_rows", "packed_rows", "tokens", "target_tokens",
                 "val_target_tokens"):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    for bad in part.bad_rows:
        if len(total.bad_rows) < total.MAX_BAD_ROWS:
            total.bad_rows.append(bad)
    total.formats.update(part.formats)
    total.notes += part.notes


def build_mixture(cfg: DataConfig, tokenizer) -> tuple[MixedDataset, TokenizedDataset | None, DataReport]:
    """``build_datasets`` for ``cfg.mix``: each source built with the data section's settings (its own where set);
    returns (mixed train rows, all sources' validation rows or None, one report)."""
    from lmforge.data.dataset import DataReport, TokenizedDataset, build_datasets

    report = DataReport(max_seq_len=cfg.max_seq_len)
    parts, vals, names = [], [], []
    for i, src in enumerate(cfg.mix):
        own = {k: v for k, v in src.model_dump(exclude={"weight"}).items() if v is not None}
        sub = cfg.model_copy(update={"mix": [], "path": src.path, "dataset": src.dataset,
                                     "max_samples": src.max_samples, **own})
        try:
            train, val, part = build_datasets(sub, tokenizer)
        except ConfigError as e:
            raise ConfigError(f"data.mix[{i}]: {e}") from None
        parts.append(train)
        names.append(src.path if isinstance(src.path, str) else ",".join(src.path))
        if val is not None and len(val):
            vals.append(val)
        _merge_reports(report, part)
    if cfg.packing:
        report.packing_efficiency = report.tokens / max(1, report.packed_rows * cfg.max_seq_len)
    mixed = MixedDataset(parts, [s.weight for s in cfg.mix], names)
    total = sum(mixed.weights)
    report.notes.append("mix: " + ", ".join(f"{n} ({len(p):,} rows, weight {w:g} = {w / total:.1%} of draws)"
                                            for n, p, w in zip(names, parts, mixed.weights)))
    val = TokenizedDataset([v[i] for v in vals for i in range(len(v))]) if vals else None
    return mixed, val, report
