"""A model's linears by module path: which ones a target list selects, and swapping one for another module.

Every method that replaces linears after construction (LoRA and its relatives, quantization, QAT, BitNet, the
engine's multi-LoRA) finds them here, so target names mean the same everywhere. They follow PEFT: a list entry
matches a module path exactly or as its last dotted components (``"q_proj"`` matches ``layers.3.attn.q_proj``), a
single string is a regex that must match the whole path, and ``"all-linear"`` means every linear but ``lm_head``.
"""
from __future__ import annotations

import re

from torch import nn

__all__ = ["ALL_LINEAR", "OUTPUT_HEAD", "is_linear", "linear_modules", "matches", "select_targets", "set_module"]

ALL_LINEAR = "all-linear"
OUTPUT_HEAD = "lm_head"  # native path of the output layer, which "all-linear" leaves out (as PEFT does)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or anything linear-like (a quantized linear, a LoRA wrapper): has in_features and out_features."""
    return isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features"))


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{path: module} of every linear in `model`, in module order; a wrapper that is linear-like (a LoRALinear)
    counts as one and its insides don't."""
    out: dict[str, nn.Module] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = prefix + name
            if is_linear(child):
                out[path] = child
            else:
                visit(path + ".", child)

    visit("", model)
    return out


def matches(path: str, targets: list[str] | str) -> bool:
    """Whether `targets` (a list of names, or one regex) selects module `path`."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def select_targets(paths: list[str], targets: list[str] | str, head: str | None = OUTPUT_HEAD) -> list[str]:
    """The `paths` that `targets` selects (PEFT rules; 'all-linear' = all but `head`), in their given order."""
    if targets == ALL_LINEAR:
        return [p for p in paths if p != head]
    return [p for p in paths if matches(p, targets)]


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at dotted `path` inside `model` (replacing what was there)."""
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
