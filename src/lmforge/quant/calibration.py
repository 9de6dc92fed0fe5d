"""Calibration for AWQ and GPTQ: token windows from a local text file, and a block-by-block pass over a model.

Both methods need the inputs each linear sees. Running the whole model once and keeping every activation costs too
much memory on a real model, so `BlockwiseCalibration` does what GPTQ's reference does: capture the inputs of the
first block once, then for each block (1) run it with hooks that feed per-linear statistics, (2) let the method
quantize the block in place, (3) run the *quantized* block to produce the next block's inputs, so later blocks are
calibrated against the errors of earlier ones.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["calibration_tokens", "InputStats", "BlockwiseCalibration"]


def _read_texts(path: Path) -> list[str]:
    """Plain text (.txt and anything else), or JSONL rows with a 'text' field (rows end at \\n only)."""
    from ..data.formats import not_utf8, read_text, split_lines

    text = read_text(path)
    if path.suffix != ".jsonl":
        if why := not_utf8(text):
            raise ConfigError(f"calibration file {path}: {why}")
        return [text]
    texts = []
    for i, line in enumerate(split_lines(text), 1):
        if not line.strip():
            continue
        try:
            if why := not_utf8(line, i):
                raise ValueError(why)
            row = json.loads(line)
        except ValueError as e:  # JSONDecodeError is a ValueError
            raise ConfigError(f"calibration file {path}:{i}: {getattr(e, 'msg', e)}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ConfigError(f"calibration file {path}:{i}: JSONL rows need a 'text' string field "
                              f"(got {sorted(row) if isinstance(row, dict) else type(row).__name__})")
        texts.append(row["text"])
    return texts


def calibration_tokens(path: str | Path, tokenizer, n_samples: int = 128, seq_len: int = 512,
                       seed: int = 0) -> torch.Tensor:
    """(n, seq_len) int64 windows at random offsets of the tokenized file (n <= n_samples when the text is short).

    `tokenizer` is an lmforge Tokenizer (anything with ``encode(text) -> list[int]``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"calibration file not found: {path} (calib: a local .txt or .jsonl file)")
    ids = [i for text in _read_texts(path) for i in tokenizer.encode(text)]
    if len(ids) < seq_len + 1:
        raise ConfigError(f"calibration file {path} has {len(ids)} tokens, fewer than calib_seq_len={seq_len}; "
                          f"use a longer text or a smaller calib_seq_len")
    ids = torch.tensor(ids, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(len(ids) - seq_len, generator=g)[:n_samples]
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


class InputStats:
    """What one linear saw during calibration: sum of x^T x (GPTQ's Hessian), mean |x| per channel and a sample of
    input rows (AWQ's search data), accumulated over calls."""

    def __init__(self, in_features: int, hessian: bool, max_rows: int, device):
        self.n = 0
        self.abs_sum = torch.zeros(in_features, device=device)
        self.hessian = torch.zeros(in_features, in_features, device=device) if hessian else None
        self.max_rows, self.rows = max_rows, []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (rows, in)
        self.n += x.shape[0]
        self.abs_sum += x.abs().sum(0)
        if self.hessian is not None:
            self.hessian += x.T @ x
        kept = sum(r.shape[0] for r in self.rows)
        if kept < self.max_rows:
            self.rows.append(x[: self.max_rows - kept])

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)  # (<= max_rows, in)


class _Stop(Exception):
    pass


class BlockwiseCalibration:
    """Drive a block-by-block calibration pass over `model.layers` with calibration `tokens` (n, T)."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, batch_size: int = 8):
        self.model = model
        device = model.embed.weight.device
        self.batches: list[tuple[torch.Tensor, tuple, dict]] = []  # per batch: (x, other args, kwargs) of block 0

        def grab(_module, args, kwargs):
            self.batches.append((args[0], args[1:], kwargs))
            raise _Stop

        hook = model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                for b in tokens.split(batch_size):
                    try:
                        model(b.to(device))
                    except _Stop:
                        pass
        finally:
            hook.remove()

    def run(self, linears_of: Callable[[nn.Module], dict[str, nn.Module]],
            quantize_block: Callable[[int, nn.Module, dict[str, InputStats]], None],
            hessian: bool = False, max_rows: int = 4096) -> None:
        """For each block: stats of its linears (`linears_of(block)` -> {name: module}), `quantize_block(i, block,
        stats)` replaces/modifies them in place, then the quantized block computes the next block's inputs."""
        for i, block in enumerate(self.model.layers):
            linears = linears_of(block)
            stats = {name: InputStats(m.in_features, hessian, max_rows, self.batches[0][0].device)
                     for name, m in linears.items()}
            hooks = [m.register_forward_hook(lambda _m, inp, _out, s=stats[name]: s.add(inp[0]))
                     for name, m in linears.items()]
            try:
                for _ in self._forward(block):
                    pass
            finally:
                for h in hooks:
                    h.remove()
            quantize_block(i, block, stats)
            self.batches = [(y, args, kw) for y, (_, args, kw) in zip(self._forward(block), self.batches)]

    @torch.no_grad()
    def _forward(self, block: nn.Module) -> Iterator[torch.Tensor]:
        for x, args, kwargs in self.batches:
            yield block(x, *args, **kwargs)
