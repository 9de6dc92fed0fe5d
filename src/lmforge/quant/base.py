"""The base of every quantized linear: nn.Linear's surface (shapes, frozen bias, a dequantized `weight`) plus a spec.

A checkpoint records each quantized module's ``spec()`` -- ``{"type": kind, "bias": bool, **options}`` -- and a
loader rebuilds an empty module with ``QUANT_LINEARS[type](in_features, out_features, bias, **options)`` before
loading its buffers (see `lmforge.quant.model`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["QuantLinear", "QuantKernels", "FAST_PATH_MAX_ROWS", "set_kernels"]

FAST_PATH_MAX_ROWS = 16  # the fused kernels are GEMV-shaped: decode (a few rows) wins, prefill goes to dequant + mm


@dataclass(frozen=True)
class QuantKernels:
    """How quantized linears compute (`lmforge.quant.qkernel`): `enabled` sends half-precision inputs to lmforge's
    Triton kernels where they run (False: dequantize + matmul, the reference); `gemv_tiles` forces the one-row GEMV's
    tiles for tuning runs, read by the kernel a layer runs (K-major: output columns per program, input columns per
    step, warps, steps per program[, atomic]; row-major: rows per program, input columns per step, warps[, MAGIC,
    LATE] of `qkernel_triton.q4_gemv_kernel`); None: the per-format defaults; `pdl`: launch the GEMVs with
    programmatic dependent launch (Hopper+; the engine's ``engine.kernels.pdl``). The engine sets its
    `engine.kernels` here (`set_kernels`); everything else runs the defaults."""

    enabled: bool = True
    gemv_tiles: tuple[int, ...] | None = None
    pdl: bool = False


DEFAULT_KERNELS = QuantKernels()


class QuantLinear(nn.Module):
    """Shared plumbing: shapes, frozen bias, the serialisable spec."""

    kind: str = ""  # the name in a checkpoint's quantization_config
    layout: str = "nk"  # buffers by output row; "kn": K-major, re-laid for a device's kernels (`Int4Linear`)
    kernels: QuantKernels = DEFAULT_KERNELS  # how the forward computes (`set_kernels`); not part of a checkpoint

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        # (kernel name, device-specific tensors, device, input dtype, the dtype the kernel computes in) once
        # prepare_fast_path() verified it
        self._fast = None

    def options(self) -> dict:
        """Constructor options besides shapes and bias (what a checkpoint must record)."""
        return {}

    def spec(self) -> dict:
        return {"type": self.kind, "bias": self.bias is not None, **self.options()}

    @property
    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Storage bytes of the quantized weight (codes and constants, not the bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def fused(self, x: torch.Tensor, norm: tuple[torch.Tensor, float, float] | None = None, silu: bool = False,
              residual: torch.Tensor | None = None) -> torch.Tensor:
        """f(x) W^T + bias (+ residual) for a pre-norm block's decode row in one kernel where this layer's GEMV
        fuses them (`lmforge.quant.qkernel.Fuse`; the engine's fused decode blocks call it): f the RMSNorm
        `norm` = (weight, eps, offset) of the residual stream x, or with `silu` the SwiGLU gating silu(gate) * up
        of x = [gate, up] (..., 2 in_features). Elsewhere the same by torch ops around `forward`. No backward."""
        from .qkernel import Fuse, fuse_input, fuse_output

        x2d = x.reshape(-1, x.shape[-1])
        y = self._fused(x2d, Fuse(norm, silu, self.bias, residual))
        if y is None:
            y = fuse_output(self(fuse_input(x2d, Fuse(norm, silu))), Fuse(residual=residual))
        return y.view(*x.shape[:-1], self.out_features)

    def _fused(self, x2d: torch.Tensor, fuse) -> torch.Tensor | None:
        """`fused`'s matmul where this layer's kernel applies `fuse` itself, else None (torch ops around it)."""
        return None

    def _use_fast(self, x2d: torch.Tensor) -> bool:
        """Decode-sized inputs on the kernel's device and dtype; never when a gradient must flow back through x
        (a LoRA trained on the quantized model): the fused kernels have no backward."""
        fast = self._fast
        return (fast is not None and x2d.shape[0] <= FAST_PATH_MAX_ROWS and x2d.device == fast[2]
                and x2d.dtype == fast[3] and not (x2d.requires_grad and torch.is_grad_enabled()))

    @classmethod
    @torch.no_grad()
    def pack(cls, layers: list[QuantLinear]) -> QuantLinear | None:
        """Layers reading one input as a single layer of this class (their rows stacked: q/k/v, gate/up), built from
        the concatenated buffers, which the originals then view (no second copy; state_dict unchanged). None when
        they do not pack: another class or options, a device-specific fast layout, or a class that cannot
        (`_row_buffers` empty: storage not laid out by output row)."""
        first = layers[0]
        names = cls._row_buffers
        if not names or any(type(m) is not cls or m.options() != first.options() or m._fast is not None
                            or m.kernels != first.kernels or m.layout != first.layout
                            or m.in_features != first.in_features or (m.bias is None) != (first.bias is None)
                            or m.scale.dtype != first.scale.dtype or m.scale.device != first.scale.device
                            for m in layers):
            return None
        sizes = [m.out_features for m in layers]
        out = cls(first.in_features, sum(sizes), first.bias is not None, dtype=first.scale.dtype,
                  device=first.scale.device, **first.options())
        out.kernels, out.layout = first.kernels, first.layout
        dim = 0 if first.layout == "nk" else -1  # K-major buffers hold the output rows as columns
        return out._stack(layers, {name: (dim, sizes) for name in names})

    @torch.no_grad()
    def _stack(self, layers: list[QuantLinear], buffers: dict[str, tuple[int, list[int]]]) -> QuantLinear:
        """Fill this packed layer with `layers`' buffers {name: (dim, sizes along dim)} concatenated, and their
        biases; the originals become views of it (no second copy; their state_dict unchanged). Returns self."""
        for name, (dim, split) in buffers.items():
            packed = torch.cat([m._buffers[name] for m in layers], dim)
            self._buffers[name] = packed
            for m, view in zip(layers, packed.split(split, dim)):
                m._buffers[name] = view
        if self.bias is not None:
            packed = torch.cat([m.bias.data for m in layers])
            self.bias.data = packed
            for m, view in zip(layers, packed.split([m.out_features for m in layers])):
                m.bias.data = view
        return self

    _row_buffers: tuple[str, ...] = ()  # buffers laid out as (out_features, ...): what `pack` may concatenate

    def prepare_fast_path(self, dtype: torch.dtype = torch.bfloat16) -> str | None:
        """Build the device-specific kernel layout for inputs of `dtype`; returns the kernel name or None."""
        return None

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}" + \
            (f", {opts}" if opts else "")

    def _apply(self, fn, recurse=True):
        self._fast = None  # kernel layouts are device-specific: moving invalidates them
        return super()._apply(fn, recurse)


def check_group_size(in_features: dict[str, int], group_size: int, field: str = "group_size") -> None:
    """One-line error unless `group_size` is even and divides the in_features of every layer (path: in_features),
    naming the first layer that does not fit and the largest group size (a power of two, at most `group_size`)
    that fits them all."""
    from ..errors import ConfigError

    bad = next((p for p, n in in_features.items() if group_size < 2 or group_size % 2 or n % group_size), None)
    if bad is None:
        return
    fits = next((g for g in (128, 64, 32, 16, 8, 4, 2) if g <= max(group_size, 2)
                 and all(n % g == 0 for n in in_features.values())), None)
    fix = f"use {field}={fits} (it divides every target)" if fits else \
        "no even group size divides them all: use int8 for these layers or leave them out of the targets"
    raise ConfigError(f"{field} {group_size} must be even and divide in_features of every quantized layer; "
                      f"'{bad}' has {in_features[bad]}: {fix}")


def set_kernels(model: nn.Module, kernels: QuantKernels) -> None:
    """Every quantized linear of `model` computes with `kernels` from now on (the engine passes its
    `engine.kernels`; a tuning run its tiles)."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.kernels = kernels
