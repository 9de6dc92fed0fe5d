"""The method seam: how a training run changes what is trained and what is saved, without the loop knowing.

A method is a config section with behaviour. The trainer calls, in order::

    method = build_method(cfg.method, **cfg.<method>.model_dump())  # its options: the section named after it
    method.apply(model)                                              # wrap / freeze, before the optimizer exists
    optimizer = AdamW(p for _, p in method.trainable_parameters(model))
    ...  torch.save(method.state_dict(model), ckpt)  /  method.load_state_dict(model, torch.load(ckpt))
    method.save(model, out_dir)      # the artifact users share: HF checkpoint (full) or PEFT adapter (lora)
    method.export(model, out_dir)    # always a full HF checkpoint (lora merged), the model stays usable

The `Method` base class and the registry (`METHODS`, `register_method`, `build_method`) live in `lmforge.method`,
which peft and quant both build on; they are re-exported here. This module defines full fine-tuning and LoRA; every
other method (dora, qlora, adalora, prilora, ia3, bitfit, adapter, prefix, p-tuning, prompt tuning; qat and bitnet in
`lmforge.quant`) is a `Method` subclass in its own module, added to `METHODS` with `register_method`; importing
`lmforge.peft` registers them all. `describe_methods(model)` is the methods listing (what each trains, how many
parameters, what it saves).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..method import METHODS, Method, build_method, register_method
from ..models.hf import load_hf, save_hf
from ..quant.base import QuantLinear
from .lora import LoraConfig, apply_lora, lora_state_dict, merge_lora, merged
from .peft_format import check_peft_targets, load_peft_adapter, save_peft_adapter

__all__ = ["Method", "FullMethod", "LoraMethod", "METHODS", "build_method", "register_method", "describe_methods",
           "methods_listing", "adapter_method", "load_adapter"]


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

    def check_save(self, model: nn.Module) -> None:
        """A quantized checkpoint's linears hold frozen codes, not parameters: full fine-tuning would train only the
        embeddings and norms and write a checkpoint without the quantized weights, so it is refused up front."""
        quantized = [(p, m.kind) for p, m in model.named_modules() if isinstance(m, QuantLinear)]
        if quantized:
            (path, kind), more = quantized[0], f" and {len(quantized) - 1} more" if len(quantized) > 1 else ""
            raise ConfigError(f"method full cannot train a quantized checkpoint ('{path}'{more} hold frozen {kind} "
                              "codes): use method=lora or qlora (adapters over the quantized weights), or train the "
                              "full-precision checkpoint and quantize it afterwards")

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


register_method(FullMethod)
register_method(LoraMethod)


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
