"""NF4: 4-bit NormalFloat weights with double-quantized block constants (QLoRA, Dettmers et al. 2023).

Weights of a trained network are close to normal within a block, so the 16 code values are placed at quantiles of
N(0, 1) (scaled into [-1, 1], with an exact zero) instead of evenly: each code is used about equally often, which
gives a lower round-trip error than uniform INT4 at the same 4 bits.

Storage of a weight with n elements (n padded up to a multiple of ``block_size``):

- ``codes``: uint8 (n / 2,) -- two 4-bit indices into ``NF4_LEVELS`` per byte, element 2i in the high nibble;
- one absmax per block of ``block_size`` (64) elements. With ``double_quant`` (the default) those constants are
  themselves quantized: their mean is subtracted and the rest stored as int8 with one fp32 scale per ``dq_block_size``
  (256) constants. Bytes per parameter: 0.5 + 1/64 + 4/(64*256) ~= 0.516 (0.5 + 4/64 = 0.5625 without).

Public API (stable; QLoRA builds on it):

- ``quantize_nf4(w, block_size=64, double_quant=True, dq_block_size=256) -> NF4Tensor``
- ``dequantize_nf4(t: NF4Tensor, dtype=None) -> Tensor`` (also ``t.dequantize(dtype)``), shape ``t.shape``
- ``NF4Tensor``: ``shape``, ``dtype`` (of the source), ``block_size``, ``double_quant``, ``nbytes``, ``to(device)``,
  ``tensors()`` (its storage as a dict of plain tensors) and ``NF4Tensor.from_tensors(...)``
- ``NF4Linear(in_features, out_features, bias=False, block_size=64, double_quant=True, dtype=torch.bfloat16)``:
  a frozen linear whose weight is stored as NF4 buffers (so ``.to(device)`` and ``state_dict()`` carry it); its
  forward is `lmforge.quant.qkernel.linear_nf4` (Triton kernels on CUDA, a table dequantization elsewhere). ``NF4Linear.from_linear(linear)`` quantizes an ``nn.Linear``;
  ``.weight`` is the dequantized (out_features, in_features) weight (a new tensor, for merging/inspection);
  ``.nf4`` is the ``NF4Tensor`` view of its buffers; ``.bias`` is an ordinary frozen parameter or None.
- ``NF4Linear.spec()``: ``{"type": "nf4", "bias": ..., "block_size": ..., "double_quant": ..., "dq_block_size": ...}``,
  what `lmforge.quant.save_quantized` records so `load_quantized` can rebuild the module;
- ``nf4_linear_factory(**opts)``: a ``linear(name, in, out, bias)`` factory for ``Transformer`` building NF4Linears
  (empty; fill them by loading a quantized state dict).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import QuantLinear

__all__ = ["NF4_LEVELS", "NF4Tensor", "NF4Linear", "quantize_nf4", "dequantize_nf4", "nf4_levels",
           "nf4_linear_factory", "pack_nibbles", "unpack_nibbles"]


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 code values, ascending, in [-1, 1] with an exact 0 (QLoRA appendix E).

    Quantiles of N(0, 1) at evenly spaced probabilities: 8 for the positive half, 7 for the negative half (so 0 is a
    code and both ends reach +-1 after normalisation). The outermost probability, 0.9677, is the paper's choice:
    the midpoint of the last two of 2**4 + 1 evenly spaced quantile edges, which keeps the tails finite.
    """
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values > 0
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values < 0
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.abs().max()).float()


NF4_LEVELS = nf4_levels()  # (16,) float32
_NF4_EDGES = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2  # (15,) decision boundaries: nearest level = bucket index


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 16) of even length (..., 2k) -> (..., k) bytes; element 2i goes to the high nibble."""
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 2k) uint8 codes; inverse of `pack_nibbles`."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten(-2)


def _pad_to(x: torch.Tensor, multiple: int, value: float = 0.0) -> torch.Tensor:
    """1-D x padded at the end to a multiple of `multiple`."""
    return F.pad(x, (0, -x.numel() % multiple), value=value)


@dataclass
class NF4Tensor:
    """An NF4-quantized tensor: packed codes plus (optionally double-quantized) per-block absmax constants.

    ``absmax`` is float32 (n_blocks,) without double quantization; with it, int8 (n_blocks,) to be read as
    ``absmax * absmax_scale[block // dq_block_size] + absmax_mean``.
    """

    codes: torch.Tensor  # uint8 (n_padded / 2,)
    absmax: torch.Tensor  # float32 or int8 (n_blocks,)
    absmax_scale: torch.Tensor | None  # float32 (ceil(n_blocks / dq_block_size),) with double_quant
    absmax_mean: torch.Tensor | None  # float32 () with double_quant
    shape: torch.Size
    dtype: torch.dtype  # dtype of the source tensor: what dequantize() returns by default
    block_size: int = 64
    dq_block_size: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of storage (codes and constants), what the quantized weight costs in memory or on disk."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def block_absmax(self) -> torch.Tensor:
        """float32 (n_blocks,): each block's scale, decoded from the double-quantized form where needed."""
        if not self.double_quant:
            return self.absmax.float()
        scale = self.absmax_scale.repeat_interleave(self.dq_block_size)[: self.absmax.numel()]
        return self.absmax.float() * scale + self.absmax_mean

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight back in `dtype` (default: the source dtype), shape `self.shape`."""
        values = NF4_LEVELS.to(self.codes.device)[unpack_nibbles(self.codes).long()]  # (n_padded,)
        blocks = values.view(-1, self.block_size) * self.block_absmax()[:, None]  # (n_blocks, block)
        return blocks.flatten()[: self.numel].view(self.shape).to(dtype or self.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Storage as named plain tensors (what a checkpoint holds)."""
        out = {"codes": self.codes, "absmax": self.absmax}
        if self.double_quant:
            out.update(absmax_scale=self.absmax_scale, absmax_mean=self.absmax_mean)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape, dtype: torch.dtype = torch.float32,
                     block_size: int = 64, dq_block_size: int = 256) -> NF4Tensor:
        return cls(tensors["codes"], tensors["absmax"], tensors.get("absmax_scale"), tensors.get("absmax_mean"),
                   torch.Size(shape), dtype, block_size, dq_block_size)

    def to(self, device) -> NF4Tensor:
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return NF4Tensor.from_tensors(moved, self.shape, self.dtype, self.block_size, self.dq_block_size)


@torch.no_grad()
def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = True,
                 dq_block_size: int = 256) -> NF4Tensor:
    """Quantize any float tensor to NF4: per block of `block_size` elements, w / absmax -> nearest NF4 level."""
    if block_size % 2:
        raise ValueError(f"NF4 block_size must be even (two codes per byte), got {block_size}")
    flat = _pad_to(w.detach().flatten().float(), block_size).view(-1, block_size)  # (n_blocks, block)
    absmax = flat.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)  # (n_blocks,)
    normed = flat / absmax[:, None]  # in [-1, 1]
    codes = torch.bucketize(normed, _NF4_EDGES.to(w.device)).to(torch.uint8)  # nearest level's index
    packed = pack_nibbles(codes.flatten())
    if not double_quant:
        return NF4Tensor(packed, absmax, None, None, w.shape, w.dtype, block_size, dq_block_size)
    mean = absmax.mean()
    centered = _pad_to(absmax - mean, dq_block_size).view(-1, dq_block_size)  # (n_dq_blocks, dq_block)
    scale = (centered.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = (centered / scale[:, None]).round().clamp(-127, 127).to(torch.int8).flatten()[: absmax.numel()]
    return NF4Tensor(packed, q, scale, mean, w.shape, w.dtype, block_size, dq_block_size)


def dequantize_nf4(t: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`t` back as a dense tensor of its original shape (in `dtype`, default the source dtype)."""
    return t.dequantize(dtype)


class NF4Linear(QuantLinear):
    """A frozen linear layer with an NF4 weight, dequantized on the fly: ``y = x @ deq(W).T + b``.

    Shapes: x (..., in_features) -> (..., out_features). Buffers: codes uint8 (n/2,), absmax (n/block,) and with
    double quantization absmax_scale / absmax_mean (n = in * out, padded to the block size). The weight is never
    trained (QLoRA trains a LoRA update beside it); the bias, if any, is a frozen parameter in `dtype`.
    """

    kind = "nf4"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block_size: int = 64,
                 double_quant: bool = True, dq_block_size: int = 256, dtype: torch.dtype = torch.bfloat16,
                 device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.block_size, self.dq_block_size, self.dtype = block_size, dq_block_size, dtype
        n = in_features * out_features
        n_blocks = -(-n // block_size)
        n_padded = n_blocks * block_size
        self.register_buffer("codes", torch.zeros(n_padded // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(n_blocks, device=device,
                                                   dtype=torch.int8 if double_quant else torch.float32))
        if double_quant:
            self.register_buffer("absmax_scale", torch.zeros(-(-n_blocks // dq_block_size), device=device))
            self.register_buffer("absmax_mean", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax_scale", None)
            self.register_buffer("absmax_mean", None)

    def options(self) -> dict:
        return {"block_size": self.block_size, "double_quant": self.double_quant, "dq_block_size": self.dq_block_size}

    @classmethod
    @torch.no_grad()
    def pack(cls, layers: list[QuantLinear]) -> NF4Linear | None:
        """K-major NF4 layers reading one input (q/k/v, gate/up) as one layer: codes and absmax concatenated along
        the outputs (the originals then view them, as `QuantLinear.pack`), the double-quantization scales one after
        another, which needs each layer's block count to be whole dq blocks; the packed layer holds each layer's
        absmax_mean once per dq block (a few floats). None when they do not pack (row layout: blocks run across
        rows; other options or devices)."""
        first = layers[0]
        blocks = [m.out_features * m.in_features // m.block_size for m in layers]
        if any(type(m) is not cls or m.layout != "kn" or m.options() != first.options() or m._fast is not None
               or m.kernels != first.kernels or m.in_features != first.in_features or m.dtype != first.dtype
               or (m.bias is None) != (first.bias is None) or m.codes.device != first.codes.device for m in layers) \
                or (first.double_quant and any(b % first.dq_block_size for b in blocks)):
            return None
        sizes = [m.out_features for m in layers]
        out = cls(first.in_features, sum(sizes), first.bias is not None, dtype=first.dtype, device=first.codes.device,
                  **first.options())
        out.kernels, out.layout = first.kernels, "kn"
        parts = {"codes": (-1, sizes), "absmax": (-1, sizes)}
        if first.double_quant:
            parts["absmax_scale"] = (0, [b // first.dq_block_size for b in blocks])
            out.absmax_mean = torch.cat([m.absmax_mean.reshape(1).expand(b // first.dq_block_size)
                                         for m, b in zip(layers, blocks)])
        return out._stack(layers, parts)

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def _k_major_ok(self) -> bool:
        return self.in_features % self.block_size == 0 and self.in_features % 8 == 0

    def nk_buffers(self) -> dict[str, torch.Tensor]:
        """{codes, absmax} in the checkpoint layout (converted when the layer is K-major)."""
        if self.layout == "kn":
            from .qkernel import unpack_kn

            return {"codes": pack_nibbles(unpack_kn(self.codes)).flatten(), "absmax": self.absmax.T.flatten()}
        return {"codes": self.codes, "absmax": self.absmax}

    @torch.no_grad()
    def to_layout(self, layout: str) -> None:
        """Re-lay codes and absmax in place: "nk" (the checkpoint layout above) or "kn" (K-major, for the CUDA
        kernels: codes int32 (in / 8, out) as `qkernel.pack_kn`, absmax (in / block, out)); lossless both ways."""
        if layout == self.layout:
            return
        if layout == "kn":
            from .qkernel import pack_kn

            if not self._k_major_ok():
                raise ValueError(f"NF4Linear in_features {self.in_features} is not a multiple of block_size "
                                 f"{self.block_size} (and of 8): it stays in the row layout")
            n, k = self.out_features, self.in_features
            new = {"codes": pack_kn(unpack_nibbles(self.codes).view(n, k)),
                   "absmax": self.absmax.view(n, k // self.block_size).T.contiguous()}
        else:
            new = self.nk_buffers()
        self._buffers.update(new)
        self.layout = layout

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout == "kn":  # checkpoints hold one layout, whatever the device made of it
            destination.update({prefix + k: v for k, v in self.nk_buffers().items()})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.to_layout("nk")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def nf4(self) -> NF4Tensor:
        """The weight as an NF4Tensor over this module's buffers (copies of codes and absmax when K-major)."""
        tensors = self.nk_buffers()
        if self.double_quant:
            tensors.update(absmax_scale=self.absmax_scale, absmax_mean=self.absmax_mean)
        return NF4Tensor.from_tensors(tensors, (self.out_features, self.in_features), self.dtype, self.block_size,
                                      self.dq_block_size)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight (out_features, in_features) in `self.dtype`; a new tensor on every access."""
        return self.nf4.dequantize(self.dtype)

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> NF4Linear:
        """Overwrite the stored weight with NF4(weight); weight is (out_features, in_features)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"NF4Linear weight must be {(self.out_features, self.in_features)}, "
                             f"got {tuple(weight.shape)}")
        self.to_layout("nk")
        q = quantize_nf4(weight.to(self.codes.device), self.block_size, self.double_quant, self.dq_block_size)
        for name, t in q.tensors().items():
            getattr(self, name).copy_(t)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Module, block_size: int = 64, double_quant: bool = True,
                    dq_block_size: int = 256, dtype: torch.dtype | None = None) -> NF4Linear:
        """Quantize an nn.Linear (or anything with weight/bias/in_features/out_features); compute dtype defaults to
        the source weight's dtype."""
        w, b = linear.weight, getattr(linear, "bias", None)
        out = cls(linear.in_features, linear.out_features, b is not None, block_size, double_quant, dq_block_size,
                  dtype or w.dtype, device=w.device)
        out.quantize_(w)
        if b is not None:
            out.bias.copy_(b.detach().to(out.bias.dtype))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import qkernel  # CUDA: a Triton GEMV / GEMM on the codes; elsewhere dequantize (level-pair table)

        if self.layout == "kn":
            y = qkernel.linear_nf4kn(x.reshape(-1, self.in_features), self.codes, self.absmax, self.absmax_scale,
                                     self.absmax_mean, self.block_size, self.dq_block_size, self.kernels)
        else:
            y = qkernel.linear_nf4(x.reshape(-1, self.in_features), self.codes, self.absmax, self.absmax_scale,
                                   self.absmax_mean, self.out_features, self.block_size, self.dq_block_size,
                                   self.kernels)
        return self._add_bias(y).view(*x.shape[:-1], self.out_features)

    def _fused(self, x2d: torch.Tensor, fuse) -> torch.Tensor | None:
        from . import qkernel

        if self.layout == "kn" and qkernel.use_kernel(x2d, self.kernels):
            return qkernel.linear_nf4kn(x2d, self.codes, self.absmax, self.absmax_scale, self.absmax_mean,
                                        self.block_size, self.dq_block_size, self.kernels, fuse)
        return None

    def prepare_fast_path(self, dtype: torch.dtype = torch.bfloat16) -> str | None:
        """On CUDA the Triton kernels, codes and absmax re-laid K-major in place (reported as "triton nf4");
        elsewhere the table dequantization runs."""
        from . import qkernel

        if qkernel.available(self.codes.device, dtype, self.kernels) and qkernel.group_ok(self.block_size) \
                and self._k_major_ok():
            self.to_layout("kn")
            return "triton nf4"
        return None

    def _apply(self, fn, recurse=True):
        """`model.to(dtype)` / `.half()` move the fp32 block constants but never cast them: rounding them to bf16
        would add error to every weight for no memory gain."""
        fp32 = {n: t for n, t in self._buffers.items() if t is not None and t.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, t in fp32.items():
            self._buffers[name] = t.to(fn(t.new_empty(0)).device)
        return self


def nf4_linear_factory(block_size: int = 64, double_quant: bool = True, dtype: torch.dtype = torch.bfloat16):
    """A `Transformer(cfg, linear=...)` factory building empty NF4Linears (fill by loading a quantized checkpoint)."""

    def linear(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return NF4Linear(in_features, out_features, bias, block_size, double_quant, dtype=dtype)

    return linear
