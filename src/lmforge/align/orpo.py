"""ORPO (Hong et al. 2024) as an objective of the one training loop: SFT and preference alignment in one stage, no
reference model.

Per pair, with P(y|x) = exp(mean token log-prob of y) and odds(y) = P / (1 - P):

    loss = NLL(chosen) (mean over its tokens) - beta * log sigmoid(log odds(chosen) - log odds(rejected))

log odds = mean logp - log(1 - exp(mean logp)), computed with log1p(-exp(.)) (mean logp < 0 always).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import PairObjective
from .config import ORPOSection
from .dpo import sequence_logps

__all__ = ["ORPOObjective", "orpo_losses"]


def orpo_losses(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, beta: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: (loss (B,), log odds ratio (B,)) from the length-averaged log-probs of chosen and rejected."""
    log_odds = (avg_chosen - avg_rejected) - (torch.log1p(-avg_chosen.exp().clamp(max=1 - 1e-7))
                                              - torch.log1p(-avg_rejected.exp().clamp(max=1 - 1e-7)))
    return -avg_chosen - beta * F.logsigmoid(log_odds), log_odds


class ORPOObjective(PairObjective):
    """ORPO on preference pairs; logs nll (chosen), log_odds_ratio, reward_accuracy (chosen more likely per token
    than rejected), margin (beta × the average log-prob gap) and the two average log-probs."""

    def __init__(self, cfg: ORPOSection | None = None):
        self.cfg = cfg or ORPOSection()

    def loss_sum(self, ctx, batch, step_units):
        logp, count = sequence_logps(ctx.model, batch)  # (2B,), (2B,)
        avg = logp.float() / count.clamp(min=1).float()
        avg_c, avg_r = avg.chunk(2)
        losses, log_odds = orpo_losses(avg_c, avg_r, self.cfg.beta)
        with torch.no_grad():
            metrics = {"nll": float(-avg_c.sum()), "log_odds_ratio": float(log_odds.sum()),
                       "reward_accuracy": float((avg_c > avg_r).sum()),
                       "margin": float(self.cfg.beta * (avg_c - avg_r).sum()),
                       "logp_chosen": float(avg_c.sum()), "logp_rejected": float(avg_r.sum())}
        return losses.sum(), metrics
