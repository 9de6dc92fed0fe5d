"""QLoRA (Dettmers et al. 2023): LoRA over a frozen base stored in 4-bit NormalFloat.

Every linear of the base except the output head is replaced by an `NF4Linear` (block size 64, double-quantized
absmax constants: ~0.516 bytes per weight instead of 2 in bf16), dequantized on the fly in each forward; LoRA (or
DoRA) trains on top in float32 master weights, computing in the autocast dtype. The artifact is an ordinary PEFT
LoRA adapter for the *unquantized* base: quantization is a way to train, not part of the result, so the adapter
also applies to the bf16 model (and peft loads it).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ..models.hf import save_hf
from ..models.modules import ALL_LINEAR, linear_modules, select_targets, set_module
from ..quant.nf4 import NF4Linear
from .lora import merged
from .methods import LoraMethod, register_method
from .peft_format import load_peft_adapter

__all__ = ["QLoraMethod", "quantize_linears", "nf4_bytes", "dequantized"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@torch.no_grad()
def quantize_linears(model: nn.Module, targets: list[str] | str = ALL_LINEAR, block_size: int = 64,
                     double_quant: bool = True, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Replace the plain nn.Linear layers `targets` selects ('all-linear' = all but lm_head) by NF4Linear, one at a
    time (peak extra memory: one layer); return their paths."""
    linears = linear_modules(model)
    chosen = [p for p in select_targets(list(linears), targets) if type(linears[p]) is nn.Linear]
    for path in chosen:
        set_module(model, path, NF4Linear.from_linear(linears[path], block_size, double_quant, dtype=dtype))
        linears[path] = None  # drop the last reference to the full-precision weight
    return chosen


def nf4_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of NF4 storage incl. constants, quantized weight count) over every NF4Linear in `model`."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    return sum(m.nf4.nbytes for m in layers), sum(m.in_features * m.out_features for m in layers)


@contextmanager
def dequantized(model: nn.Module, device: torch.device | str | None = None) -> Iterator[nn.Module]:
    """Temporarily swap every bare NF4Linear (one not wrapped by an adapter) for a dequantized nn.Linear."""
    paths = {p: m for p, m in model.named_modules() if isinstance(m, NF4Linear) and not p.endswith(".base_layer")}
    try:
        for path, q in paths.items():
            lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
            lin.weight = nn.Parameter(q.weight.to(device or q.codes.device), requires_grad=False)
            if q.bias is not None:
                lin.bias = nn.Parameter(q.bias.detach().to(device or q.codes.device), requires_grad=False)
            set_module(model, path, lin)
        yield model
    finally:
        for path, q in paths.items():
            set_module(model, path, q)


@register_method
class QLoraMethod(LoraMethod):
    """QLoRA: NF4 frozen base (block 64, double quantization) + LoRA; artifacts are PEFT LoRA adapters."""

    name: ClassVar[str] = "qlora"
    trains: ClassVar[str] = "LoRA B A over an NF4-quantized frozen base"
    artifact: ClassVar[str] = "PEFT adapter (LORA) for the unquantized base"

    target_modules: list[str] | str = ALL_LINEAR
    """LoRA targets; QLoRA puts adapters on every linear layer by default."""
    quantize_modules: list[str] | str = ALL_LINEAR
    """Base linears stored in NF4 ('all-linear' = all but lm_head)."""
    block_size: int = Field(64, ge=2, multiple_of=2)
    """Weights per absmax constant; even (two 4-bit codes per byte)."""
    double_quant: bool = True
    """Quantize the absmax constants too (int8 per block of 256, fp32 scale): 0.516 instead of 0.5625 bytes/weight."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype the NF4 weights are dequantized to (the matmul dtype when the input is not autocast)."""

    def apply(self, model: nn.Module) -> None:
        quantize_linears(model, self.quantize_modules, self.block_size, self.double_quant, DTYPES[self.compute_dtype])
        super().apply(model)

    def load(self, model: nn.Module, path: str | Path) -> None:
        """Quantize the base as configured, then apply and load the PEFT adapter."""
        quantize_linears(model, self.quantize_modules, self.block_size, self.double_quant, DTYPES[self.compute_dtype])
        load_peft_adapter(model, path)

    def export(self, model: nn.Module, out_dir: str | Path) -> Path:
        """Merged full checkpoint on the dequantized weights (W_nf4 + B A), built on the CPU."""
        with merged(model, device="cpu"), dequantized(model, device="cpu"):
            return save_hf(model, out_dir)
