"""`trainable:` — train only the token embedding and the output layer, or only their new rows (vocabulary expansion).

After a vocabulary merge the new tokens' rows are the only untrained part of the model. Chinese-LLaMA's stage 1
freezes the transformer and trains just the embedding and the LM head, so the new rows settle without disturbing
what the model knows; stage 2 then trains LoRA (with ``lora.modules_to_save: [embed, lm_head]``) or everything.

- ``all``: whatever the method trains (the default).
- ``embeddings``: with ``method: full``, only ``embed`` and ``lm_head`` (weight and bias) train.
- ``new_embeddings``: only their rows ``>= new_token_start`` receive updates. A gradient hook
  (``Tensor.register_hook``) zeroes the old rows' gradients, so they take no step and do not count towards gradient
  clipping; with weight decay an optimizer step hook puts the old rows back (decoupled decay shrinks them even with a
  zero gradient). With ``method: lora`` it masks the rows of ``embed`` / ``lm_head`` listed in
  ``lora.modules_to_save``.

``new_token_start`` defaults to ``base_vocab_size`` in the ``vocab_expansion.json`` that ``lmforge tokenizer resize``
writes into the checkpoint (or ``merge`` into the tokenizer directory).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..config import Section
from ..errors import ConfigError

__all__ = ["TrainableSection", "RowRestriction", "restrict_trainable", "embedding_parameters",
           "read_new_token_start"]

EXPANSION_FILE = "vocab_expansion.json"


class TrainableSection(Section):
    """Which parameters train, on top of the method: all, only embeddings, or only the new tokens' rows."""

    params: Literal["all", "embeddings", "new_embeddings"] = "all"
    """all: what the method trains. embeddings: only the token embedding and the output layer (method full).
    new_embeddings: only their rows from new_token_start on (method full, or lora with modules_to_save)."""
    new_token_start: int | None = Field(None, ge=1)
    """First new token id (the old vocabulary size); default: base_vocab_size in vocab_expansion.json of the model
    or tokenizer directory."""

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data):
        """`trainable: embeddings` is short for `trainable: {params: embeddings}`."""
        return {"params": data} if isinstance(data, str) else data


def embedding_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of the token embedding and the output layer (one tensor when they are tied)."""
    out = {"embed.weight": model.embed.weight}
    head = getattr(model, "lm_head", None)
    if head is not None:
        for name, p in head.named_parameters():
            out[f"lm_head.{name}"] = p
    return out


def read_new_token_start(*dirs: str | Path | None) -> int | None:
    """``base_vocab_size`` from the first ``vocab_expansion.json`` found in ``dirs``."""
    for d in dirs:
        if d is not None and (Path(d) / EXPANSION_FILE).is_file():
            return int(json.loads((Path(d) / EXPANSION_FILE).read_text())["base_vocab_size"])
    return None


class RowRestriction:
    """Keeps rows ``[:start]`` of vocabulary-sized parameters fixed while the rest train (see the module doc).

    ``attach(optimizer)`` adds the step hook that undoes weight decay on the kept rows; ``remove()`` detaches
    every hook (the parameters stay as trained).
    """

    def __init__(self, params: dict[str, nn.Parameter], start: int):
        self.params, self.start = params, start
        self._handles = [p.register_hook(self._mask_grad) for p in params.values()]
        self._kept: dict[str, torch.Tensor] = {}

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[: self.start] = 0  # (V, d) or (V,): old rows get no update
        return grad

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore the kept rows after each optimizer step, for parameters in a group with weight decay."""
        decayed = {id(p) for g in optimizer.param_groups if g.get("weight_decay", 0) for p in g["params"]}
        self._kept = {n: p.detach()[: self.start].clone() for n, p in self.params.items() if id(p) in decayed}
        if self._kept:
            self._handles.append(optimizer.register_step_post_hook(self._restore))

    @torch.no_grad()
    def _restore(self, optimizer, args, kwargs) -> None:
        for name, rows in self._kept.items():
            self.params[name][: self.start].copy_(rows)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._kept = [], {}


def restrict_trainable(model: nn.Module, cfg: TrainableSection, method_name: str, *,
                       model_dirs: tuple[str | Path | None, ...] = ()) -> RowRestriction | None:
    """Apply ``cfg`` to ``model`` after its method: freeze, and for ``new_embeddings`` install the row mask.

    Returns the ``RowRestriction`` to ``attach`` to the optimizer (``new_embeddings``), else None.
    """
    if cfg.params == "all":
        return None
    emb = embedding_parameters(model)
    if cfg.params == "embeddings":
        if method_name != "full":
            raise ConfigError(f"trainable=embeddings needs method full (got '{method_name}'); to train the embeddings "
                              "with LoRA list them in lora.modules_to_save: [embed, lm_head]")
        model.requires_grad_(False)
        for p in emb.values():
            p.requires_grad_(True)
        return None

    start = cfg.new_token_start or read_new_token_start(*model_dirs)
    if start is None:
        raise ConfigError("trainable=new_embeddings needs trainable.new_token_start (the first new token id, i.e. the "
                          "old vocabulary size); `lmforge tokenizer resize` records it in vocab_expansion.json")
    vocab = model.embed.weight.shape[0]
    if not 0 < start < vocab:
        raise ConfigError(f"trainable.new_token_start={start} must be inside the model's vocabulary (1..{vocab - 1})")
    emb = {n: p for n, p in emb.items() if p.shape[0] == vocab}  # not LoRA factors of a wrapped head
    if method_name == "full":
        model.requires_grad_(False)
        for p in emb.values():
            p.requires_grad_(True)
    else:
        emb = {n: p for n, p in emb.items() if p.requires_grad}
        if not emb:
            raise ConfigError(f"trainable=new_embeddings with method '{method_name}' needs the embedding or output "
                              "layer in the method's trained modules, e.g. lora.modules_to_save: [embed, lm_head]")
    return RowRestriction(emb, start)
