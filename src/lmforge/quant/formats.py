"""Quantized checkpoint formats: lmforge's own, and GPTQ / AWQ as transformers, vLLM and the GPTQ/AWQ tools write them.

`load_quantized_checkpoint` is what `lmforge.models.load_hf` calls when config.json has a ``quantization_config``:
it dispatches on ``quant_method`` (``lmforge``, ``gptq``, ``awq``), builds the quantized model on the device and
then installs each layer's fused kernel for that device (`prepare_fast_path`), so every verb gets the fast path
without asking for it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from .linear import prepare_fast_path

__all__ = ["FORMATS", "READABLE", "load_quantized_checkpoint", "use_fast_path"]

FORMATS = ("lmforge", "gptq", "awq")  # what `lmforge quantize --format` writes
READABLE = FORMATS  # the quant_method values load_hf reads (others fall through to the plain loader)


def use_fast_path(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Install the device's fused kernels on every quantized linear of `model` (already on its device) for inputs
    of `dtype`; each layer checks its kernel against the reference on a probe input first. The probe's random
    numbers come from a forked generator, so loading a model never moves the caller's RNG."""
    device = next((t.device for t in model.buffers()), torch.device("cpu"))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return prepare_fast_path(model, dtype)


def load_quantized_checkpoint(path: str | Path, hf: dict, dtype: torch.dtype | None = None,
                              device: str | torch.device = "cpu") -> nn.Module:
    """The model of a quantized checkpoint directory with config.json `hf` (its ``quantization_config`` names the
    format), on `device`, floating tensors in `dtype` (default: the checkpoint's), fast path installed."""
    path = Path(path)
    method = str(hf["quantization_config"].get("quant_method", "")).lower()
    if method == "lmforge":
        from .model import load_quantized

        model = load_quantized(path, device=device, dtype=dtype)
    else:
        raise CheckpointError(f"{path}/config.json: quantization_config.quant_method '{method}' is not readable by "
                              f"lmforge; readable: {', '.join(READABLE)}")
    use_fast_path(model, model.embed.weight.dtype)
    return model
