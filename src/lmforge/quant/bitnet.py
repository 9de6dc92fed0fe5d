"""BitNet b1.58 (Ma et al. 2024): ternary weights {-1, 0, +1} times one absmean scale, 8-bit activations.

Training (`BitLinear`, an nn.Linear subclass so init, optimizers and checkpoints treat it as one): latent full-precision
weights; every forward rounds them to ``clamp(round(W / mean|W|), -1, 1) * mean|W|`` and the input to per-token
absmax INT8, both with a straight-through gradient. Build a model from scratch with
``Transformer(cfg, linear=bitnet_linear_factory())`` (embedding and lm_head stay full precision, as in the paper)
and train it with the ordinary Trainer; the model is already pre-norm, so no extra norm is added inside the layer.

Inference (`PackedBitLinear`): the ternary codes packed four per byte (2 bits, value + 1), one fp32 scale; the forward
quantizes the input to INT8 exactly as training did, multiplies integer-valued tensors and rescales once:
``y = (q_x @ T^T) * (s_x * s_w) + b``. Bytes per parameter: 0.25.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..method import Method, register_method
from ..models.modules import ALL_LINEAR, linear_modules, select_targets, set_module
from .base import QuantLinear
from .rtn import quantize_activations_int8
from .ste import straight_through

__all__ = ["BitLinear", "PackedBitLinear", "BitNetMethod", "apply_bitnet", "bitnet_linear_factory", "ternarize", "pack_ternary", "unpack_ternary"]


def ternarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w -> (ternary values in {-1, 0, 1} as w's dtype, absmean scale as a 0-d fp32 tensor)."""
    scale = w.detach().float().abs().mean().clamp(min=1e-5)
    return (w.detach().float() / scale).round().clamp(-1, 1).to(w.dtype), scale


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """(out, in) values in {-1, 0, 1}, in % 4 == 0 -> (out, in / 4) uint8; column 4j+k in bits 6-2k..7-2k."""
    c = (t + 1).to(torch.uint8).view(t.shape[0], -1, 4)
    return (c[..., 0] << 6) | (c[..., 1] << 4) | (c[..., 2] << 2) | c[..., 3]


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_ternary`: (out, in / 4) uint8 -> (out, in) int8 in {-1, 0, 1}."""
    shifts = torch.tensor([6, 4, 2, 0], dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & 3).view(packed.shape[0], -1).to(torch.int8) - 1


def _quantized_input(x: torch.Tensor) -> torch.Tensor:
    qx, sx = quantize_activations_int8(x)
    return qx * sx.to(x.dtype)


class BitLinear(nn.Linear):
    """Trainable b1.58 linear: ternary weight and INT8 input in the forward, straight-through gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, scale = ternarize(self.weight)
        w = straight_through(self.weight, t * scale.to(t.dtype))
        return F.linear(straight_through(x, _quantized_input(x)), w, self.bias)


def bitnet_linear_factory(full_precision: tuple[str, ...] = ("lm_head",)):
    """`Transformer(cfg, linear=...)` factory: BitLinear everywhere except the modules named in `full_precision`."""

    def linear(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        cls = nn.Linear if name.rsplit(".", 1)[-1] in full_precision else BitLinear
        return cls(in_features, out_features, bias=bias)

    return linear


class PackedBitLinear(QuantLinear):
    """Inference b1.58 linear. Buffers: qweight uint8 (out, in / 4), weight_scale fp32 (1,)."""

    kind = "bitnet"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        if in_features % 4:
            raise ValueError(f"packed ternary weights need in_features divisible by 4, got {in_features}")
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 4, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(1, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Module, dtype: torch.dtype | None = None) -> PackedBitLinear:
        """Pack a (trained) BitLinear -- or ternarize any linear post hoc, which only works well after training."""
        w, b = linear.weight.detach(), getattr(linear, "bias", None)
        out = cls(linear.in_features, linear.out_features, b is not None, dtype or w.dtype, w.device)
        t, scale = ternarize(w)
        out.qweight.copy_(pack_ternary(t))
        out.weight_scale.fill_(scale.item())
        if b is not None:
            out.bias.data.copy_(b.detach())
        return out

    def _apply(self, fn, recurse=True):
        scale = self.weight_scale  # the scale stays fp32 when the model is cast to half precision
        super()._apply(fn, recurse)
        self._buffers["weight_scale"] = scale.to(fn(scale.new_empty(0)).device)
        return self

    @property
    def weight(self) -> torch.Tensor:
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return (unpack_ternary(self.qweight).float() * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qx, sx = quantize_activations_int8(x)  # integer-valued (..., in), (..., 1)
        acc = F.linear(qx, unpack_ternary(self.qweight).to(x.dtype))  # exact integer sums in fp32 up to 2^24
        return self._add_bias(acc * (sx * self.weight_scale).to(x.dtype))


@torch.no_grad()
def apply_bitnet(model: nn.Module, targets: list[str] | str = ALL_LINEAR) -> list[str]:
    """Swap the targeted nn.Linears (default: all but lm_head) for BitLinears holding the same weights."""
    linears = {p: m for p, m in linear_modules(model).items() if type(m) is nn.Linear}
    chosen = select_targets(list(linears), targets)
    if not chosen:  # e.g. a checkpoint quantized already: the run would fail at its final save
        raise ConfigError(f"BitNet targets {targets!r} match no full-precision linear layer (already quantized, or "
                          f"names like {', '.join(list(linears)[:3]) or 'none'}); start from the full-precision "
                          "checkpoint")
    for path in chosen:
        old = linears[path]
        new = BitLinear(old.in_features, old.out_features, old.bias is not None, device=old.weight.device,
                        dtype=old.weight.dtype)
        new.load_state_dict(old.state_dict())
        set_module(model, path, new)
    return chosen


@register_method
class BitNetMethod(Method):
    """BitNet b1.58 training (from scratch, e.g. stage=pretrain with a random model): every targeted linear becomes
    a BitLinear, everything trains; the artifact is a packed ternary checkpoint (`load_quantized` reads it)."""

    name: ClassVar[str] = "bitnet"

    target_modules: list[str] | str = ALL_LINEAR
    """Linears made ternary (names/regex as in LoRA); 'all-linear' = all but lm_head, which stays full precision."""

    def apply(self, model: nn.Module) -> None:
        apply_bitnet(model, self.target_modules)
        model.requires_grad_(True)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def merge(self, model: nn.Module) -> None:
        from .model import quantize_model

        quantize_model(model, "bitnet", targets=self.target_modules)

    def save(self, model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
        from .model import quantize_model, save_quantized

        packed = quantize_model(copy.deepcopy(model), "bitnet",
                                targets=[p for p, m in model.named_modules() if isinstance(m, BitLinear)])
        return save_quantized(packed, out_dir)

    def load(self, model: nn.Module, path: str | Path) -> None:
        raise NotImplementedError("a BitNet artifact is a packed checkpoint: read it with lmforge.quant.load_quantized")

    def export(self, model: nn.Module, out_dir: str | Path) -> Path:
        return self.save(model, out_dir)
