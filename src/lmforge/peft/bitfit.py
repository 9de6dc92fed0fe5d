"""BitFit (Ben Zaken et al. 2022): train only the bias terms.

Architectures without biases (Llama, Mistral) get zero-initialised biases on the target linears first (the model
starts unchanged), since BitFit on a bias-free model would train nothing. The artifact is an lmforge adapter
directory with the bias tensors by native name.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from .common import read_native_adapter, save_native_adapter
from .lora import ALL_LINEAR, linear_modules, select_targets
from .methods import Method, register_method

__all__ = ["BitFitMethod"]


@register_method
class BitFitMethod(Method):
    """Biases only: every existing bias (linears and LayerNorms) plus new zero biases where targets have none."""

    name: ClassVar[str] = "bitfit"
    trains: ClassVar[str] = "bias terms (zero biases added to bias-free linears)"
    artifact: ClassVar[str] = "lmforge adapter (biases)"

    target_modules: list[str] | str = ALL_LINEAR
    """Linears that get a trainable bias (added at zero where missing); target-name rules as for LoRA."""
    add_missing: bool = True
    """Add zero biases to targets without one; false = train only the biases the architecture already has."""

    def apply(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        linears = linear_modules(model)
        for path in select_targets(list(linears), self.target_modules):
            lin = linears[path]
            if getattr(lin, "bias", None) is None and self.add_missing:
                w = next(iter((*lin.parameters(), *lin.buffers())))
                dtype = w.dtype if w.is_floating_point() else torch.float32
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, device=w.device, dtype=dtype))
        biases = self._biases(model)
        if not biases:
            raise ConfigError("bitfit found no bias to train: the model has none and add_missing=false")
        for p in biases.values():
            p.requires_grad_(True)

    @staticmethod
    def _biases(model: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias")}

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self._biases(model).items()}

    def save(self, model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
        return save_native_adapter(self, model, out_dir, base_model_name_or_path)

    def load(self, model: nn.Module, path: str | Path) -> None:
        options, tensors = read_native_adapter(path, self.name)
        method = BitFitMethod(**options)
        method.apply(model)
        method.load_state_dict(model, tensors)

    def export(self, model: nn.Module, out_dir: str | Path) -> Path:
        cfg = model.cfg
        added = [n for n in self._biases(model) if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))
                 and not cfg.qkv_bias or n.endswith("o_proj.bias") and not cfg.out_bias
                 or n.endswith(("gate_proj.bias", "up_proj.bias", "down_proj.bias")) and not cfg.mlp_bias
                 or n.endswith("lm_head.bias") and not getattr(cfg, "lm_head_bias", False)]
        if added:
            raise ConfigError(f"BitFit added biases ('{added[0]}', ...) that {cfg.arch} checkpoints cannot hold; "
                              "share the adapter (method.save) or run with bitfit.add_missing=false")
        return super().export(model, out_dir)
