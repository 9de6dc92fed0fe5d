"""(IA)^3 (Liu et al. 2022): learned rescaling vectors, the smallest adapter there is.

Keys and values are rescaled per output feature (``y = l * (W x + b)``) and the MLP per input feature of its last
projection (``y = W (l * x) + b``, the "feedforward" modules). Vectors start at one, so the model starts unchanged;
merging multiplies them into the weights. Adapters are PEFT IA3 files (``ia3_l``: (out, 1), or (1, in) for
feedforward modules).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pydantic
import torch
from pydantic import Field
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..models.converters import converter_for
from ..models.hf import save_hf
from .common import (float_master_dtype, merge_layers, merged_layers, read_adapter_config, read_adapter_tensors,
                     wrap_linears, write_adapter_dir)
from .lora import compact_targets, linear_modules, load_tensors_into, select_targets
from .methods import Method, register_method
from .peft_format import PREFIX, _hf_names, _is_conv1d

__all__ = ["IA3Linear", "IA3Method"]


class IA3Linear(nn.Module):
    """A frozen linear with a learned scale: on its output (out_features,) or, for feedforward modules, its input."""

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.feedforward = feedforward
        device, dtype = float_master_dtype(base_layer)
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)  # PEFT's layout
        self.ia3_l = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.ia3_l.flatten().to(x.dtype)
        return self.base_layer(x * scale) if self.feedforward else self.base_layer(x) * scale

    @torch.no_grad()
    def merged_linear(self, device: torch.device | str | None = None) -> nn.Linear:
        """A plain nn.Linear computing the same function (weights scaled by the vector)."""
        w, bias = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        device = device or w.device
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        out.weight = nn.Parameter((w.float() * self.ia3_l.float()).to(device=device, dtype=w.dtype),
                                  requires_grad=False)
        if bias is not None:
            b = bias.float() if self.feedforward else bias.float() * self.ia3_l.float().flatten()
            out.bias = nn.Parameter(b.to(device=device, dtype=bias.dtype), requires_grad=False)
        return out

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}"


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, IA3Linear)}


@register_method
class IA3Method(Method):
    """(IA)^3: one trained scale vector per target linear; artifacts are PEFT IA3 adapters."""

    name: ClassVar[str] = "ia3"
    trains: ClassVar[str] = "scale vectors on k, v (outputs) and down_proj (inputs)"
    artifact: ClassVar[str] = "PEFT adapter (IA3)"

    target_modules: list[str] | str = Field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    """Linears to rescale (target-name rules as for LoRA)."""
    feedforward_modules: list[str] | str = Field(default_factory=lambda: ["down_proj"])
    """Targets scaled on their input rather than their output (must be a subset of target_modules)."""

    def apply(self, model: nn.Module) -> None:
        paths = list(linear_modules(model))
        ff = set(select_targets(paths, self.feedforward_modules))
        chosen = set(select_targets(paths, self.target_modules))
        if not ff <= chosen:
            raise ConfigError(f"ia3 feedforward_modules {sorted(ff - chosen)} are not in target_modules")
        wrap_linears(model, self.target_modules, lambda path, lin: IA3Linear(lin, path in ff), "ia3")

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{p}.ia3_l": m.ia3_l.detach() for p, m in ia3_layers(model).items()}

    def save(self, model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
        layers = ia3_layers(model)
        conv = converter_for(model.cfg.arch)
        hf = _hf_names(conv, model)
        for path in layers:
            if hf[path] is None:
                raise ConfigError(f"{model.cfg.arch} fuses '{path}' with other projections; a PEFT IA3 adapter cannot "
                                  "hold it: pick other target_modules")
        linears = [h for h in hf.values() if h is not None]
        config = {
            "peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "target_modules": compact_targets([hf[p] for p in layers], linears),
            "feedforward_modules": compact_targets([hf[p] for p, m in layers.items() if m.feedforward], linears),
            "fan_in_fan_out": any(_is_conv1d(conv, p) for p in layers), "init_ia3_weights": True,
            "inference_mode": True, "modules_to_save": None, "exclude_modules": None, "revision": None,
        }
        return write_adapter_dir(out_dir, config, {f"{PREFIX}{hf[p]}.ia3_l": m.ia3_l for p, m in layers.items()})

    def load(self, model: nn.Module, path: str | Path) -> None:
        """Apply and load a PEFT IA3 adapter directory (its targets win over this config's)."""
        raw = read_adapter_config(path)
        if raw.get("peft_type") != "IA3":
            raise CheckpointError(f"{path}: peft_type {raw.get('peft_type')!r} is not an IA3 adapter")
        conv = converter_for(model.cfg.arch)
        hf = {p: h for p, h in _hf_names(conv, model).items() if h is not None}
        to_native = {h: p for p, h in hf.items()}

        def native(targets) -> list[str]:
            return sorted(to_native[h] for h in select_targets(list(to_native), targets or [],
                                                                head=conv.hf_module_name("lm_head")))

        try:
            method = IA3Method(target_modules=native(raw.get("target_modules")),
                               feedforward_modules=native(raw.get("feedforward_modules")))
        except pydantic.ValidationError as e:
            raise CheckpointError(f"{path}: invalid IA3 settings ({e.errors()[0]['msg']})") from None
        method.apply(model)
        incoming, shown = {}, {}
        for key, t in read_adapter_tensors(path).items():
            module = key.removeprefix(PREFIX).removesuffix(".ia3_l")
            name = f"{conv.native_module_name(module) or module}.ia3_l"
            incoming[name], shown[name] = t, key
        load_tensors_into(method.state_dict(model), incoming, f"{path}", display_names=shown)

    def merge(self, model: nn.Module) -> None:
        merge_layers(model)

    def export(self, model: nn.Module, out_dir: str | Path) -> Path:
        with merged_layers(model, device="cpu"):
            return save_hf(model, out_dir)
