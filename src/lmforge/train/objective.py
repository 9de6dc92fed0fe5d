"""What a training stage computes. The loop is the same for every stage; a stage differs only in how it forms
micro-batches, what it normalises by, and its loss (DESIGN.md §3).

An objective's `loss_sum` returns a *sum* over its units (target tokens, preference pairs, PPO tokens) plus metric
sums; the loop divides by the step's `normalizer`, so gradient accumulation never changes the result.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..data import collate
from .loss import causal_lm_loss_sum

if TYPE_CHECKING:
    from .context import StepContext


class Objective:
    """Base stage: batches are collated rows drawn by the trainer's sampler. Every hook gets the run's
    `StepContext` (model, data, precision, device, settings), not the trainer."""

    unit = "target_tokens"  # what `normalizer` counts (logged)

    def setup(self, ctx: StepContext) -> None:
        """Called once the trainer is built (e.g. to precompute reference log-probs)."""

    def micro_batches(self, ctx: StepContext) -> list[dict]:
        return [self.collate(ctx.next_rows(), ctx) for _ in range(ctx.t.grad_accum)]

    def collate(self, rows: list[dict], ctx: StepContext) -> dict:
        return collate(rows, ctx.pad_id, ctx.pad_multiple)

    def normalizer(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum())

    def tokens(self, batch: dict) -> int:
        return int((batch["positions"] >= 0).sum())

    def loss_sum(self, ctx: StepContext, batch: dict, step_units: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def step_metrics(self) -> dict[str, float]:
        """Figures of the step just taken that are no sums over its units (e.g. an RL rollout's reward spread and
        timing); logged as they are, after the loop's own."""
        return {}


class LanguageModeling(Objective):
    """Pretraining and SFT: cross-entropy on pre-shifted labels, plus the model's auxiliary loss if it has one."""

    def loss_sum(self, ctx, batch, step_units):
        model = ctx.model
        hidden = model.hidden_states(batch["tokens"], batch["positions"], document_ids=batch.get("document_ids"),
                                     plain=batch.get("plain_causal"))
        loss = causal_lm_loss_sum(model.logits, hidden, batch["labels"], head_weight=model.head_weight(),
                                  fixed_shapes=ctx.fixed_shapes)
        aux = getattr(model, "aux_loss", None)
        if aux is not None and model.training and ctx.t.aux_loss_coef and step_units:
            # the aux loss is a per-batch mean: give it the same per-unit weight as the token loss
            loss = loss + ctx.t.aux_loss_coef * aux * step_units / ctx.t.grad_accum
        return loss, {}
