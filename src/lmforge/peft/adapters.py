"""Houlsby adapters (Houlsby et al. 2019): a small bottleneck MLP with a skip connection after each sublayer.

The adapter sits on the output of the attention block's output projection and of the MLP's down projection, i.e.
after each sublayer and before the residual add, as in the paper: ``h = y + up(act(down(y)))`` with y the sublayer
output. ``up`` starts at zero, so each adapter starts as the identity (near-identity init; ``down`` is small random
so ``up`` gets a gradient). The norms are trained too, as Houlsby et al. do. Adapters are nonlinear, so they cannot be
merged into the weights; the artifact is an lmforge adapter directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from ..models.transformer import ACTIVATIONS
from .common import float_master_dtype, read_native_adapter, save_native_adapter, wrap_linears
from .methods import Method, register_method

__all__ = ["AdapterLinear", "AdapterMethod"]


class AdapterLinear(nn.Module):
    """``y = base(x); y + up(act(down(y)))``: x (..., in) -> (..., out); down (bottleneck, out), up (out, bottleneck)"""

    def __init__(self, base_layer: nn.Module, bottleneck: int, act: str = "gelu", init_std: float = 1e-2):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        device, dtype = float_master_dtype(base_layer)
        self.adapter_down = nn.Linear(self.out_features, bottleneck, device=device, dtype=dtype)
        self.adapter_up = nn.Linear(bottleneck, self.out_features, device=device, dtype=dtype)
        self.act = ACTIVATIONS[act]
        with torch.no_grad():
            nn.init.normal_(self.adapter_down.weight, std=init_std)
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        down, up = self.adapter_down, self.adapter_up
        h = nn.functional.linear(y, down.weight.to(y.dtype), down.bias.to(y.dtype))
        return y + nn.functional.linear(self.act(h), up.weight.to(y.dtype), up.bias.to(y.dtype))


@register_method
class AdapterMethod(Method):
    """Houlsby bottleneck adapters after attention and MLP (+ norms); artifacts are lmforge adapter directories."""

    name: ClassVar[str] = "adapter"
    trains: ClassVar[str] = "bottleneck adapters after attention and MLP, and the norms"
    artifact: ClassVar[str] = "lmforge adapter (adapter + norm weights)"
    mergeable: ClassVar[bool] = False

    bottleneck: int = Field(16, ge=1)
    """Hidden size of each adapter."""
    target_modules: list[str] | str = Field(default_factory=lambda: ["o_proj", "down_proj"])
    """Linears whose output gets an adapter: the last projection of attention and of the MLP."""
    activation: Literal["gelu", "relu", "silu", "gelu_tanh"] = "gelu"
    """Nonlinearity between the adapter's down and up projections."""
    init_std: float = Field(1e-2, ge=0)
    """Std of the down projection's init (up starts at zero: the identity)."""
    train_norms: bool = True
    """Also train the normalisation layers (Houlsby et al. do)."""

    def apply(self, model: nn.Module) -> None:
        wrap_linears(model, self.target_modules,
                     lambda path, lin: AdapterLinear(lin, self.bottleneck, self.activation, self.init_std), "adapter")
        if self.train_norms:
            for p in self._norms(model).values():
                p.requires_grad_(True)

    @staticmethod
    def _norms(model: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if n.rsplit(".", 2)[-2].endswith("norm")}

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {n: p.detach() for n, p in model.named_parameters() if ".adapter_" in n}
        if self.train_norms:
            out.update({n: p.detach() for n, p in self._norms(model).items()})
        return out

    def save(self, model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
        return save_native_adapter(self, model, out_dir, base_model_name_or_path)

    def load(self, model: nn.Module, path: str | Path) -> None:
        options, tensors = read_native_adapter(path, self.name)
        method = AdapterMethod(**options)
        method.apply(model)
        method.load_state_dict(model, tensors)

    def export(self, model: nn.Module, out_dir: str | Path) -> Path:
        raise ConfigError("adapter layers are nonlinear and cannot be merged into an HF checkpoint; share the adapter "
                          "(method.save) and load it with lmforge")
