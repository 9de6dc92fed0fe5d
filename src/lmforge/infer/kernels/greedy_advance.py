"""The end of a greedy decode step inside its CUDA graph: argmax, token feedback and bookkeeping in one launch.

A captured greedy step ends with each row's first-maximum token written where the engine reads it (`sampled`,
one row per step of a multi-step run), fed back as the next step's input (`tokens`), and the positions and step
counter advanced. As PyTorch ops that is a two-stage argmax plus seven small kernels, ~20 µs of a 1B model's ~1 ms
batch-1 step on an H100; as one Triton launch (programs over vocabulary slices, the last to arrive finishing each
row), started early under programmatic dependent launch, it is a few µs. CPU tensors take the PyTorch ops, or the
kernel under TRITON_INTERPRET=1 with `KernelOptions.cpu_interpreter` (tests).
"""
from __future__ import annotations

import torch

from ..sampling.batch import argmax_rows
from .options import DEFAULT, KernelOptions
from .paged_attention import arrival_counters, kernel_available

SLICE = 2048  # vocabulary entries per program
_KERNEL = None
_COUNTERS: dict[torch.device, torch.Tensor] = {}  # one per row, then one of rows (see the kernel)


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        from . import greedy_advance_kernel

        _KERNEL = greedy_advance_kernel
    return _KERNEL


def greedy_advance(logits: torch.Tensor, sampled: torch.Tensor, step: torch.Tensor, tokens: torch.Tensor,
                   starts: torch.Tensor, options: KernelOptions = DEFAULT) -> None:
    """In place, for logits (B, V): t = each row's first maximum (as `argmax`); sampled[step, :B] = t (sampled
    (steps, B) may be a column slice), tokens[:B] = t, starts[:B] += 1, step += 1 (step: (1,) int64)."""
    B, V = logits.shape
    if not ((logits.is_cuda or options.cpu_interpreter) and kernel_available(logits.device)):
        t = argmax_rows(logits)  # (B,)
        sampled.index_copy_(0, step, t[None])
        step.add_(1)
        tokens[:B].copy_(t)
        starts[:B].add_(1)
        return
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    parts = -(-V // SLICE)
    values = torch.empty(B, parts, dtype=torch.float32, device=logits.device)
    index = torch.empty(B, parts, dtype=torch.int32, device=logits.device)
    from .gemv import pdl_options  # (gemv imports paged_attention, as this module does)

    kernel = _kernel()
    kernel.greedy_advance_kernel[(B, parts)](
        logits, logits.stride(0), V, values, index, arrival_counters(_COUNTERS, logits.device, B + 1), sampled,
        sampled.stride(0), step, tokens, starts, PER=SLICE, PARTS=parts, PARTS_P=kernel.next_power_of_2(parts),
        **pdl_options(logits.device, options.pdl))
