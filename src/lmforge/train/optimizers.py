"""Memory-efficient full fine-tuning optimizers: LOMO, AdaLomo, AdamW-in-backward, BAdam, GaLore (registered by name
at import).

Memory per trained parameter, besides the weights themselves (p = bytes per weight element, N parameters):

- AdamW: gradients N*p + two moments 2*N*4 (fp32 states).
- LOMO: no state; each gradient is applied and freed inside backward, so at most one parameter's gradient (plus
  autograd's in-flight buffers) exists at a time.
- adamw_backward: AdamW's two fp32 moments, but gradients freed as in LOMO (one parameter's at a time).
- AdaLomo: LOMO plus Adafactor's factored second moment: (rows + cols) * 4 bytes per matrix.
- BAdam: gradients and Adam moments for the active block only: N_block * (p + 8), N_block ~ N / n_layers.
- GaLore: full gradients N*p, Adam moments on the rank-r projection: 2 * 4 * r * max(m, n) per (m, n) matrix,
  plus its projection r * min(m, n).

`memory_bytes(name, shapes, ...)` evaluates these formulas (for the planner). LOMO and AdaLomo update during backward
(`updates_in_backward = True`): the loop then skips clipping and `optimizer.step()`; gradient clipping is skipped
(clip by value with `clip_value` instead), as the LOMO paper allows when a second backward pass is too costly.

Each optimizer's options are a section of `OptimSection` named after it (`optim.galore.rank`,
`optim.badam.switch_every`, `optim.lomo.clip_value`, ...; classes in `lmforge.train.config`).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from .config import AdaLomoOptions, BAdamOptions, GaLoreOptions, LomoOptions
from .optim import _fused_adamw_ok, param_groups, register_optimizer

__all__ = ["Lomo", "AdaLomo", "AdamWInBackward", "BAdam", "GaLore", "LomoOptions", "AdaLomoOptions", "BAdamOptions", "GaLoreOptions",
           "galore_projects", "memory_bytes"]


# --------------------------------------------------------------------------------------------------- LOMO family


class _FusedBackwardOptimizer(torch.optim.Optimizer):
    """Base of LOMO/AdaLomo: a post-accumulate-grad hook applies each parameter's update and frees its gradient."""

    updates_in_backward = True

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        # groups by index, not by object: load_state_dict replaces the group dicts (a resumed run's LR schedule
        # writes to the new ones)
        self._handles = [p.register_post_accumulate_grad_hook(lambda p, i=i: self._apply(p, self.param_groups[i]))
                         for i, group in enumerate(self.param_groups) for p in group["params"]]

    @torch.no_grad()
    def _apply(self, p: torch.Tensor, group: dict) -> None:
        if p.grad is None:
            return
        grad = p.grad
        if group.get("clip_value"):
            grad = grad.clamp(-group["clip_value"], group["clip_value"])
        self.update(p, grad, group)
        p.grad = None  # the point of LOMO: no gradient outlives its own update

    def update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """Apply any gradient the hooks did not consume (e.g. a caller that stepped explicitly)."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                self._apply(p, group)
        return loss

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class Lomo(_FusedBackwardOptimizer):
    """LOMO (Lv et al. 2023): SGD fused into backward, no optimizer state. ``p -= lr * (g + wd * p)``."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, clip_value: float | None = None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, clip_value=clip_value))

    def update(self, p, grad, group):
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(grad.to(p.dtype), alpha=-group["lr"])


class AdaLomo(_FusedBackwardOptimizer):
    """AdaLomo (Lv et al. 2023): LOMO with Adafactor's factored second moment and update normalisation.

    For a matrix gradient G (m, n): row/column EMAs r (m,), c (n,) of G^2 stand for V ~ r c^T / mean(r);
    ``U = G / sqrt(V)``, clipped to RMS(U) <= clip_threshold, and the step is ``lr * max(eps2, RMS(p)) * U`` (the
    update is relative to the parameter's scale). Vectors keep an unfactored EMA. Decay ``beta2_t = 1 - t^-0.8``.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, clip_value: float | None = None,
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, eps: tuple[float, float] = (1e-30, 1e-3)):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, clip_value=clip_value,
                                      clip_threshold=clip_threshold, decay_rate=decay_rate, eps=eps))

    @staticmethod
    def _rms(t: torch.Tensor) -> torch.Tensor:
        return t.norm(2) / math.sqrt(t.numel())

    def update(self, p, grad, group):
        state = self.state[p]
        g = grad.float()
        eps1, eps2 = group["eps"]
        factored = g.ndim >= 2
        if not state:
            state["step"] = 0
            if factored:
                state["row"] = g.new_zeros(g.shape[:-1])  # (m,)
                state["col"] = g.new_zeros(g.shape[:-2] + g.shape[-1:])  # (n,)
            else:
                state["v"] = torch.zeros_like(g)
        state["step"] += 1
        beta2 = 1.0 - state["step"] ** group["decay_rate"]
        sq = g.square() + eps1
        if factored:
            state["row"].mul_(beta2).add_(sq.mean(-1), alpha=1 - beta2)
            state["col"].mul_(beta2).add_(sq.mean(-2), alpha=1 - beta2)
            r = (state["row"] / state["row"].mean(-1, keepdim=True)).rsqrt_()  # (m,)
            u = g * r.unsqueeze(-1) * state["col"].rsqrt().unsqueeze(-2)
        else:
            state["v"].mul_(beta2).add_(sq, alpha=1 - beta2)
            u = g * state["v"].rsqrt()
        u.div_((self._rms(u) / group["clip_threshold"]).clamp_(min=1.0))
        lr = group["lr"] * max(eps2, float(self._rms(p.float())))
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        p.add_(u.to(p.dtype), alpha=-lr)


class AdamWInBackward(_FusedBackwardOptimizer):
    """AdamW applied to each parameter the moment its gradient is complete, then the gradient is freed (the fused
    optimizer-in-backward of torchtune): the same update as `torch.optim.AdamW`, but gradients never all exist at
    once, so full fine-tuning saves a whole gradient copy of the model (4 bytes/param with fp32 master weights).

    The price: no global gradient-norm clipping (each update happens before the other gradients exist) and no
    gradient accumulation; `optim.adamw_backward.clip_value` clips element-wise instead. Each parameter gets its own
    `torch.optim.AdamW` (fused kernel where available) whose state is this optimizer's `state[p]`, so checkpoints
    and the LR schedule work as for any optimizer.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 clip_value: float | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clip_value=clip_value))
        self._inner: dict[torch.Tensor, torch.optim.AdamW] = {}

    def update(self, p, grad, group):
        inner = self._inner.get(p)
        if inner is None:
            fused = p.is_cuda and _fused_adamw_ok([p])
            inner = torch.optim.AdamW([p], lr=group["lr"], betas=group["betas"], eps=group["eps"],
                                      weight_decay=group["weight_decay"], fused=fused or None)
            inner.state[p] = self.state[p]  # one state dict: what checkpoints save and load
            self._inner[p] = inner
        # a CUDA graph capture hands in a device-tensor lr and capturable=True (see lmforge.train.graphs)
        inner.param_groups[0].update(lr=group["lr"], weight_decay=group["weight_decay"],
                                     capturable=group.get("capturable", False))
        if grad is not p.grad:  # clipped by value
            p.grad = grad
        inner.step()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for p, inner in self._inner.items():  # loaded states replace the dicts the inner optimizers hold
            inner.state[p] = self.state[p]


# -------------------------------------------------------------------------------------------------------- BAdam


def _adamw_update(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """One AdamW step on p in place (fp32 moments; bias-corrected)."""
    beta1, beta2 = group["betas"]
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)
    state["step"] += 1
    g = grad.float()
    state["exp_avg"].lerp_(g, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
    c1, c2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
    update = (state["exp_avg"] / c1) / ((state["exp_avg_sq"] / c2).sqrt_().add_(group["eps"]))
    if group["weight_decay"]:
        p.mul_(1 - group["lr"] * group["weight_decay"])
    p.add_(update.to(p.dtype), alpha=-group["lr"])


class BAdam(torch.optim.Optimizer):
    """BAdam (Luo et al. 2024): block coordinate descent with Adam. The blocks are the transformer layers; one is
    trainable at a time (the rest have requires_grad=False, so they get no gradients), the active block switches every
    `switch_every` steps (ascending, descending or random order per sweep) and its Adam state is dropped when it does.
    Parameters outside the blocks (embeddings, final norm, head) stay frozen, as in the paper's default."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], lr: float, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay: float = 0.0, switch_every: int = 50, order: str = "ascending", seed: int = 0):
        blocks: dict[int, list[nn.Parameter]] = {}
        self.frozen = []
        for name, p in named_params:
            parts = name.split(".")
            if "layers" in parts and parts.index("layers") + 1 < len(parts):
                blocks.setdefault(int(parts[parts.index("layers") + 1]), []).append(p)
            else:
                self.frozen.append(p)
        if not blocks:
            raise ConfigError("optimizer badam found no transformer blocks ('layers.N.' parameters) to train")
        self.blocks = [blocks[i] for i in sorted(blocks)]
        self.switch_every, self.order_kind = switch_every, order
        self._rng = torch.Generator().manual_seed(seed)
        groups = param_groups(named_params, weight_decay)
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.steps, self.sweep, self.position = 0, [], 0
        self._new_sweep()
        self._activate(self.sweep[0])

    def _new_sweep(self) -> None:
        n = len(self.blocks)
        if self.order_kind == "random":
            self.sweep = torch.randperm(n, generator=self._rng).tolist()
        else:
            self.sweep = list(range(n)) if self.order_kind == "ascending" else list(range(n - 1, -1, -1))
        self.position = 0

    @property
    def active(self) -> int:
        return self.sweep[self.position]

    def _activate(self, index: int) -> None:
        for p in self.frozen:
            p.requires_grad_(False)
        for i, block in enumerate(self.blocks):
            for p in block:
                p.requires_grad_(i == index)
                if i != index:
                    p.grad = None
                    self.state.pop(p, None)  # Adam state lives only for the active block

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        active = {id(p) for p in self.blocks[self.active]}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) in active:
                    _adamw_update(p, p.grad, self.state[p], group)
        self.steps += 1
        if self.steps % self.switch_every == 0:
            self.position += 1
            if self.position == len(self.sweep):
                self._new_sweep()
            self._activate(self.active)
        return loss

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["badam"] = {"steps": self.steps, "sweep": self.sweep, "position": self.position,
                        "rng": self._rng.get_state()}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("badam")
        self.steps, self.sweep, self.position = extra["steps"], extra["sweep"], extra["position"]
        self._rng.set_state(extra["rng"])
        self._activate(self.active)
        super().load_state_dict(state_dict)


# ------------------------------------------------------------------------------------------------------- GaLore


def galore_projects(name: str, shape: tuple[int, ...], rank: int, min_dim: int = 0) -> bool:
    """Whether GaLore projects this parameter: a block matrix ('layers.N.' in its name) whose shorter side exceeds
    `rank` and is at least `min_dim`; everything else (vectors, embeddings, the head) gets plain AdamW."""
    return len(shape) == 2 and ".layers." in f".{name}" and min(shape) > rank and min(shape) >= min_dim


class GaLore(torch.optim.Optimizer):
    """GaLore (Zhao et al. 2024): Adam on low-rank projections of matrix gradients.

    For a projected (m, n) weight, every `update_proj_gap` steps the gradient's top-r singular vectors on its shorter
    side become the projection P; Adam runs on the projected gradient R (r x n, or m x r) and the normalised update
    is projected back and scaled: ``W -= lr * scale * P N``. Other parameters (vectors, embeddings, the head) get
    plain AdamW."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], lr: float, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                 min_dim: int = 0):
        projected = [(n, p) for n, p in named_params if galore_projects(n, p.shape, rank, min_dim)]
        ids = {id(p) for _, p in projected}
        rest = [(n, p) for n, p in named_params if id(p) not in ids]
        groups = [{"params": [p for _, p in projected], "weight_decay": weight_decay, "galore": True}]
        groups = [g for g in groups if g["params"]] + [{**g, "galore": False} for g in param_groups(rest, weight_decay)]
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                                      update_proj_gap=update_proj_gap, scale=scale))
        self.projected = [n for n, _ in projected]  # names of the projected matrices (what the rank applies to)

    @staticmethod
    def _projection(grad: torch.Tensor, rank: int) -> torch.Tensor:
        """(m, r) left singular vectors if m <= n, else (n, r) right ones: the shorter side is projected."""
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
        return u[:, :rank].contiguous() if grad.shape[0] <= grad.shape[1] else vh[:rank].T.contiguous()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not group["galore"]:
                    _adamw_update(p, p.grad, state, group)
                    continue
                g = p.grad.float()
                left = g.shape[0] <= g.shape[1]
                step = state.get("galore_step", 0)
                if step % group["update_proj_gap"] == 0:
                    state["proj"] = self._projection(g, group["rank"])
                state["galore_step"] = step + 1
                proj = state["proj"]
                low = proj.T @ g if left else g @ proj  # (r, n) or (m, r)
                step_low = torch.zeros_like(low)  # AdamW on the projection: it leaves -N (the normalised step) here
                _adamw_update(step_low, low, state.setdefault("adam", {}), {**group, "lr": 1.0, "weight_decay": 0.0})
                update = proj @ step_low if left else step_low @ proj.T  # back to (m, n): -N projected back
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=group["lr"] * group["scale"])
        return loss


# ------------------------------------------------------------------------------------------ options and registry


def _options(cfg, name: str):
    """The optimizer's option section (optim.<name>), or its defaults when `cfg` is an OptimSection without one."""
    from .config import OptimSection

    return getattr(cfg, name, None) or OptimSection.model_fields[name].default


def _lomo(named_params, cfg, model):
    o = _options(cfg, "lomo")
    return Lomo(param_groups(named_params, cfg.weight_decay), lr=cfg.lr, clip_value=o.clip_value)


def _adalomo(named_params, cfg, model):
    o = _options(cfg, "adalomo")
    return AdaLomo(param_groups(named_params, cfg.weight_decay), lr=cfg.lr, clip_value=o.clip_value,
                   clip_threshold=o.clip_threshold, decay_rate=o.decay_rate)


def _adamw_backward(named_params, cfg, model):
    o = _options(cfg, "adamw_backward")
    return AdamWInBackward(param_groups(named_params, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                           clip_value=o.clip_value)


def _badam(named_params, cfg, model):
    o = _options(cfg, "badam")
    return BAdam(named_params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                 switch_every=o.switch_every, order=o.order)


def _galore(named_params, cfg, model):
    o = _options(cfg, "galore")
    return GaLore(named_params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, rank=o.rank,
                  update_proj_gap=o.update_proj_gap, scale=o.scale, min_dim=o.min_dim)


for _name, _builder in (("lomo", _lomo), ("adalomo", _adalomo), ("adamw_backward", _adamw_backward),
                        ("badam", _badam), ("galore", _galore)):
    register_optimizer(_name, _builder)


def memory_bytes(name: str, shapes: list[tuple[int, ...]], grad_bytes: int = 4, n_blocks: int = 1,
                 rank: int = 128) -> int:
    """Optimizer-side bytes (gradients that persist to the step + optimizer state) for weights of `shapes`: the
    formulas of the module docstring. `n_blocks` is BAdam's block count (layers); `rank` GaLore's."""
    numel = [math.prod(s) for s in shapes]
    if name == "adamw":
        return sum(n * (grad_bytes + 8) for n in numel)
    if name == "lomo":
        return max(numel, default=0) * grad_bytes
    if name == "adamw_backward":
        return max(numel, default=0) * grad_bytes + sum(8 * n for n in numel)
    if name == "adalomo":
        return max(numel, default=0) * grad_bytes + sum(4 * (sum(s) if len(s) == 2 else math.prod(s)) for s in shapes)
    if name == "badam":
        return math.ceil(sum(numel) / max(n_blocks, 1)) * (grad_bytes + 8)
    if name == "galore":
        total = 0
        for s, n in zip(shapes, numel):
            if len(s) == 2 and min(s) > rank:
                total += n * grad_bytes + 8 * rank * max(s) + 4 * rank * min(s)
            else:
                total += n * (grad_bytes + 8)
        return total
    raise ConfigError(f"no memory formula for optimizer '{name}'")
