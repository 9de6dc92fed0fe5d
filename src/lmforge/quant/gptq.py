"""GPTQ: INT4 rounding with second-order error compensation (Frantar et al. 2023).

For a linear with calibration inputs X (rows, in), minimise ||X W^T - X Q^T||^2 column by column: after rounding
column j, the not-yet-rounded columns absorb its error through the inverse Hessian H^-1 = (2 X^T X + damp I)^-1,

    err = (w_j - q_j) / [H^-1]_jj,    W[:, k] -= err * [H^-1]_jk   for k > j,

computed with the upper Cholesky factor of H^-1 and applied lazily in blocks of 128 columns (the reference's
formulation). Group parameters (scale, zero) are computed when a group is reached, from the already updated
weights. ``act_order`` visits columns by decreasing Hessian diagonal (largest activations first); groups then keep
their parameters from the original weight (computed up front) so the stored layout is unchanged.
The output is the same INT4 format as RTN and AWQ.
"""
from __future__ import annotations

import torch
from torch import nn

from .calibration import InputStats
from .linear import Int4Linear
from .rtn import int4_params

__all__ = ["gptq_quantize", "gptq_block"]


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, group_size: int = 128, act_order: bool = False,
                  damp: float = 0.01, block: int = 128,
                  scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (out, in), hessian = sum x^T x (in, in) -> (codes uint8 (out, in), scale (out, G), zero uint8 (out, G))."""
    out_f, in_f = w.shape
    scale_dtype = scale_dtype or w.dtype
    W = w.float().clone()
    H = hessian.float().clone()
    dead = H.diagonal() == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    n_groups = in_f // group_size
    scale = torch.empty(out_f, n_groups, dtype=scale_dtype, device=w.device)
    zero = torch.empty(out_f, n_groups, dtype=torch.uint8, device=w.device)
    perm = torch.arange(in_f, device=w.device)
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        scale, zero = int4_params(W, group_size, scale_dtype=scale_dtype)  # static groups
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=w.device)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // group_size
            if not act_order and col % group_size == 0:  # entering a group: parameters from the updated weights
                s, z = int4_params(W1[:, i: i + group_size], group_size, scale_dtype=scale_dtype)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            sg, zg = scale[:, g].float(), zero[:, g].float()
            q = (W1[:, i] / sg).round().add(zg).clamp(0, 15)
            codes[:, col] = q.to(torch.uint8)
            err = (W1[:, i] - (q - zg) * sg) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            err1[:, i] = err
        W[:, i2:] -= err1 @ Hinv[i1:i2, i2:]
    return codes, scale, zero


@torch.no_grad()
def gptq_block(block: nn.Module, stats: dict[str, InputStats], targets: set[str], group_size: int = 128,
               act_order: bool = False, damp: float = 0.01, dtype: torch.dtype | None = None) -> dict[str, Int4Linear]:
    """GPTQ-quantize the `targets` (block-relative names) of one block; returns the new Int4Linears by name."""
    out = {}
    for name in targets:
        lin = block.get_submodule(name)
        if group_size > lin.in_features or lin.in_features % group_size:
            raise ValueError(f"GPTQ group_size {group_size} must divide in_features {lin.in_features} ({name})")
        if not act_order and group_size % 2:
            raise ValueError(f"GPTQ group_size must be even, got {group_size}")
        codes, scale, zero = gptq_quantize(lin.weight, stats[name].hessian, group_size, act_order, damp,
                                           block=group_size * max(1, 128 // group_size),
                                           scale_dtype=dtype or lin.weight.dtype)
        out[name] = Int4Linear.from_codes(codes, scale, zero, getattr(lin, "bias", None), group_size)
    return out
