"""Helpers every method shares: wrapping targeted linears, layer depth from a module path, and the lmforge-native
adapter directory for methods PEFT has no format for (BitFit, Houlsby adapters).

A native adapter directory mirrors a PEFT one: ``adapter_config.json`` (``{"lmforge_method": name, "options": {...}}``)
plus ``adapter_model.safetensors`` holding only the method's tensors under their native names.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_write
from ..errors import CheckpointError, ConfigError
from ..models.modules import linear_modules, select_targets, set_module
from .lora import replace_with_merged, swapped_for_merged

__all__ = ["wrap_linears", "layer_index", "atomic_write", "write_adapter_dir", "save_native_adapter",
           "read_native_adapter", "read_adapter_config", "read_adapter_tensors", "mergeable_layers", "merge_layers",
           "merged_layers", "float_master_dtype", "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def wrap_linears(model: nn.Module, targets: list[str] | str, wrap: Callable[[str, nn.Module], nn.Module],
                 method: str) -> list[str]:
    """Freeze `model`, then replace each linear that `targets` selects (PEFT matching rules, see `lora.select_targets`)
    by ``wrap(path, linear)``; return the wrapped paths. One-line ConfigError when nothing matches or a target is
    already wrapped by another method."""
    linears = linear_modules(model)
    chosen = select_targets(list(linears), targets)
    if not chosen:
        names = sorted({p.rsplit(".", 1)[-1] for p in linears})
        raise ConfigError(f"{method} target_modules {targets!r} match no linear layer; available: {', '.join(names)} "
                          "(or 'all-linear')")
    for path in chosen:
        if hasattr(linears[path], "base_layer"):
            raise ConfigError(f"'{path}' is already wrapped by {type(linears[path]).__name__}; apply one adapter "
                              "method to a fresh base model")
    model.requires_grad_(False)
    for path in chosen:
        set_module(model, path, wrap(path, linears[path]))
    return chosen


def layer_index(path: str) -> int | None:
    """Transformer block index in a module path ('layers.3.attn.q_proj' -> 3), None outside the blocks."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", path)
    return int(m[1]) if m else None


def write_adapter_dir(out_dir: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """adapter_config.json + adapter_model.safetensors (tensors copied to contiguous CPU storage)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cpu = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(cpu, str(tmp), metadata={"format": "pt"}))
    atomic_write(out / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict:
    file = Path(adapter_dir) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in '{adapter_dir}': pass an adapter directory")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None


def read_adapter_tensors(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    file = Path(adapter_dir) / WEIGHTS_FILE
    if file.is_file():
        return load_file(str(file))
    if (Path(adapter_dir) / "adapter_model.bin").is_file():
        return torch.load(Path(adapter_dir) / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"no {WEIGHTS_FILE} (or adapter_model.bin) in '{adapter_dir}'")


def save_native_adapter(method, model: nn.Module, out_dir: str | Path,
                        base_model_name_or_path: str | None = None) -> Path:
    """An lmforge adapter directory: the method's options and its tensors by native name."""
    config = {"lmforge_method": method.name, "options": method.model_dump(mode="json"),
              "base_model_name_or_path": base_model_name_or_path}
    return write_adapter_dir(out_dir, config, method.state_dict(model))


def read_native_adapter(adapter_dir: str | Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(options, tensors) of an lmforge adapter directory written for method `name`."""
    raw = read_adapter_config(adapter_dir)
    if raw.get("lmforge_method") != name:
        found = raw.get("lmforge_method") or raw.get("peft_type") or "unknown"
        raise CheckpointError(f"{Path(adapter_dir) / CONFIG_FILE}: adapter of method '{found}', expected '{name}'")
    return raw.get("options") or {}, read_adapter_tensors(adapter_dir)


# ----------------------------------------------------------------------------------------- merging any wrapper


def mergeable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{path: wrapper} of every linear wrapper that can fold itself into one plain linear (has `merged_linear`)."""
    return {p: m for p, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "merged_linear")}


def merge_layers(model: nn.Module) -> list[str]:
    """Replace every mergeable wrapper by its merged plain nn.Linear, in place; return the replaced paths."""
    return replace_with_merged(model, mergeable_layers(model))


@contextmanager
def merged_layers(model: nn.Module, device: torch.device | str | None = None) -> Iterator[nn.Module]:
    """Temporarily swap every mergeable wrapper for its merged nn.Linear (built on `device`); restore afterwards."""
    with swapped_for_merged(model, mergeable_layers(model), device):
        yield model


def float_master_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for new trainable tensors beside `module`: its dtype if fp32/fp64, else float32 master weights
    (a half-precision or quantized base still trains its adapter in float32, as PEFT does)."""
    ref = next(iter((*module.parameters(), *module.buffers())), None)
    if ref is None:
        raise ConfigError(f"cannot attach an adapter to {type(module).__name__}: it has no weights")
    return ref.device, ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
