"""DPO and its variants (IPO, SimPO) as an objective of the one training loop.

DPO (Rafailov et al. 2023) trains the policy directly on pairs: with implicit rewards r = beta * (log pi(y|x) - log
pi_ref(y|x)), the loss is -log sigmoid(r_chosen - r_rejected). The reference pi_ref is the starting policy, and no
second model is held for it:

- LoRA: the same model with its LoRA layers bypassed (`adapters_disabled`), one extra no-grad forward per step;
- full fine-tuning (or any other method): the reference log-probs are computed once, before the first step, and
  stored with the data (`PreferenceDataset.set_reference`), so the reference costs one pass over the data in total.

IPO replaces the log-sigmoid with a squared distance of the (length-averaged) log-ratio margin from 1/(2 beta);
SimPO drops the reference and uses length-averaged log-probs with a target margin gamma.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.encode import IGNORE
from ..errors import ConfigError
from .common import PairObjective, adapters_disabled, can_disable_adapters, token_logps
from .config import DPOSection
from .data import collate_pairs

__all__ = ["DPOObjective", "logp_margin", "reference_logps", "sequence_logps"]


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's labelled tokens (the reply) and their count: two (rows,) tensors."""
    hidden = model.hidden_states(batch["tokens"], batch["positions"])  # (2B, T, d)
    logp, _ = token_logps(model.logits, hidden, batch["labels"])  # (2B, T)
    return logp.sum(-1), (batch["labels"] != IGNORE).sum(-1)


@torch.no_grad()
def reference_logps(ctx, dataset) -> torch.Tensor:
    """(N, 2) summed log-probs of (chosen, rejected) under the model as it is now, in the trainer's precision."""
    model, bs = ctx.model, ctx.t.micro_batch_size
    was_training = model.training
    model.eval()
    out = []
    starts = range(0, len(dataset), bs)
    for start in tqdm(starts, desc="reference log-probs", disable=not ctx.t.progress, leave=False):
        rows = [dataset.rows[i] for i in range(start, min(start + bs, len(dataset)))]
        batch = {k: v.to(ctx.device) for k, v in collate_pairs(rows, ctx.pad_id).items()}
        with ctx.autocast():
            logp, _ = sequence_logps(model, batch)
        out.append(torch.stack(logp.float().chunk(2), dim=-1).cpu())  # (B, 2)
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def logp_margin(model, dataset, pad_id: int, batch_size: int = 32) -> float:
    """Mean over pairs of log pi(chosen) - log pi(rejected) (summed over reply tokens): what DPO raises."""
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    total = 0.0
    for start in range(0, len(dataset), batch_size):
        rows = [dataset.rows[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collate_pairs(rows, pad_id).items()}
        chosen, rejected = sequence_logps(model, batch)[0].chunk(2)
        total += float((chosen - rejected).sum())
    model.train(was_training)
    return total / max(len(dataset), 1)


class DPOObjective(PairObjective):
    """DPO / IPO / SimPO on pairs. Logs reward accuracy, margin and chosen/rejected implicit rewards, plus the
    policy's summed log-probs of chosen and rejected replies."""

    def __init__(self, cfg: DPOSection | None = None):
        self.cfg = cfg or DPOSection()
        self.reference: str | None = None  # "adapters_off" | "precomputed" | None (SimPO)

    stage = "dpo"  # the config section whose `reference` option this objective reads (KTO reuses the logic)

    def setup(self, ctx) -> None:
        if getattr(self.cfg, "loss", None) == "simpo":
            return
        can_bypass = can_disable_adapters(ctx.model)
        mode = self.cfg.reference
        if mode == "auto":
            mode = "adapters_off" if can_bypass else "precomputed"
        if mode == "adapters_off" and not can_bypass:
            raise ConfigError(f"{self.stage}.reference=adapters_off needs a LoRA run whose trained weights all sit in "
                              f"its LoRA layers (no lora.modules_to_save); use {self.stage}.reference=precomputed")
        self.reference = mode
        if mode == "precomputed":
            for data in (ctx.train_data, ctx.val_data):
                if data is not None and len(data) and data.ref_logps is None:
                    data.set_reference(reference_logps(ctx, data))

    def _reference(self, ctx, batch) -> torch.Tensor:
        if self.reference == "precomputed":
            return batch["ref_logps"]
        with torch.no_grad(), adapters_disabled(ctx.model):
            return sequence_logps(ctx.model, batch)[0]

    def loss_sum(self, ctx, batch, step_units):
        c = self.cfg
        logp, count = sequence_logps(ctx.model, batch)  # (2B,), (2B,)
        count = count.clamp(min=1).float()
        if c.loss == "simpo":
            rewards = c.beta * logp / count
            chosen, rejected = rewards.chunk(2)
            losses = -F.logsigmoid(chosen - rejected - c.simpo_gamma)
        else:
            ratio = logp - self._reference(ctx, batch).to(logp.dtype)  # log pi / pi_ref per sequence
            chosen, rejected = (c.beta * ratio).chunk(2)
            if c.loss == "ipo":
                avg_c, avg_r = (ratio / count).chunk(2)
                losses = (avg_c - avg_r - 1 / (2 * c.beta)) ** 2
            else:
                z = chosen - rejected
                losses = -(1 - c.label_smoothing) * F.logsigmoid(z) - c.label_smoothing * F.logsigmoid(-z)
        logp_c, logp_r = logp.chunk(2)
        if c.sft_coef:
            losses = losses + c.sft_coef * (-logp_c / count.chunk(2)[0])
        chosen, rejected = chosen.detach(), rejected.detach()
        return losses.sum(), {"reward_accuracy": float((chosen > rejected).sum()),
                              "margin": float((chosen - rejected).sum()), "chosen_reward": float(chosen.sum()),
                              "rejected_reward": float(rejected.sum()), "logp_chosen": float(logp_c.detach().sum()),
                              "logp_rejected": float(logp_r.detach().sum())}
