"""The method seam: how a training run changes what is trained and what is saved, without the loop knowing.

A method is a config section with behaviour. The trainer calls, in order::

    method = build_method(cfg.method, **cfg.<method>.model_dump())  # its options: the section named after it
    method.apply(model)                                              # wrap / freeze, before the optimizer exists
    optimizer = AdamW(p for _, p in method.trainable_parameters(model))
    ...  torch.save(method.state_dict(model), ckpt)  /  method.load_state_dict(model, torch.load(ckpt))
    method.save(model, out_dir)      # the artifact users share: HF checkpoint (full) or PEFT adapter (lora)
    method.export(model, out_dir)    # always a full HF checkpoint (lora merged), the model stays usable

Every other method (dora, qlora, adalora, prilora, ia3, bitfit, adapter, prefix, p-tuning, prompt tuning) is a
`Method` subclass in its own module, added to `METHODS` with `register_method`; importing `lmforge.peft` registers
them all. `describe_methods(model)` is the `lmforge methods` listing (what each trains, how many parameters, what it
saves).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..config import Section, load_config
from ..errors import ConfigError, did_you_mean
from ..models.hf import load_hf, save_hf
from .lora import LoraConfig, apply_lora, load_tensors_into, lora_state_dict, merge_lora, merged
from .peft_format import check_peft_targets, load_peft_adapter, save_peft_adapter

__all__ = ["Method", "FullMethod", "LoraMethod", "METHODS", "build_method", "register_method", "describe_methods",
           "methods_listing", "adapter_method", "load_adapter"]


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


class FullMethod(Method):
    """Full fine-tuning: every parameter trains; checkpoints and artifacts are whole models."""

    name: ClassVar[str] = "full"
    trains: ClassVar[str] = "every parameter"
    artifact: ClassVar[str] = "full HF checkpoint"

    def apply(self, model: nn.Module) -> None:
        model.requires_grad_(True)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def save(self, model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
        return save_hf(model, out_dir)

    def load(self, model: nn.Module, path: str | Path) -> None:
        """Copy an HF checkpoint's weights into `model` (holds a second copy while loading)."""
        w = model.embed.weight
        self.load_state_dict(model, load_hf(path, dtype=w.dtype, device=w.device, progress=False).state_dict())


class LoraMethod(Method, LoraConfig):
    """LoRA: frozen base, trainable low-rank updates (+ modules_to_save); artifacts are PEFT adapters."""

    name: ClassVar[str] = "lora"
    trains: ClassVar[str] = "low-rank updates B A of the target linears"
    artifact: ClassVar[str] = "PEFT adapter (LORA)"

    def apply(self, model: nn.Module) -> None:
        apply_lora(model, self)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return lora_state_dict(model, self)

    def save(self, model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
        return save_peft_adapter(model, self, out_dir, base_model_name_or_path)

    def check_save(self, model: nn.Module) -> None:
        check_peft_targets(model)

    def load(self, model: nn.Module, path: str | Path) -> None:
        """Apply and load a PEFT adapter directory (its own r/alpha/targets win over this config's)."""
        load_peft_adapter(model, path)

    def merge(self, model: nn.Module) -> None:
        merge_lora(model)

    def export(self, model: nn.Module, out_dir: str | Path) -> Path:
        """Merged full HF checkpoint; merged weights are built on the CPU and the LoRA model is left as it was."""
        with merged(model, device="cpu"):
            return save_hf(model, out_dir)


METHODS: dict[str, type[Method]] = {m.name: m for m in (FullMethod, LoraMethod)}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` selectable as `method: <cls.name>`."""
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, **options) -> Method:
    """The method `name` with `options` validated (unknown name or key -> one-line ConfigError)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'{did_you_mean(name, METHODS)}; available: {', '.join(METHODS)}")
    try:
        return load_config(METHODS[name], base=options)
    except ConfigError as e:
        raise ConfigError(f"method '{name}': {e}") from None


def describe_methods(model: nn.Module | None = None) -> list[dict]:
    """One row per method: name, what it trains, the saved artifact, and (given a model: it is deep-copied per method,
    so pass a small or meta-device one) the trainable parameter count with default options."""
    import copy

    rows = []
    for name, cls in METHODS.items():
        row = {"method": name, "trains": cls.trains, "artifact": cls.artifact, "trainable_params": None}
        if model is not None:
            try:
                m = copy.deepcopy(model)
                method = cls.model_validate(_listing_defaults(name))
                method.apply(m)
                row["trainable_params"] = sum(p.numel() for _, p in method.trainable_parameters(m))
            except Exception as e:  # a method that cannot apply to this model says why in the listing
                row["trainable_params"] = f"n/a ({str(e).splitlines()[0][:60]})"
        rows.append(row)
    return rows


def _listing_defaults(name: str) -> dict:
    """Options a method needs for the listing where it has no default (AdaLoRA's schedule length)."""
    return {"total_step": 1000} if name == "adalora" else {}


def methods_listing(source: str | None = None) -> str:
    """Text of `lmforge methods [PRESET | CHECKPOINT_DIR]`: every method, what it trains, its artifact and, for the
    given model (built on the meta device: no weights are read), its trainable parameter count."""
    model = None
    if source is not None:
        from ..models import Transformer, config_from_hf, preset_config

        cfg = config_from_hf(source) if Path(source).exists() else preset_config(source)
        with torch.device("meta"):
            model = Transformer(cfg)
    rows = describe_methods(model)
    total = sum(p.numel() for p in model.parameters()) if model is not None else None
    lines = [f"{'method':14} {'trainable params':>22}  {'what trains':60} artifact"]
    for r in rows:
        n = r["trainable_params"]
        count = "-" if n is None else n if isinstance(n, str) else f"{n:,} ({100 * n / total:.3g}%)"
        lines.append(f"{r['method']:14} {count:>22}  {r['trains']:60} {r['artifact']}")
    return "\n".join(lines)


# PEFT peft_type (+ use_dora) -> the lmforge method that reads it
_PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "ADALORA": "adalora", "PREFIX_TUNING": "prefix",
               "PROMPT_TUNING": "prompt_tuning", "P_TUNING": "ptuning"}


def adapter_method(adapter_dir: str | Path) -> Method:
    """The method (default options) that reads adapter directory `adapter_dir`, from its adapter_config.json: PEFT
    LORA (DoRA with use_dora), IA3, ADALORA, PREFIX_TUNING, PROMPT_TUNING, P_TUNING, or an lmforge adapter."""
    import json

    from ..errors import CheckpointError

    file = Path(adapter_dir) / "adapter_config.json"
    if not file.is_file():
        raise CheckpointError(f"no adapter_config.json in '{adapter_dir}': pass an adapter directory")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if raw.get("lmforge_method"):
        name = raw["lmforge_method"]
    elif raw.get("peft_type") in _PEFT_TYPES:
        name = "dora" if raw["peft_type"] == "LORA" and raw.get("use_dora") else _PEFT_TYPES[raw["peft_type"]]
    else:
        raise CheckpointError(f"{file}: peft_type {raw.get('peft_type')!r} is not supported; lmforge reads "
                              f"{', '.join(_PEFT_TYPES)} and lmforge adapters")
    if name not in METHODS:
        raise CheckpointError(f"{file}: unknown lmforge method '{name}'")
    defaults = {"total_step": 1} if "total_step" in METHODS[name].model_fields else {}  # AdaLoRA's run length
    return METHODS[name].model_validate(defaults)


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> Method:
    """Load any adapter directory lmforge writes or reads (see `adapter_method`) into `model` (a base model);
    return the method that did it."""
    method = adapter_method(adapter_dir)
    method.load(model, adapter_dir)
    return method
