"""Optimizers by name and warmup + decay schedules (as LambdaLR, so their state checkpoints with the rest)."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError, did_you_mean
from .config import OptimSection, ScheduleSection


def _fused_adamw_ok(params: list[nn.Parameter]) -> bool:
    """Fused AdamW exists for CUDA (and newer CPU builds); probe instead of assuming."""
    if not params or not all(p.is_cuda for p in params):
        return False
    try:
        torch.optim.AdamW([torch.zeros(1, device=params[0].device, requires_grad=True)], fused=True)
        return True
    except (RuntimeError, TypeError):
        return False


def param_groups(named_params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, never on 1-D parameters (biases, norm weights)."""
    decay = [p for _, p in named_params if p.ndim >= 2]
    no_decay = [p for _, p in named_params if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def _adamw(named_params, cfg: OptimSection, model: nn.Module) -> torch.optim.Optimizer:
    fused = _fused_adamw_ok([p for _, p in named_params])
    return torch.optim.AdamW(param_groups(named_params, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             fused=fused or None)


def _sgd(named_params, cfg: OptimSection, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(named_params, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)


# name → builder(named trainable params, OptimSection, model) -> Optimizer. Other modules register more (LOMO, BAdam,
# GaLore, ...). An optimizer that updates parameters inside backward hooks (LOMO-style) sets the attribute
# `updates_in_backward = True`: the loop then skips clipping and `optimizer.step()` (the hooks did both).
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adamw": _adamw, "sgd": _sgd}


def register_optimizer(name: str, builder: Callable[..., torch.optim.Optimizer]) -> None:
    OPTIMIZERS[name] = builder


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], cfg: OptimSection,
                    model: nn.Module | None = None) -> torch.optim.Optimizer:
    from . import optimizers  # noqa: F401  (registers lomo, adalomo, adamw_backward, badam, galore)

    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer optim.name='{cfg.name}'{did_you_mean(cfg.name, OPTIMIZERS)}; "
                          f"available: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[cfg.name](named_params, cfg, model)


def lr_multiplier(step: int, total: int, cfg: ScheduleSection) -> float:
    """Fraction of the peak lr at `step` (0-based): linear warmup, then cosine/linear decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.kind == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: ScheduleSection):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))
