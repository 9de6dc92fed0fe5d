"""PRILoRA (Benedek & Wolf 2024): pruned and rank-increasing LoRA.

Two changes to LoRA:

1. **Rank grows linearly with depth**: block i of L gets ``r_i = round(r_start + (r_end - r_start) * i / (L - 1))``
   (4 -> 12 in the paper), on the view that upper layers need more adaptation.
2. **A is pruned throughout training**: every ``prune_every`` optimizer steps, in each row of every A matrix, the
   ``prune_ratio`` fraction of entries with the lowest importance ``S_ij = |A_ij| * ||X_j||`` is set to zero.
   ``||X_j||`` is the norm of input feature j, accumulated over training as an exponential moving average of its mean
   square (the layer's input statistics, as in Wanda) rather than taken from one batch. Pruned entries may regrow;
   each pruning judges the current weights ("the temporary magnitude").

The artifact is a plain PEFT LoRA adapter with a ``rank_pattern`` (the per-layer ranks), so peft loads it as is.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import Field, PrivateAttr, model_validator
from torch import nn

from .common import layer_index
from .hooks import StepHooks
from .lora import ALL_LINEAR, LoraConfig, apply_lora, linear_modules, lora_layers, lora_state_dict, select_targets
from .methods import LoraMethod, register_method

__all__ = ["PriLoraMethod", "depth_ranks", "prune_rows"]


def depth_ranks(n_layers: int, r_start: int, r_end: int) -> list[int]:
    """Rank per block, linear in depth from r_start (block 0) to r_end (last block)."""
    if n_layers == 1:
        return [r_end]
    return [round(r_start + (r_end - r_start) * i / (n_layers - 1)) for i in range(n_layers)]


@torch.no_grad()
def prune_rows(a: torch.Tensor, input_norm: torch.Tensor, ratio: float) -> None:
    """Zero, in place, the `ratio` least important entries of each row of A (r, in); importance |A| * input_norm."""
    k = math.floor(ratio * a.shape[1])
    if k == 0:
        return
    score = a.abs() * input_norm[None, :].to(a.dtype)  # (r, in)
    drop = score.topk(k, dim=1, largest=False).indices
    a.scatter_(1, drop, 0.0)


@register_method
class PriLoraMethod(LoraMethod):
    """LoRA with depth-increasing ranks and periodic importance pruning of A; artifacts are PEFT LoRA adapters."""

    name: ClassVar[str] = "prilora"
    trains: ClassVar[str] = "LoRA B A with rank rising with depth; A pruned every N steps"
    artifact: ClassVar[str] = "PEFT adapter (LORA, rank_pattern)"
    derived: ClassVar[tuple[str, ...]] = ("r", "rank_pattern")  # from r_start, r_end and the depth

    target_modules: list[str] | str = ALL_LINEAR
    """Linears to wrap, as lora.target_modules; default every attention and MLP linear (not lm_head)."""
    r_start: int = Field(4, ge=1)
    """Rank of the first block."""
    r_end: int = Field(12, ge=1)
    """Rank of the last block."""
    prune_every: int = Field(100, ge=1)
    """Prune A every this many optimizer steps."""
    prune_ratio: float = Field(0.5, ge=0, lt=1)
    """Fraction of each row of A set to zero at each pruning."""
    stats_beta: float = Field(0.99, ge=0, lt=1)
    """EMA decay of each input feature's mean square (the accumulated input statistics)."""
    _hooks: object = PrivateAttr(None)  # StepHooks: per-step callbacks on the model it was applied to

    @model_validator(mode="after")
    def _ranks(self):
        if self.r_end < self.r_start:
            raise ValueError("prilora r_end must be >= r_start (ranks grow with depth)")
        return self

    def lora_config(self, model: nn.Module) -> LoraConfig:
        """The plain LoRA this amounts to on `model`: r = r_end and a rank_pattern with each target's depth rank."""
        ranks = depth_ranks(model.cfg.n_layers, self.r_start, self.r_end)
        targets = select_targets(list(linear_modules(model)), self.target_modules)
        pattern = {p: ranks[layer_index(p)] for p in targets if layer_index(p) is not None}
        fields = LoraConfig.model_fields.keys()
        return LoraConfig(**{**{k: v for k, v in self.model_dump().items() if k in fields},
                             "r": self.r_end, "rank_pattern": {p: r for p, r in pattern.items() if r != self.r_end}})

    def apply(self, model: nn.Module) -> None:
        cfg = self.lora_config(model)
        self.rank_pattern = cfg.rank_pattern
        self.r = cfg.r
        apply_lora(model, cfg)
        layers = lora_layers(model)
        for layer in layers.values():
            layer.register_buffer("input_sq", torch.zeros(layer.in_features, device=layer.lora_A.weight.device))
            layer.register_forward_pre_hook(self._record_input)
        params = [l.lora_A.weight for l in layers.values()] + [l.lora_B.weight for l in layers.values()]
        self._hooks = StepHooks(model, params, on_step=lambda step: self._after_step(model, step))

    def _record_input(self, layer: nn.Module, args) -> None:
        if layer.training and torch.is_grad_enabled():
            x = args[0].detach()
            mean_sq = x.float().pow(2).reshape(-1, x.shape[-1]).mean(0)  # (in,)
            layer.input_sq.mul_(self.stats_beta).add_(mean_sq, alpha=1 - self.stats_beta)

    def on_step(self, model: nn.Module, step: int) -> None:
        if self._hooks is not None:
            self._hooks.step_done(step)

    def _after_step(self, model: nn.Module, step: int) -> None:
        if step % self.prune_every == 0:
            self.prune(model)

    @torch.no_grad()
    def prune(self, model: nn.Module) -> None:
        """One pruning of every A by the importance rule (also callable by hand)."""
        for layer in lora_layers(model).values():
            prune_rows(layer.lora_A.weight, layer.input_sq.sqrt(), self.prune_ratio)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = lora_state_dict(model, self)
        out.update({f"{p}.input_sq": l.input_sq for p, l in lora_layers(model).items() if hasattr(l, "input_sq")})
        return out

    def save(self, model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
        from .peft_format import save_peft_adapter

        return save_peft_adapter(model, self.lora_config(model), out_dir, base_model_name_or_path)
