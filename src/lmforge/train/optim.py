"""Optimizers by name and warmup + decay schedules (as LambdaLR, so their state checkpoints with the rest)."""
from __future__ import annotations

import math

import torch
from torch import nn

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


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], cfg: OptimSection) -> torch.optim.Optimizer:
    decay = [p for _, p in named_params if p.ndim >= 2]
    no_decay = [p for _, p in named_params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    fused = _fused_adamw_ok(decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


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
