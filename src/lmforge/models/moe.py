"""Mixture-of-experts feed-forward: a router over gated experts, plus an optional shared expert.

Two routers, chosen by `moe_router`: `SoftmaxRouter` (softmax over all experts, top-k, optionally renormalized:
Mixtral, Qwen, GPT-OSS) and `SigmoidRouter` (independent sigmoid scores; a selection-only bias; group-limited top-k;
renormalized and scaled: DeepSeek-V3, GLM-4.5; Llama 4 is its one-group, top-1 case).

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
best) and optionally the ST-MoE router z-loss ``mean(logsumexp(logits)^2)``. For a sigmoid router P_e is the
normalized score s_e / sum(s) and f_e counts the experts actually chosen (after groups and bias), as in DeepSeek-V3's
sequence-wise balance loss (computed here over the whole batch).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

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


class Routing(NamedTuple):
    """A router's decision for N tokens over E experts."""

    logits: torch.Tensor  # (N, E) raw router outputs (the z-loss reads them)
    probs: torch.Tensor  # (N, E) fp32 probabilities the balance loss reads (softmax, or normalized sigmoid scores)
    weights: torch.Tensor  # (N, k) fp32 mixing weights of the chosen experts
    experts: torch.Tensor  # (N, k) chosen expert indices


class SoftmaxRouter(RouterLinear):
    """Softmax over all E experts in fp32, then the top k; renormalized to sum to 1 when `moe_norm_topk` (which
    equals GPT-OSS's softmax over the top-k logits). An optional bias on the logits (GPT-OSS)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.d_model, cfg.moe_experts)
        self.top_k, self.norm_topk, self.scale = cfg.moe_top_k, cfg.moe_norm_topk, cfg.moe_routed_scale
        self.bias = nn.Parameter(torch.zeros(cfg.moe_experts)) if cfg.moe_router_bias else None

    def forward(self, x: torch.Tensor) -> Routing:  # x: (N, d)
        logits = F.linear(x, self.weight, self.bias)
        probs = logits.float().softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return Routing(logits, probs, weights * self.scale if self.scale != 1 else weights, experts)


class SigmoidRouter(RouterLinear):
    """DeepSeek-V3's router: scores s = sigmoid(x . w_e) per expert, independently.

    Selection: add the per-expert `score_bias` (DeepSeek's e_score_correction_bias, tuned during pretraining to
    balance load without a loss), keep the `moe_topk_groups` groups whose best two biased scores sum highest, and
    take the top k experts inside them. Weights: the *unbiased* scores of the chosen experts, renormalized to sum to
    1 when `moe_norm_topk`, times `moe_routed_scale`. Llama 4 is the one-group, top-1, unnormalized case.

    The weight and the bias stay fp32 whatever the model dtype (the selection compares scores that differ in the
    third decimal; transformers keeps them fp32 too).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.d_model, cfg.moe_experts)
        self.top_k, self.norm_topk, self.scale = cfg.moe_top_k, cfg.moe_norm_topk, cfg.moe_routed_scale
        self.groups, self.topk_groups = cfg.moe_groups, cfg.moe_topk_groups
        self.bias = nn.Parameter(torch.zeros(cfg.moe_experts)) if cfg.moe_router_bias else None
        score_bias = torch.zeros(cfg.moe_experts) if cfg.moe_score_bias else None
        self.register_buffer("score_bias", score_bias)  # persistent: it is part of the checkpoint

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        with torch.no_grad():
            for p in (self.weight, self.bias):
                if p is not None and p.dtype != torch.float32 and p.device.type != "meta":
                    p.data = p.data.float()
            if self.score_bias is not None and self.score_bias.dtype != torch.float32:
                self.score_bias = self.score_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> Routing:  # x: (N, d)
        bias = None if self.bias is None else self.bias.float()
        logits = F.linear(x.float(), self.weight.float(), bias)  # (N, E) fp32
        scores = logits.sigmoid()
        choice = scores if self.score_bias is None else scores + self.score_bias
        if self.groups > 1:  # keep the best topk_groups groups (each scored by its best two experts)
            N, E = choice.shape
            grouped = choice.view(N, self.groups, E // self.groups)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_groups, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)
        experts = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, experts)
        if self.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        probs = scores / scores.sum(-1, keepdim=True)
        return Routing(logits, probs, weights * self.scale, experts)


def make_router(cfg: ModelConfig) -> nn.Module:
    return SigmoidRouter(cfg) if cfg.moe_router == "sigmoid" else SoftmaxRouter(cfg)


class MoE(nn.Module):
    """Routed experts (+ shared expert). Input/output (B, T, d_model). In training mode the routing of the last
    call is kept in `routing` (a `Routing` over N tokens) for the auxiliary losses the Transformer computes."""

    def __init__(self, cfg: ModelConfig, prefix: str, linear: Callable, mlp_cls: type[nn.Module]):
        super().__init__()
        self.scale_input = cfg.moe_scale_input
        self.dispatch_mode = "auto"  # "auto" | "sorted" | "dense" (tests force one; auto picks by compile state)
        self.router = make_router(cfg)
        self.experts = nn.ModuleList(mlp_cls(cfg, f"{prefix}.experts.{j}", linear, d_ff=cfg.expert_d_ff, gated=True,
                                             bias=cfg.moe_expert_bias)
                                     for j in range(cfg.moe_experts))
        self.shared_expert = (mlp_cls(cfg, f"{prefix}.shared_expert", linear, d_ff=cfg.moe_shared_d_ff, gated=True)
                              if cfg.moe_shared_d_ff else None)
        self.shared_expert_gate = RouterLinear(cfg.d_model, 1) if cfg.moe_shared_gate else None
        self.routing: Routing | None = None
        self.expert_counts: torch.Tensor | None = None  # (E,) assignments per expert in the last call (detached)

    @property
    def router_logits(self) -> torch.Tensor | None:
        return None if self.routing is None else self.routing.logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d)
        routing = self.router(x)
        experts = routing.experts
        y = self.dispatch(x, routing.weights, experts)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            y = y + (torch.sigmoid(self.shared_expert_gate(x)) * shared if self.shared_expert_gate is not None
                     else shared)
        if not _static(x):  # bookkeeping (a host sync) stays out of compiled / captured decode graphs
            self.routing = routing if self.training else None
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
        if self.scale_input:  # Llama 4: the expert sees weight * x
            gathered = gathered * weights.flatten()[order, None].to(x.dtype)
        outs = [expert(chunk) for expert, chunk, n in zip(self.experts, gathered.split(counts), counts) if n]
        out_sorted = torch.cat(outs)  # (N*k, d)
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted  # back to (token, slot) order
        if self.scale_input:
            return out.view(N, k, -1).sum(1)
        return (out.view(N, k, -1) * weights.unsqueeze(-1).to(out.dtype)).sum(1)

    def _dense(self, x, weights, experts) -> torch.Tensor:
        combine = torch.zeros(x.shape[0], len(self.experts), device=x.device, dtype=weights.dtype)
        combine.scatter_(1, experts, weights)  # (N, E): routing weight, 0 for experts a token does not use
        y = torch.zeros_like(x)
        for j, expert in enumerate(self.experts):
            w = combine[:, j:j + 1].to(x.dtype)
            y = y + (expert(x * w) * (w != 0) if self.scale_input else expert(x) * w)
        return y


def _static(x: torch.Tensor) -> bool:
    """True while tracing for torch.compile or capturing a CUDA graph: no host syncs, no data-dependent shapes."""
    return torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def load_balancing_loss(logits: torch.Tensor, top_k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss of one layer: E * sum_e f_e * P_e over the valid tokens.

    logits (N, E); valid (N,) bool or None. f_e counts top-k assignments per token (sums to k), P_e is the mean
    softmax probability, so perfectly balanced routing gives k and collapse onto one expert gives up to E * k.
    """
    probs = logits.float().softmax(-1)  # (N, E)
    return balance_loss(probs, probs.topk(top_k, dim=-1).indices, valid)


def balance_loss(probs: torch.Tensor, experts: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e f_e * P_e for router probabilities (N, E) and the chosen experts (N, k) of N tokens."""
    E = probs.shape[-1]
    chosen = F.one_hot(experts, E).sum(1).float()  # (N, E) 1 where assigned
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
        if layer.routing is None:
            continue
        r = layer.routing
        loss = balance_loss(r.probs, r.experts, flat_valid)
        if cfg.moe_z_loss_weight:
            loss = loss + cfg.moe_z_loss_weight * router_z_loss(r.logits, flat_valid)
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
