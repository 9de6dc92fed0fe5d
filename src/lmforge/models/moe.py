"""Mixture-of-experts feed-forward: a top-k softmax router over gated experts, plus an optional shared expert.

Dispatch is capacity-free (no token is dropped): the (token, expert) assignments are sorted by expert so every expert
runs once on one contiguous slice of gathered tokens, and the results are scattered back and mixed with the routing
weights. The Python loop is over experts, never over tokens. Under `torch.compile` or a CUDA-graph capture (the
static decode step) the slice sizes would need a host sync, so there every expert runs on all tokens and the weights
zero out the rest (same result; reads every expert's weights, which a batched decode step does anyway).

Each expert is an ordinary gated MLP whose linears come from the model's linear factory, named
``layers.{i}.mlp.experts.{j}.gate_proj`` etc., so LoRA/QLoRA/quantized factories target experts by name like any
other linear. The router is deliberately *not* a factory linear (it stays full precision and outside ``all-linear``,
as in PEFT). Expert parallelism would slot in at `MoE.dispatch`: an all-to-all of the sorted slices to the ranks
owning each expert and back (see docs/models.md); it is out of scope here.

Auxiliary losses (`moe_aux_loss`): the Switch/Mixtral load-balancing loss ``E * sum_e f_e * P_e`` (f_e: fraction of
top-k assignments that go to expert e, P_e: mean router probability of e; 1 per routed slot when balanced, so k at
best) and optionally the ST-MoE router z-loss ``mean(logsumexp(logits)^2)``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class RouterLinear(nn.Module):
    """x @ weight.T without bias. A plain weight holder on purpose: it has no `in_features`, so LoRA's
    `all-linear`, quantized factories and PEFT leave router and shared-expert gate weights alone."""

    def __init__(self, in_features: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class MoE(nn.Module):
    """Routed experts (+ shared expert). Input/output (B, T, d_model). In training mode the router logits of the
    last call are kept in `router_logits` (N, E) for the auxiliary losses the Transformer computes."""

    def __init__(self, cfg: ModelConfig, prefix: str, linear: Callable, mlp_cls: type[nn.Module]):
        super().__init__()
        self.top_k, self.norm_topk = cfg.moe_top_k, cfg.moe_norm_topk
        self.dispatch_mode = "auto"  # "auto" | "sorted" | "dense" (tests force one; auto picks by compile state)
        self.router = RouterLinear(cfg.d_model, cfg.moe_experts)
        self.experts = nn.ModuleList(mlp_cls(cfg, f"{prefix}.experts.{j}", linear, d_ff=cfg.expert_d_ff, gated=True)
                                     for j in range(cfg.moe_experts))
        self.shared_expert = (mlp_cls(cfg, f"{prefix}.shared_expert", linear, d_ff=cfg.moe_shared_d_ff, gated=True)
                              if cfg.moe_shared_d_ff else None)
        self.shared_expert_gate = RouterLinear(cfg.d_model, 1) if cfg.moe_shared_gate else None
        self.router_logits: torch.Tensor | None = None
        self.expert_counts: torch.Tensor | None = None  # (E,) assignments per expert in the last call (detached)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (N, E), top-k weights (N, k) in fp32 and expert indices (N, k) for tokens x (N, d)."""
        logits = self.router(x)
        probs = logits.float().softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d)
        logits, weights, experts = self.route(x)
        y = self.dispatch(x, weights, experts)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            y = y + (torch.sigmoid(self.shared_expert_gate(x)) * shared if self.shared_expert_gate is not None
                     else shared)
        if not _static(x):  # bookkeeping (a host sync) stays out of compiled / captured decode graphs
            self.router_logits = logits if self.training else None
            self.expert_counts = torch.bincount(experts.flatten(), minlength=len(self.experts)).detach()
        return y.view(shape)

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """sum_k weights[n, k] * expert_{experts[n, k]}(x[n]) for every token n: (N, d)."""
        mode = self.dispatch_mode
        if mode == "dense" or (mode == "auto" and _static(x)):
            return self._dense(x, weights, experts)
        return self._sorted(x, weights, experts)

    def _sorted(self, x, weights, experts) -> torch.Tensor:
        N, k = experts.shape
        flat = experts.flatten()  # (N*k,) expert of each assignment
        order = flat.argsort(stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()  # one host sync per layer
        gathered = x[order // k]  # (N*k, d): each assignment's token, expert-contiguous
        outs = [expert(chunk) for expert, chunk, n in zip(self.experts, gathered.split(counts), counts) if n]
        out_sorted = torch.cat(outs)  # (N*k, d)
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted  # back to (token, slot) order
        return (out.view(N, k, -1) * weights.unsqueeze(-1).to(out.dtype)).sum(1)

    def _dense(self, x, weights, experts) -> torch.Tensor:
        combine = torch.zeros(x.shape[0], len(self.experts), device=x.device, dtype=weights.dtype)
        combine.scatter_(1, experts, weights)  # (N, E): routing weight, 0 for experts a token does not use
        y = torch.zeros_like(x)
        for j, expert in enumerate(self.experts):
            y = y + expert(x) * combine[:, j:j + 1].to(x.dtype)
        return y


def _static(x: torch.Tensor) -> bool:
    """True while tracing for torch.compile or capturing a CUDA graph: no host syncs, no data-dependent shapes."""
    return torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def load_balancing_loss(logits: torch.Tensor, top_k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss of one layer: E * sum_e f_e * P_e over the valid tokens.

    logits (N, E); valid (N,) bool or None. f_e counts top-k assignments per token (sums to k), P_e is the mean
    softmax probability, so perfectly balanced routing gives k and collapse onto one expert gives up to E * k.
    """
    E = logits.shape[-1]
    probs = logits.float().softmax(-1)  # (N, E)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, E).sum(1).float()  # (N, E) 1 where assigned
    w = torch.ones(probs.shape[0], device=probs.device) if valid is None else valid.float()
    n = w.sum().clamp(min=1)
    f = (chosen * w[:, None]).sum(0) / n
    p = (probs * w[:, None]).sum(0) / n
    return E * (f * p).sum()


def router_z_loss(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over valid tokens of logsumexp(logits)^2 (keeps router logits small and stable)."""
    z = logits.float().logsumexp(-1).pow(2)
    if valid is None:
        return z.mean()
    return (z * valid).sum() / valid.sum().clamp(min=1)


def moe_aux_loss(moe_layers: list[MoE], cfg: ModelConfig, valid: torch.Tensor | None) -> torch.Tensor | None:
    """Mean over MoE layers of load-balancing loss + moe_z_loss_weight * z-loss, for the last training forward.
    `valid` (B, T) marks real tokens (padding excluded). None when no layer recorded router logits."""
    losses = []
    flat_valid = None if valid is None else valid.reshape(-1)
    for layer in moe_layers:
        if layer.router_logits is None:
            continue
        loss = load_balancing_loss(layer.router_logits, cfg.moe_top_k, flat_valid)
        if cfg.moe_z_loss_weight:
            loss = loss + cfg.moe_z_loss_weight * router_z_loss(layer.router_logits, flat_valid)
        losses.append(loss)
    return torch.stack(losses).mean() if losses else None


def routing_stats(model: nn.Module) -> dict:
    """Expert usage in the last forward: per MoE layer the fraction of assignments per expert and the normalised
    entropy of that distribution (1 = perfectly even use, 0 = one expert takes everything)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE) and module.expert_counts is not None:
            frac = module.expert_counts.float() / module.expert_counts.sum().clamp(min=1)
            entropy = -(frac * frac.clamp(min=1e-12).log()).sum() / torch.log(torch.tensor(float(len(frac))))
            out[name] = {"load": frac.tolist(), "entropy": float(entropy)}
    return out
