"""Weight-only quantized linears (INT8 per channel, INT4 per group, packed) with real dequantize-and-matmul forwards.

Every quantized linear looks like an `nn.Linear` to the rest of lmforge: ``in_features``, ``out_features``, a
``bias`` (frozen, or None), ``weight`` (the dequantized weight as a new tensor, for merging and inspection) and a
forward from (..., in_features) to (..., out_features). Its storage is buffers (so ``.to(device)``, ``state_dict()``
and safetensors carry it) plus ``spec()`` -- the options a loader needs to rebuild an empty one with
``cls(in_features, out_features, bias, **options)``.

Fast paths: on CUDA, half-precision inputs go to lmforge's Triton kernels (`lmforge.quant.qkernel`: a GEMV for
decode rows, a dequantize-in-registers GEMM for batches) with no preparation, reading the layers' own buffers.
PyTorch's fused mixed-precision kernels ``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm`` (the CPU
variant ``_for_cpu``) need device-specific weight layouts, so `prepare_fast_path(model)` converts once, after the
model reached its device, and each layer checks its fast result against the reference on a probe input before
using it (on the CPU that is the fast path, called in bf16 where that times faster than in the model's dtype; on
CUDA it opts INT4 into tinygemm instead of the Triton kernels); a missing or failing kernel falls back to the
reference path (dequantize, then ``F.linear``).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from . import qkernel
from .base import QuantLinear
from .nf4 import pack_nibbles, unpack_nibbles
from .rtn import int4_dequantize, int4_params, int4_quantize, int8_quantize, quantize_activations_int8

__all__ = ["Int8Linear", "Int4Linear", "prepare_fast_path"]

def _verified(layer: QuantLinear, fast, dtype: torch.dtype, name: str,
              compute: torch.dtype | None = None) -> str | None:
    """Install `fast` if its output on a probe input matches the reference forward (else leave the layer alone).
    `compute`: the dtype the kernel is called in (inputs cast to it, outputs back to `dtype`); default `dtype`."""
    device = layer.bias.device if layer.bias is not None else next(layer.buffers()).device
    layer._fast = (name, fast, device, dtype, compute or dtype)
    x = torch.randn(2, layer.in_features, device=device, dtype=dtype)
    try:
        got = layer(x)
    except (RuntimeError, NotImplementedError):
        layer._fast = None
        return None
    layer._fast = None
    ref = layer(x)
    tol = 2e-2 * ref.float().abs().max().item() + 1e-3
    if not torch.isfinite(got).all() or (got.float() - ref.float()).abs().max().item() > tol:
        return None
    layer._fast = (name, fast, device, dtype, compute or dtype)
    return name


# CPU choice per (kernel, out, in, group, input dtype): the dtype aten's kernel runs in, or None (reference forward)
_CPU_CHOICE: dict[tuple, torch.dtype | None] = {}


@torch.no_grad()
def _install(layer: QuantLinear, make, dtype: torch.dtype, name: str) -> str | None:
    """Verify and install aten's mixed-precision kernel `name` for inputs of `dtype`; `make(compute)` builds its
    device tensors for a kernel called in `compute`. On CUDA it runs in `dtype`. On the CPU aten's int8/int4 kernels
    are vectorized for bf16 inputs while others may take a scalar loop (fp32 inputs 6-33x slower than bf16 on an
    AVX-512 EPYC, slower even than dense `F.linear`: `bench/quant_cpu.py --calls`), so each verified choice --
    the kernel in `dtype`, the kernel in bf16 (inputs cast in, outputs back: bf16 rounding of x is far below the
    weights' quantization error), or the reference forward -- is timed on one row of the layer's shape, once per
    shape, and the fastest kept."""
    device = next(layer.buffers()).device
    if device.type != "cpu":
        return _verified(layer, make(dtype), dtype, name)
    key = (name, layer.out_features, layer.in_features, getattr(layer, "group_size", 0), dtype)
    layer._fast = None
    if key not in _CPU_CHOICE:
        x = torch.randn(1, layer.in_features, dtype=dtype)
        times = {None: _seconds(layer, x)}  # the reference forward (layer._fast is None here)
        for compute in dict.fromkeys((dtype, torch.bfloat16)):
            if _verified(layer, make(compute), dtype, name, compute):
                times[compute] = _seconds(layer, x)
            layer._fast = None
        _CPU_CHOICE[key] = min(times, key=times.get)
    compute = _CPU_CHOICE[key]
    return None if compute is None else _verified(layer, make(compute), dtype, name, compute)


def _seconds(layer: nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    """Best wall time of `layer(x)` over `repeats` calls after one warm-up."""
    layer(x)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        layer(x)
        best = min(best, time.perf_counter() - t0)
    return best


class Int8Linear(QuantLinear):
    """INT8 weights with one scale per output channel: ``y = (x @ q.T) * scale + b``.

    Buffers: qweight int8 (out, in), scale (out,) in the compute dtype. Weight-only by default (x stays in its dtype).

    ``act_bits=8`` makes it W8A8 with LLM.int8()'s mixed-precision decomposition (Dettmers et al. 2022): input columns
    where any |x| exceeds ``outlier_threshold`` (6.0) are multiplied in 16-bit against the dequantized weight columns;
    all other columns are quantized per token to INT8 and multiplied as integers. ``outlier_threshold=None`` with
    ``act_bits=8`` is plain W8A8 (what the outliers would break).
    """

    kind = "int8"
    _row_buffers = ("qweight", "scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, act_bits: int | None = None,
                 outlier_threshold: float | None = None, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        if act_bits not in (None, 8):
            raise ValueError(f"Int8Linear act_bits must be None or 8, got {act_bits}")
        self.act_bits, self.outlier_threshold = act_bits, outlier_threshold
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))

    def options(self) -> dict:
        return {"act_bits": self.act_bits, "outlier_threshold": self.outlier_threshold}

    @classmethod
    def from_linear(cls, linear: nn.Module, act_bits: int | None = None, outlier_threshold: float | None = None,
                    dtype: torch.dtype | None = None) -> Int8Linear:
        w, b = linear.weight.detach(), getattr(linear, "bias", None)
        out = cls(linear.in_features, linear.out_features, b is not None, act_bits, outlier_threshold,
                  dtype or w.dtype, w.device)
        q, scale = int8_quantize(w, out.scale.dtype)
        out.qweight.copy_(q)
        out.scale.copy_(scale)
        if b is not None:
            out.bias.data.copy_(b.detach())
        return out

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if self.act_bits == 8:
            y = self._w8a8(x2d)
        elif self._use_fast(x2d) and self._fast[0] == "aten._weight_int8pack_mm":
            compute = self._fast[4]
            y = torch.ops.aten._weight_int8pack_mm(x2d.to(compute), self.qweight, self._fast[1]).to(x2d.dtype)
        elif qkernel.use_kernel(x2d, self.kernels):  # CUDA: the Triton GEMV / GEMM (custom op, in CUDA graphs)
            y = qkernel.linear_int8(x2d, self.qweight, self.scale, self.kernels)
        elif self._use_fast(x2d) and x2d.shape[0] == 1 and torch.compiler.is_compiling():
            # batch-1 decode under inductor: a multiply-reduce reads each int8 code once, converting in registers
            # (F.linear on q.to(bf16) writes the bf16 weight out first: slower than bf16 itself, measured on H100)
            y = (x2d[:, None, :] * self.qweight.to(x.dtype)).sum(-1) * self.scale.to(x.dtype)
        else:  # the int8 -> float conversion fuses into the matmul under torch.compile
            y = F.linear(x2d, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return self._add_bias(y).view(*x.shape[:-1], self.out_features)

    def _fused(self, x2d: torch.Tensor, fuse) -> torch.Tensor | None:
        if self.act_bits is None and qkernel.use_kernel(x2d, self.kernels):
            return qkernel.linear_int8(x2d, self.qweight, self.scale, self.kernels, fuse)
        return None

    def _w8a8(self, x2d: torch.Tensor) -> torch.Tensor:
        dt = x2d.dtype
        y = torch.zeros(x2d.shape[0], self.out_features, device=x2d.device, dtype=dt)
        if self.outlier_threshold is not None:
            outliers = (x2d.abs() > self.outlier_threshold).any(dim=0)  # (in,) columns kept in 16-bit
            if outliers.any():
                w_cols = self.qweight[:, outliers].to(dt) * self.scale.to(dt)[:, None]
                y = y + x2d[:, outliers] @ w_cols.T
                x2d = x2d.masked_fill(outliers, 0)
        qx, sx = quantize_activations_int8(x2d)  # integer-valued (rows, in), (rows, 1)
        acc = F.linear(qx, self.qweight.to(dt))  # exact integer products, float accumulation
        return y + acc * (sx.to(dt) * self.scale.to(dt))

    def prepare_fast_path(self, dtype: torch.dtype = torch.bfloat16) -> str | None:
        if self.act_bits is not None:
            return None
        if self.qweight.is_cuda:  # aten's CUDA int8pack kernel decodes at 65 tok/s vs 416 bf16 (1B, H100): not used
            if qkernel.available(self.qweight.device, dtype, self.kernels):
                return "triton int8"  # chosen in forward, nothing to convert
            return _verified(self, None, dtype, "inductor int8 gemv")
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return None
        if self.qweight.data_ptr() % 64:  # its CPU kernel loads codes as aligned vectors: codes at an odd offset of
            self.qweight = self.qweight.clone()  # a loaded file crash it (bf16, 5+ rows; torch 2.13): an aligned copy
        return _install(self, self.scale.to, dtype, "aten._weight_int8pack_mm")


class Int4Linear(QuantLinear):
    """INT4 weights, asymmetric per group of input columns, two codes per byte: ``W ~ (q - zero) * scale``.

    Buffers: qweight uint8 (out, in / 2) (column 2j in the high nibble), scale (out, in / group_size) in the compute
    dtype, zero uint8 (out, in / group_size). Bytes per parameter: 0.5 + (itemsize(scale) + 1) / group_size.

    On CUDA `prepare_fast_path` re-lays them in place, K-major (``layout = "kn"``: qweight int32 (in / 8, out),
    scale/zero (in / group_size, out), `qkernel.pack_kn`), the layout of the split-K GEMV and the GEMM that read
    it. Lossless and in place: one copy of the weights; `state_dict()` still writes (and loading reads) the
    layout above, and `codes()` / `weight` / `nk_buffers()` give it in any layout.
    """

    kind = "int4"
    _row_buffers = ("qweight", "scale", "zero")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 128,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        if group_size <= 0 or in_features % group_size or group_size % 2:
            raise ValueError(f"INT4 group_size {group_size} must be even and divide in_features {in_features}")
        self.group_size = group_size
        n_groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=dtype, device=device))
        self.register_buffer("zero", torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))

    def options(self) -> dict:
        return {"group_size": self.group_size}

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                   group_size: int) -> Int4Linear:
        """Wrap already computed codes uint8 (out, in), scale/zero (out, n_groups) (what AWQ/GPTQ produce)."""
        out_f, in_f = codes.shape
        out = cls(in_f, out_f, bias is not None, group_size, scale.dtype, codes.device)
        out.qweight.copy_(pack_nibbles(codes))
        out.scale.copy_(scale)
        out.zero.copy_(zero)
        if bias is not None:
            out.bias.data.copy_(bias.detach())
        return out

    @classmethod
    def from_linear(cls, linear: nn.Module, group_size: int = 128, dtype: torch.dtype | None = None,
                    clip: torch.Tensor | float | None = None) -> Int4Linear:
        w = linear.weight.detach()
        scale, zero = int4_params(w, group_size, clip, scale_dtype=dtype or w.dtype)
        return cls.from_codes(int4_quantize(w, scale, zero), scale, zero, getattr(linear, "bias", None), group_size)

    def codes(self) -> torch.Tensor:
        """(out, in) uint8 in [0, 15], whatever the layout."""
        return qkernel.unpack_kn(self.qweight) if self.layout == "kn" else unpack_nibbles(self.qweight)

    def nk_buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight, scale, zero) in the checkpoint layout (converted when the layer is K-major)."""
        if self.layout == "kn":
            return pack_nibbles(self.codes()), self.scale.T.contiguous(), self.zero.T.contiguous()
        return self.qweight, self.scale, self.zero

    @torch.no_grad()
    def to_layout(self, layout: str) -> None:
        """Re-lay the buffers in place: "nk" (the checkpoint layout) or "kn" (K-major, see the class doc)."""
        if layout == self.layout:
            return
        if layout == "kn":
            q, s, z = qkernel.pack_kn(self.codes()), self.scale.T.contiguous(), self.zero.T.contiguous()
        else:
            q, s, z = self.nk_buffers()
        self._buffers.update(qweight=q, scale=s, zero=z)
        self.layout, self._fast = layout, None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout == "kn":  # checkpoints hold one layout, whatever the device made of it
            destination.update(zip((prefix + "qweight", prefix + "scale", prefix + "zero"), self.nk_buffers()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.to_layout("nk")  # what checkpoints hold; prepare_fast_path re-lays it for the device
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        _, scale, zero = self.nk_buffers()
        return int4_dequantize(self.codes(), scale, zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if self.layout == "kn":  # CUDA: the K-major GEMV / GEMM; elsewhere dequantize + matmul
            y = qkernel.linear_int4kn(x2d, self.qweight, self.scale, self.zero, self.group_size, self.kernels)
        elif self._use_fast(x2d):
            name, (packed, scales_zeros), _, _, compute = self._fast
            op = torch.ops.aten._weight_int4pack_mm_for_cpu if name.endswith("_for_cpu") \
                else torch.ops.aten._weight_int4pack_mm
            y = op(x2d.to(compute), packed, self.group_size, scales_zeros).to(x2d.dtype)
        elif qkernel.use_kernel(x2d, self.kernels):  # CUDA: the Triton GEMV / GEMM on these buffers
            y = qkernel.linear_int4(x2d, self.qweight, self.scale, self.zero, self.group_size, self.kernels)
        else:
            y = F.linear(x2d, int4_dequantize(self.codes(), self.scale, self.zero, x.dtype))
        return self._add_bias(y).view(*x.shape[:-1], self.out_features)

    def _fused(self, x2d: torch.Tensor, fuse) -> torch.Tensor | None:
        if self.layout == "kn" and qkernel.use_kernel(x2d, self.kernels):
            return qkernel.linear_int4kn(x2d, self.qweight, self.scale, self.zero, self.group_size, self.kernels, fuse)
        return None

    def prepare_fast_path(self, dtype: torch.dtype = torch.bfloat16, inner_k_tiles: int = 8,
                          aten: bool = False) -> str | None:
        """On CUDA the Triton kernels: the buffers re-laid K-major in place (reported as "triton int4"), unless
        `aten`; otherwise the tinygemm layout: codes re-packed by the device's converter, and per group (scale, float
        zero) with ``W = (q - 8) * scale + zero_f`` -- so ``zero_f = (8 - zero) * scale``."""
        if self._fast is not None and self._fast[2:4] == (self.qweight.device, dtype):
            return self._fast[0]  # prepared for this device and dtype already (the engine asks again)
        if self.qweight.is_cuda and not aten and qkernel.available(self.qweight.device, dtype, self.kernels) \
                and qkernel.group_ok(self.group_size):
            self.to_layout("kn")
            return "triton int4"
        self.to_layout("nk")
        zero_f = (8 - self.zero.float()) * self.scale.float()
        scales_zeros = torch.stack([self.scale.float().T, zero_f.T], dim=-1)  # (groups, out, 2)
        try:
            if self.qweight.is_cuda:
                packed = torch.ops.aten._convert_weight_to_int4pack(self.qweight, inner_k_tiles)
                name = "aten._weight_int4pack_mm"
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 2)
                name = "aten._weight_int4pack_mm_for_cpu"
        except (RuntimeError, AttributeError, NotImplementedError):
            return None
        return _install(self, lambda compute: (packed, scales_zeros.to(compute).contiguous()), dtype, name)


def prepare_fast_path(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Convert every quantized linear of `model` (already on its device) to its fused-kernel layout for inputs of
    `dtype` where a kernel exists and verifies; returns {kernel name or 'reference': layer count}."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            name = module.prepare_fast_path(dtype) or "reference"
            counts[name] = counts.get(name, 0) + 1
    return counts
