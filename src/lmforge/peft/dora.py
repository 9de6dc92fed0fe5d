"""DoRA (Liu et al. 2024): weight-decomposed low-rank adaptation.

A weight is split into a magnitude (one norm per output row) and a direction. DoRA trains the magnitude vector ``m``
directly and updates the direction with LoRA:

    W' = m * (W + s B A) / ||W + s B A||_row        (norms over each output row, i.e. over in_features)

The row norm is treated as a constant in backward (the paper's memory-saving trick, as PEFT does), so the layer is
computed as the base output plus a correction, ``y = W x + b + (m / n - 1) W x + (m / n) s B A x`` with n the
detached norm. At init B = 0 and m = ||W||_row, so the output equals the base exactly. Adapters are PEFT LoRA files
with ``use_dora: true`` and one ``lora_magnitude_vector`` (out_features,) per layer.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRALinear
from .methods import LoraMethod, register_method

__all__ = ["DoRALinear", "DoraMethod"]


class DoRALinear(LoRALinear):
    """LoRALinear plus a trained magnitude vector ``lora_magnitude_vector`` (out_features,), float32 master."""

    kind: ClassVar[str] = "dora"

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "default"):
        super().__init__(base_layer, r, alpha, dropout, use_rslora, init)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())
        self._merge_factor: torch.Tensor | None = None  # m / ||W + sBA|| at merge time, to unmerge exactly

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row, float32 (out_features,), no gradient."""
        return torch.linalg.vector_norm(self.base_layer.weight.float() + self.delta_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            x_in = x
            base_no_bias = y if getattr(self.base_layer, "bias", None) is None else y - self.base_layer.bias.to(y.dtype)
        else:  # dropout changes the input, so the base part of the correction is recomputed on it (as PEFT does)
            x_in = self.lora_dropout(x)
            base_no_bias = F.linear(x_in, self.base_layer.weight.to(x.dtype))
        scale = (self.lora_magnitude_vector / self.weight_norm()).to(x.dtype)  # (out,), norm detached
        lora = F.linear(F.linear(x_in, a), b)
        return y + (scale - 1) * base_no_bias + scale * lora * self.scaling

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().adapter_tensors(), "lora_magnitude_vector": self.lora_magnitude_vector}

    def merged_weight(self) -> torch.Tensor:
        direction = self.base_layer.weight.float() + self.delta_weight()
        norm = torch.linalg.vector_norm(direction, dim=1).detach()
        return direction * (self.lora_magnitude_vector.float() / norm)[:, None]

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base_layer.weight
            self._merge_factor = self.lora_magnitude_vector.float() / self.weight_norm()
            w.copy_(self.merged_weight().to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() / self._merge_factor[:, None] - self.delta_weight()).to(w.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


@register_method
class DoraMethod(LoraMethod):
    """DoRA: LoRA on the direction plus a trained per-row magnitude; artifacts are PEFT adapters with use_dora."""

    name: ClassVar[str] = "dora"
    trains: ClassVar[str] = "LoRA B A on the direction + a magnitude per output row"
    artifact: ClassVar[str] = "PEFT adapter (LORA, use_dora)"
    derived: ClassVar[tuple[str, ...]] = ("use_dora",)  # always on (method=lora is DoRA off)

    use_dora: bool = True
    """Always true for this method (kept as a field so the saved options say so)."""
