"""What every alignment stage shares: per-token log-probs without whole-vocabulary logits, the LoRA-off reference,
and a method adapter for models that are a backbone plus a small head (reward model, policy + value head).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.utils.checkpoint
from torch import nn

from ..data.encode import IGNORE
from ..errors import LmforgeError
from ..models.modules import set_module
from ..peft.lora import load_tensors_into, lora_layers
from ..train.objective import Objective
from .data import collate_pairs

__all__ = [
    "PairObjective",
    "WithHeads",
    "adapters_disabled",
    "can_disable_adapters",
    "last_token_index",
    "masked_mean",
    "scalar_head",
    "token_logps",
    "whiten",
]


def _chunk_logps(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    logits = head(hidden).float()  # (n, V) fp32: the only full-width tensors are this and (entropy) its softmax
    if temperature != 1.0:
        logits = logits / temperature
    lse = logits.logsumexp(-1)  # (n,)
    chosen = logits.gather(-1, targets[:, None]).squeeze(-1) - lse  # (n,)
    if not with_entropy:
        return chosen, torch.zeros_like(chosen)
    return chosen, lse - (torch.softmax(logits, -1) * logits).sum(-1)  # H = lse - E_p[logit], (n,)


def token_logps(head, hidden: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                with_entropy: bool = False, chunk_elements: int = 2**25) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob (and, with `with_entropy`, the entropy) of the next-token distribution at every labelled position.

    head: hidden (n, d) -> logits (n, V), e.g. `model.logits`; hidden (B, T, d); labels (B, T) pre-shifted, -100 = none.
    Returns two float32 (B, T) tensors, 0 where there is no label (entropy all 0 without `with_entropy`). Only
    labelled rows go through the head, in chunks of at most `chunk_elements` logits (128 MiB of fp32: 261 tokens of
    a 128k vocabulary) recomputed in backward (as `causal_lm_loss_sum` does), so (tokens x vocab) logits never
    exist at once: the peak is a few chunk-sized temporaries whatever the rollout's size.
    """
    keep = labels != IGNORE
    h, y = hidden[keep], labels[keep]  # (n, d), (n,)
    if not len(y):
        zeros = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        return zeros, zeros
    with torch.no_grad():
        vocab = head(h[:1]).shape[-1]  # one row, to size the chunks
    chunk = max(1, chunk_elements // vocab)
    parts = []
    for s in range(0, y.shape[0], chunk):
        args = (head, h[s:s + chunk], y[s:s + chunk], temperature, with_entropy)
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(torch.utils.checkpoint.checkpoint(_chunk_logps, *args, use_reentrant=False))
        else:
            parts.append(_chunk_logps(*args))
    logp, ent = (torch.cat(p) for p in zip(*parts))
    zeros = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    return zeros.masked_scatter(keep, logp), zeros.masked_scatter(keep, ent)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(x - mean) / std over the entries where mask is true (all when None); masked entries come back as 0."""
    mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return ((x - mean) * torch.rsqrt(var + 1e-8)).masked_fill(~mask, 0.0)


# ------------------------------------------------------------------------------------------------ reference policy


def can_disable_adapters(model: nn.Module) -> bool:
    """Whether `model` with its LoRA layers bypassed is exactly the starting model: it has LoRA (or DoRA, QLoRA)
    layers, none merged, and every trainable parameter lives inside them (no modules_to_save, prompts, ...)."""
    layers = lora_layers(model)
    if not layers or any(layer.merged for layer in layers.values()):
        return False
    inside = {id(p) for layer in layers.values() for p in layer.parameters()}
    return all(id(p) in inside for p in model.parameters() if p.requires_grad)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base: every LoRA/DoRA layer is swapped for the frozen linear it wraps, and swapped back
    afterwards. This is the reference policy of DPO/PPO with LoRA, with no second copy of the weights."""
    layers = lora_layers(model)
    if not layers:
        raise LmforgeError("the model has no LoRA layers to disable; use a precomputed or copied reference")
    if any(layer.merged for layer in layers.values()):
        raise LmforgeError("LoRA layers are merged into the base weights, so the base model is gone; unmerge first")
    try:
        for path, layer in layers.items():
            set_module(model, path, layer.base_layer)
        yield model
    finally:
        for path, layer in layers.items():
            set_module(model, path, layer)


# ------------------------------------------------------------------------------------------------ backbone + head


class WithHeads:
    """A method (full, lora, ...) applied to a wrapper's backbone, with small heads that always train fully.

    The trainer sees an ordinary method: trainable parameters are the backbone's (as the method chose) plus the
    heads', and checkpoints hold the method's state under ``backbone.`` plus the heads' tensors.
    """

    def __init__(self, method, heads: Sequence[str], backbone: str = "backbone"):
        self.method, self.heads, self.backbone = method, list(heads), backbone

    @property
    def name(self) -> str:
        return self.method.name

    def __getattr__(self, item):  # the wrapped method's options (r, modules_to_save, ...)
        if item in ("method", "heads", "backbone"):
            raise AttributeError(item)
        return getattr(self.method, item)

    def apply(self, model: nn.Module) -> None:
        self.method.apply(getattr(model, self.backbone))
        for h in self.heads:
            getattr(model, h).requires_grad_(True)

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {f"{self.backbone}.{k}": v for k, v in self.method.state_dict(getattr(model, self.backbone)).items()}
        for h in self.heads:
            out.update({f"{h}.{k}": v.detach() for k, v in getattr(model, h).state_dict().items()})
        return out

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_tensors_into(self.state_dict(model), state, f"{self.name} checkpoint")


def scalar_head(d_model: int, like: torch.Tensor, std: float = 0.0) -> nn.Linear:
    """A (d_model -> 1) linear without bias, float32 (a master weight, like LoRA's), N(0, std) or zeros."""
    head = nn.Linear(d_model, 1, bias=False, device=like.device, dtype=torch.float32)
    with torch.no_grad():
        head.weight.normal_(0.0, std) if std > 0 else head.weight.zero_()
    return head


def last_token_index(positions: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token: the largest position (pads are -1), for left or right padding."""
    return positions.argmax(dim=-1)



# ------------------------------------------------------------------------------------------------ pair stages


class PairObjective(Objective):
    """Base of the pairwise stages (rm, dpo): a micro-batch is B pairs collated as 2B rows (chosen, then rejected);
    losses and metrics are sums over pairs, so the loop's normaliser is the step's pair count."""

    unit = "pairs"

    def collate(self, rows: list[dict], ctx) -> dict:
        return collate_pairs(rows, ctx.pad_id)

    def normalizer(self, batch: dict) -> int:
        return batch["tokens"].shape[0] // 2
