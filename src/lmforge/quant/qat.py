"""QAT: fine-tune through fake quantization, then convert to the real quantized model.

`FakeQuantLinear` (an nn.Linear subclass, so the trainer and optimizers see an ordinary weight) rounds its weight in
every forward exactly as the target format will -- INT8 per channel or INT4 per group, computed by the same `rtn`
functions -- and optionally its input to per-token INT8; the straight-through estimator passes gradients as if
nothing were rounded. `convert_qat` then swaps each one for the `Int8Linear`/`Int4Linear` holding those very codes:
INT4 weight-only models compute bit-identical outputs before and after; INT8 ones equal up to float summation
order (the real layer scales after the matmul, as its fused kernel does).

Through the method seam: ``QATMethod(bits=4, group_size=128).apply(model)`` wraps the targets in place (all
weights stay trainable); ``save`` writes a real quantized checkpoint; ``merge`` converts in place. Or build a model
with ``Transformer(cfg, linear=qat_linear_factory(...))``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from ..method import Method, register_method
from ..models.modules import ALL_LINEAR, linear_modules, select_targets, set_module
from .base import check_group_size
from .linear import Int4Linear, Int8Linear
from .rtn import int4_dequantize, int4_params, int4_quantize, int8_quantize, quantize_activations_int8
from .ste import straight_through

__all__ = ["FakeQuantLinear", "qat_linear_factory", "apply_qat", "convert_qat", "QATMethod"]


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward uses the INT8 (per channel) or INT4 (per group) rounding of its weight, and with
    ``act_bits=8`` of its input; gradients pass straight through."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4, group_size: int = 128,
                 act_bits: int | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if bits not in (4, 8) or act_bits not in (None, 8):
            raise ValueError(f"QAT supports bits 4 or 8 and act_bits None or 8, got bits={bits}, act_bits={act_bits}")
        if bits == 4 and in_features % group_size:
            raise ValueError(f"QAT group_size {group_size} must divide in_features {in_features}")
        self.bits, self.group_size, self.act_bits = bits, group_size, act_bits

    @classmethod
    def from_linear(cls, linear: nn.Linear, **opts) -> FakeQuantLinear:
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                  dtype=linear.weight.dtype, **opts)
        out.load_state_dict(linear.state_dict())
        return out

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the converted layer will hold it, in the weight's dtype (no gradient)."""
        w = self.weight.detach()
        if self.bits == 8:
            q, scale = int8_quantize(w)
            return q.to(w.dtype) * scale[:, None]
        scale, zero = int4_params(w, self.group_size)
        return int4_dequantize(int4_quantize(w, scale, zero), scale, zero, w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = straight_through(self.weight, self.quantized_weight()).to(x.dtype)
        if self.act_bits == 8:
            qx, sx = quantize_activations_int8(x)
            x = straight_through(x, qx * sx.to(x.dtype))
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def convert(self) -> Int8Linear | Int4Linear:
        if self.bits == 8:
            return Int8Linear.from_linear(self, act_bits=self.act_bits)
        return Int4Linear.from_linear(self, self.group_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}, group_size={self.group_size}, act_bits={self.act_bits}"


def qat_linear_factory(bits: int = 4, group_size: int = 128, act_bits: int | None = None,
                       full_precision: tuple[str, ...] = ("lm_head",)):
    """`Transformer(cfg, linear=...)` factory: FakeQuantLinear except for the modules named in `full_precision`."""

    def linear(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        if name.rsplit(".", 1)[-1] in full_precision:
            return nn.Linear(in_features, out_features, bias=bias)
        return FakeQuantLinear(in_features, out_features, bias, bits, group_size, act_bits)

    return linear


def apply_qat(model: nn.Module, bits: int = 4, group_size: int = 128, act_bits: int | None = None,
              targets: list[str] | str = ALL_LINEAR, field: str = "group_size") -> list[str]:
    """Swap the targeted nn.Linears (default: all but lm_head) for FakeQuantLinears in place; returns their paths.
    `field` names group_size in the one-line error when it does not divide a target's in_features."""
    linears = {p: m for p, m in linear_modules(model).items() if type(m) is nn.Linear}
    chosen = select_targets(list(linears), targets)
    if not chosen:  # e.g. a checkpoint quantized already: nothing would train through fake quantization
        raise ConfigError(f"QAT targets {targets!r} match no full-precision linear layer (already quantized, or names "
                          f"like {', '.join(list(linears)[:3]) or 'none'}); start from the full-precision checkpoint")
    if bits == 4:
        check_group_size({p: linears[p].in_features for p in chosen}, group_size, field)
    for path in chosen:
        set_module(model, path, FakeQuantLinear.from_linear(linears[path], bits=bits, group_size=group_size,
                                                             act_bits=act_bits))
    return chosen


def convert_qat(model: nn.Module) -> list[str]:
    """Replace every FakeQuantLinear by the real quantized linear with the same codes, in place; returns paths."""
    paths = [p for p, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for path in paths:
        set_module(model, path, model.get_submodule(path).convert())
    if paths:
        model.quantization_config = {"method": "qat"}
    return paths


@register_method
class QATMethod(Method):
    """Quantization-aware fine-tuning: every weight trains through fake INT8/INT4 rounding; the artifact is a real
    quantized checkpoint."""

    name: ClassVar[str] = "qat"

    bits: Literal[4, 8] = 4
    """Weight bits: 8 = INT8 per output channel, 4 = INT4 per group (asymmetric)."""
    group_size: int = Field(128, ge=2)
    """INT4 group size (input columns per scale/zero); must divide every targeted layer's in_features."""
    act_bits: Literal[8] | None = None
    """8 = also fake-quantize inputs per token to INT8 (W8A8); None = weight-only."""
    target_modules: list[str] | str = ALL_LINEAR
    """Linears to quantize: names/regex as in LoRA, 'all-linear' = every linear except lm_head."""

    def apply(self, model: nn.Module) -> None:
        apply_qat(model, self.bits, self.group_size, self.act_bits, self.target_modules, field="qat.group_size")
        model.requires_grad_(True)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def merge(self, model: nn.Module) -> None:
        convert_qat(model)

    def save(self, model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
        from .model import save_quantized

        converted = copy.deepcopy(model)
        convert_qat(converted)
        converted.quantization_config = {"method": "qat", **self.model_dump(mode="json")}
        return save_quantized(converted, out_dir)

    def load(self, model: nn.Module, path: str | Path) -> None:
        raise NotImplementedError("a QAT artifact is a quantized checkpoint: read it with lmforge.quant.load_quantized")

    def export(self, model: nn.Module, out_dir: str | Path) -> Path:
        """A plain HF checkpoint of the dequantized (fake-quantized) weights."""
        from ..models.hf import save_hf

        plain = copy.deepcopy(model)
        for path, m in list(plain.named_modules()):
            if isinstance(m, FakeQuantLinear):
                lin = nn.Linear(m.in_features, m.out_features, m.bias is not None, device=m.weight.device,
                                dtype=m.weight.dtype)
                lin.load_state_dict({"weight": m.quantized_weight(),
                                     **({"bias": m.bias.detach()} if m.bias is not None else {})})
                set_module(plain, path, lin)
        return save_hf(plain, out_dir)
