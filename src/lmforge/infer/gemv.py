"""Matrix-vector products for batch-1 decode: y = x W^T (+ b) with one input row, in Triton.

At one token per step a linear layer is a pure weight read (2 bytes per weight, 2 FLOPs), so its speed is how close
the kernel gets to HBM bandwidth. cuBLAS picks GEMM tilings built for many rows; for one row this kernel streams W
in BLOCK_N x BLOCK_K tiles, each program owning a few output rows (no split-K reduction pass), autotuned per
(N, K) once, before any CUDA-graph capture (the decode warm-up runs it). Everything else — more rows, CPU, fp32,
non-contiguous weights, no triton — takes `F.linear`.

Exposed to torch.compile as the custom op `lmforge::gemv` (opaque to inductor, captured in CUDA graphs as is).
CPU tests run the kernel under TRITON_INTERPRET=1 against `F.linear`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .paged_attention import kernel_available

_KERNEL = None
enabled = True  # a switch for benchmarks (cuBLAS vs this kernel in the same process)
cpu_interpreter = False  # also route CPU rows through Triton's interpreter (tests; slow)


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        from . import gemv_kernel

        _KERNEL = gemv_kernel
    return _KERNEL


gemv_available = kernel_available  # the same conditions as the paged-attention kernel: CUDA, or the interpreter


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool = False) -> torch.Tensor:
    N, K = weight.shape
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    mod = _kernel()
    args = (x, weight, bias if bias is not None else y, y, N, K, weight.stride(0))
    if x.is_cuda:
        grid = lambda meta: (-(-N // meta["BLOCK_N"]),)  # noqa: E731
        mod.gemv_tuned[grid](*args, HAS_BIAS=bias is not None, EVEN_K=K % 1024 == 0, SILU_MUL=silu_mul)
    else:  # the interpreter: one fixed config (autotuning would time the interpreter)
        mod.gemv_kernel[(-(-N // 4),)](*args, HAS_BIAS=bias is not None, BLOCK_N=4, BLOCK_K=64, EVEN_K=K % 64 == 0,
                                       SILU_MUL=silu_mul)
    return y


@torch.library.custom_op("lmforge::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) with one row in all, weight (N, K) contiguous → (..., N)."""
    return _launch(x, weight, bias)


@gemv.register_fake
def _(x, weight, bias=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("lmforge::gemv_silu_mul", mutates_args=())
def gemv_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The SwiGLU MLP's down projection straight from the packed gate/up output: x (..., 2K) = [gate, up], one row,
    weight (N, K) → (..., N) = (silu(gate) * up) W^T (+ bias), no intermediate tensor or extra launch."""
    return _launch(x, weight, bias, silu_mul=True)


@gemv_silu_mul.register_fake
def _(x, weight, bias=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One input row, a half-precision contiguous weight of the same dtype, where the kernel runs."""
    return (enabled and x.numel() == x.shape[-1] and weight.dtype in (torch.bfloat16, torch.float16)
            and x.dtype == weight.dtype and weight.is_contiguous() and x.device == weight.device
            and (x.is_cuda or cpu_interpreter) and gemv_available(x.device))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through the GEMV kernel when `x` is one row (decode at batch 1)."""
    if use_gemv(x, weight):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)
