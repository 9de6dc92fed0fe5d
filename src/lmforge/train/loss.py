"""Causal-LM loss from hidden states, chunked so the (tokens × vocab) logits never exist all at once.

Labels are pre-shifted (labels[t] is the target after tokens[:t+1], -100 = no loss), so only the rows that carry a
target go through the LM head at all (prompt tokens in SFT cost nothing), and each chunk's logits are recomputed in
backward instead of stored: memory for a 128k vocabulary stays a few hundred MB instead of several GB.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint


def _chunk_loss(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (n, V) in fp32 for a stable log-softmax
    return F.cross_entropy(logits, targets, reduction="sum")


def causal_lm_loss_sum(head, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 4096) -> torch.Tensor:
    """Sum (not mean) of token cross-entropies over labelled positions.

    head: hidden (n, d) -> logits (n, V), e.g. `model.logits`; hidden (B, T, d); labels (B, T) with -100 = ignore.
    The caller divides by the target-token count of the whole optimizer step (correct gradient accumulation).
    """
    keep = labels.reshape(-1) != -100
    h = hidden.reshape(-1, hidden.shape[-1])[keep]  # (n, d)
    y = labels.reshape(-1)[keep]  # (n,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        hc, yc = h[start:start + chunk_tokens], y[start:start + chunk_tokens]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + torch.utils.checkpoint.checkpoint(_chunk_loss, head, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hc, yc)
    return total
