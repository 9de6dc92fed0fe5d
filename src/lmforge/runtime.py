"""Where and in what precision to run: one resolver for every verb."""
from __future__ import annotations

import torch

from .errors import ConfigError


def pick_device(name: str, field: str = "device") -> torch.device:
    """'auto' → cuda when available, else cpu; a CUDA device asked for on a machine without one is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{field} '{name}' asked for, but no CUDA device is visible; use {field}=cpu")
    return torch.device(name)


def auto_dtype(device: torch.device) -> torch.dtype:
    """What precision 'auto' means for every verb: bfloat16 on a GPU that supports it, else float32."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
