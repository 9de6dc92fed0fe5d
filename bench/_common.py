"""Helpers every bench script shares: device sync, peak-memory reset/readout, timed steps.

Bench scripts run as `python bench/NAME.py`, so this module is importable as `_common` from them."""
from __future__ import annotations

import gc
import time

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def mem_reset() -> None:
    """Free what earlier variants left (trainer <-> hook cycles need the collector) and restart the peak counter."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def time_steps(step, warmup: int, steps: int) -> float:
    """Seconds per call of `step()` after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps
