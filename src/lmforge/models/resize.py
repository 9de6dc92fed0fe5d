"""Grow a model's vocabulary: new rows in the token embedding and the output layer, every old row untouched.

After a tokenizer merge (``lmforge.tokenizer.merge``) the ids ``[first_new, vocab_size)`` are new tokens. Their rows
start from one of two inits:

- ``mean``: the mean of the old rows. A new token's logit is then the average old logit, so it takes a modest share
  of probability mass instead of a random one (Hewitt, "Initializing new word embeddings", 2021);
- ``subtoken``: the mean of the rows of the pieces the *old* tokenizer splits the new token into, so "李白" starts
  near "李" and "白" (in input and output space alike).

Which one starts at the lower loss is measured in ``docs/vocab_expansion.md``. Old-token inputs give exactly the
same hidden states and the same logits over the old ids after resizing.

This module only changes tensors; the files around a vocabulary expansion live with their formats:
``lmforge.tokenizer.expand`` (a merged tokenizer → a resized checkpoint) and ``lmforge.peft.peft_format``
(``resize_for_adapter``: a PEFT adapter that carries a resized embedding).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["NewRowInit", "resize_token_embeddings", "new_rows"]

NewRowInit = Literal["mean", "subtoken"]


def new_rows(old: torch.Tensor, count: int, subtokens: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """``count`` new rows for the table ``old`` ((V, d) weights or (V,) biases): each the mean of the rows listed in
    ``subtokens[i]``, or of all of ``old`` where there is no list (or an empty one). Means are taken in fp32."""
    mean = old.float().mean(0)  # (d,) or ()
    rows = mean.expand(count, *old.shape[1:]).clone()  # (count, d)
    for i, ids in enumerate((subtokens or [])[:count]):
        if len(ids):
            rows[i] = old[torch.as_tensor(list(ids), device=old.device)].float().mean(0)
    return rows.to(old.dtype)


def _grow(old: torch.Tensor, vocab_size: int, first_new: int, subtokens) -> torch.Tensor:
    """(vocab_size, ...) copy of ``old``; rows from ``first_new`` on are initialized from rows ``[0, first_new)``."""
    out = torch.empty((vocab_size, *old.shape[1:]), dtype=old.dtype, device=old.device)
    out[:first_new] = old[:first_new]
    out[first_new:] = new_rows(old[:first_new], vocab_size - first_new, subtokens)
    return out


@torch.no_grad()
def resize_token_embeddings(model: nn.Module, vocab_size: int, *, init: NewRowInit = "mean",
                            subtokens: Sequence[Sequence[int]] | None = None, first_new: int | None = None,
                            pad_to_multiple_of: int | None = None) -> int:
    """Resize ``model.embed`` and ``model.lm_head`` (weight and bias) to ``vocab_size`` rows in place (rounded up to
    ``pad_to_multiple_of``) and update ``model.cfg.vocab_size``; return the new size.

    Rows ``[first_new, size)`` (default: from the current size) get the ``init``; ``subtokens[i]`` lists the old ids
    whose mean initializes row ``first_new + i`` (``init='subtoken'``). Resize before applying LoRA or any other
    method: a wrapped output layer is an error. Parameters keep their dtype, device and requires_grad.
    """
    if init not in ("mean", "subtoken"):
        raise ConfigError(f"init '{init}' is not a new-row init; use mean or subtoken")
    if init == "subtoken" and subtokens is None:
        raise ConfigError("init=subtoken needs the old tokenizer's split of each new token (see resize_for_tokenizer)")
    old_size, d = model.embed.weight.shape
    if pad_to_multiple_of:
        vocab_size = -(-vocab_size // pad_to_multiple_of) * pad_to_multiple_of
    first_new = old_size if first_new is None else first_new
    if vocab_size < old_size:
        raise ConfigError(f"vocab_size {vocab_size} is below the model's {old_size} rows; resizing only grows the "
                          "vocabulary")
    if not 0 < first_new <= old_size:
        raise ConfigError(f"first_new {first_new} must be in 1..{old_size} (the model's current rows)")
    subs = subtokens if init == "subtoken" else None

    head = model.lm_head
    if head is not None and type(head) is not nn.Linear:
        raise ConfigError(f"lm_head is a {type(head).__name__}; resize the vocabulary before applying LoRA, "
                          "quantization or another method to the output layer")
    w = model.embed.weight
    embed = nn.Embedding(vocab_size, d, device="meta")
    embed.weight = nn.Parameter(_grow(w, vocab_size, first_new, subs), requires_grad=w.requires_grad)
    model.embed = embed
    if head is not None:
        new_head = nn.Linear(d, vocab_size, bias=head.bias is not None, device="meta")
        new_head.weight = nn.Parameter(_grow(head.weight, vocab_size, first_new, subs),
                                       requires_grad=head.weight.requires_grad)
        if head.bias is not None:
            new_head.bias = nn.Parameter(_grow(head.bias, vocab_size, first_new, subs),
                                         requires_grad=head.bias.requires_grad)
        model.lm_head = new_head
    model.cfg = model.cfg.model_copy(update={"vocab_size": vocab_size})
    return vocab_size
