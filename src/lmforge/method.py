"""The training-method seam: the `Method` base class and the one registry of methods (`METHODS`).

A method is a config section with behaviour: it changes what a training run trains and what it saves, without the
loop knowing (see `lmforge.peft.methods` for the calls the trainer makes). Every method is a `Method` subclass in its
own module, made selectable as `method: <name>` by `register_method`: full fine-tuning, LoRA and its relatives in
`lmforge.peft`, QAT and BitNet in `lmforge.quant`. This module imports neither package, so both depend on it and
not on each other.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .checkpoint import load_tensors_into
from .config import Section, load_config
from .errors import ConfigError, did_you_mean
from .models.hf import save_hf

__all__ = ["Method", "METHODS", "register_method", "build_method"]


class Method(Section):
    """Base of every method; its fields are the method's options (a Section: unknown keys are errors)."""

    name: ClassVar[str] = ""
    trains: ClassVar[str] = ""  # what is trained, in a few words (for `lmforge methods`)
    artifact: ClassVar[str] = ""  # what `save` writes
    mergeable: ClassVar[bool] = True  # can `export` fold it into plain weights (prompts and nonlinear adapters: no)
    derived: ClassVar[tuple[str, ...]] = ()  # inherited fields the method sets itself (a config may not set them)

    def apply(self, model: nn.Module) -> None:
        """Prepare `model` for training in place: wrap layers, add parameters, set requires_grad."""
        raise NotImplementedError

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs the optimizer updates: those with requires_grad after `apply`."""
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a training checkpoint must store to resume (tensors share storage with the model)."""
        raise NotImplementedError

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict` output into an `apply`-ed model; names and shapes must match exactly."""
        load_tensors_into(self.state_dict(model), state, f"{self.name} checkpoint")

    def save(self, model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
        """Write the method's shareable artifact to `out_dir`."""
        raise NotImplementedError

    def check_save(self, model: nn.Module) -> None:
        """Raise now what `save` would refuse after training (called right after `apply`); no-op by default."""

    def on_step(self, model: nn.Module, step: int) -> None:
        """Called by the training loop after each optimizer step (`step` counted from 1): methods that change
        their own state during training (rank allocation, pruning) act here. Default: nothing."""

    def load(self, model: nn.Module, path: str | Path) -> None:
        """Read what `save` wrote into `model` (a base model, instead of `apply` for LoRA)."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> None:
        """Fold the method into plain weights in place, where that means something (no-op otherwise)."""

    def export(self, model: nn.Module, out_dir: str | Path) -> Path:
        """A full HF checkpoint of the model as it now computes."""
        return save_hf(model, out_dir)


METHODS: dict[str, type[Method]] = {}  # name -> class, in registration order (full and lora first: lmforge.peft)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` selectable as `method: <cls.name>`."""
    METHODS[cls.name] = cls
    return cls


def _register_builtins() -> None:
    """Import the packages whose modules register the built-in methods (peft first: full and lora lead the list), so
    the registry is complete whichever package was imported first."""
    import importlib

    for module in ("lmforge.peft", "lmforge.quant.qat", "lmforge.quant.bitnet"):
        importlib.import_module(module)


def build_method(name: str, **options) -> Method:
    """The method `name` with `options` validated (unknown name or key -> one-line ConfigError)."""
    if name not in METHODS:
        _register_builtins()
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'{did_you_mean(name, METHODS)}; available: {', '.join(METHODS)}")
    try:
        return load_config(METHODS[name], base=options)
    except ConfigError as e:
        raise ConfigError(f"method '{name}': {e}") from None
