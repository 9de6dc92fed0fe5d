"""The straight-through estimator shared by QAT and BitNet: forward a rounded value, backward the identity."""
from __future__ import annotations

import torch


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
        return rounded

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """Exactly `rounded` in the forward (no x + (r - x) rounding drift); gradient flows to `x` as if unrounded."""
    return _StraightThrough.apply(x, rounded.detach())
