"""KTO (Ethayarajh et al. 2024) on the one training loop: unpaired replies, each labelled desirable or not.

With the implicit reward r = log pi(y|x) - log pi_ref(y|x) and the reference point z0 = max(0, mean over the batch of
r on mismatched pairs (x_i, y_j)) — an estimate of KL(pi || pi_ref), not backpropagated:

    desirable:    desirable_weight   × (1 - sigmoid(beta (r - z0)))
    undesirable:  undesirable_weight × (1 - sigmoid(beta (z0 - r)))

Data: LLaMA-Factory's kto format (`messages` ending with the assistant reply, `label` / `kto_tag` true or false) or
`prompt` + `completion` + `label` rows; `data.dataset: kto_en_demo` reads a dataset_info.json entry. Each example is
stored as a pair (its own reply, the mismatched reply: the next example's, on this example's prompt), so the pair
machinery of DPO — collation, the LoRA-off reference, precomputed reference log-probs — serves KTO unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data import DataConfig
from ..data.formats import BadRecord
from ..errors import ConfigError
from .config import KTOSection
from .data import (PreferenceDataset, PreferenceReport, _as_message, _conversation, _getter, _prompt_turns, _read,
                   _split, collate_pairs, encode_reply, fit_reply)
from .dpo import DPOObjective, sequence_logps

__all__ = ["KTOExample", "KTOObjective", "build_kto_datasets", "kto_losses", "parse_kto"]

_TRUE, _FALSE = {"true", "1", "yes", "desirable"}, {"false", "0", "no", "undesirable"}


@dataclass
class KTOExample:
    prompt: list[dict[str, str]]
    reply: str
    desirable: bool
    tools: list | None = None
    source: tuple[str, int] = ("", 0)


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise BadRecord(f"label is {value!r}; expected true or false" if value is not None else
                    "no label (kto_tag): expected true or false")


def parse_kto(record: Any, columns: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> KTOExample:
    """One labelled reply: messages ending with the assistant reply, or a prompt side plus `completion`."""
    if not isinstance(record, dict):
        raise BadRecord(f"record is {type(record).__name__}, not an object")
    get, tags = _getter(record, columns or {}), tags or {}
    desirable = _label(get("label"))
    turns = _prompt_turns(get)
    if get("completion") is not None:
        if turns is None:
            raise BadRecord("no prompt: give a prompt or messages column beside the completion")
        reply = get("completion")
    elif turns and len(turns) > 1:
        turns, reply = turns[:-1], turns[-1]
    else:
        raise BadRecord("no reply: give messages ending with the assistant reply, or a completion column")
    prompt, text, tools = _conversation(turns, _as_message(reply, "the reply"), get, tags)
    return KTOExample(prompt, text, desirable, tools)


class KTODataset(PreferenceDataset):
    """Rows ``{chosen_* : the example, rejected_* : the mismatched pair (this prompt, the next example's reply),
    desirable}``; `set_reference` stores (example, mismatched) reference log-probs as for DPO."""

    def __init__(self, rows: list[dict], examples: list[KTOExample]):
        super().__init__(rows, [])
        self.examples = examples


def _encode(examples: list[KTOExample], tokenizer, cfg: DataConfig, max_prompt_len: int,
            report: PreferenceReport) -> KTODataset:
    encoded, kept = [], []
    for ex in examples:
        try:
            tokens, labels, status = fit_reply(*encode_reply(tokenizer, ex.prompt, ex.reply, ex.tools),
                                               cfg.max_seq_len, max_prompt_len, cfg.truncation)
        except BadRecord as e:
            report.add_bad(ex.source[0], ex.source[1], str(e))
            continue
        if status in ("dropped", "empty"):
            report.dropped += 1
            continue
        report.truncated += status == "truncated"
        encoded.append((tokens, labels))
        kept.append(ex)
    rows = []
    for i, (ex, (tokens, labels)) in enumerate(zip(kept, encoded)):
        other = kept[(i + 1) % len(kept)]  # the reference point's sample: this prompt, another example's reply
        kt, kl, status = fit_reply(*encode_reply(tokenizer, ex.prompt, other.reply, ex.tools), cfg.max_seq_len,
                                   max_prompt_len, cfg.truncation)
        if status in ("dropped", "empty"):
            kt, kl = tokens, labels
        rows.append({"chosen_tokens": tokens, "chosen_labels": labels, "rejected_tokens": kt,
                     "rejected_labels": kl, "desirable": ex.desirable})
    return KTODataset(rows, kept)


def build_kto_datasets(cfg: DataConfig, tokenizer, max_prompt_len: int | None = None
                       ) -> tuple[KTODataset, KTODataset | None, PreferenceReport]:
    report = PreferenceReport(max_seq_len=cfg.max_seq_len, unit="examples")
    max_prompt_len = max_prompt_len or cfg.max_seq_len // 2
    examples = _read(cfg, parse_kto, report)
    train_ex, val_ex = _split(examples, cfg, parse_kto, report)
    report.records = report.pairs = len(train_ex) + len(val_ex)
    train = _encode(train_ex, tokenizer, cfg, max_prompt_len, report)
    val = _encode(val_ex, tokenizer, cfg, max_prompt_len, report) if val_ex else None
    report.train, report.val = len(train), len(val) if val is not None else 0
    if len(train) == 0:
        raise ConfigError(f"no usable KTO examples in data.path={cfg.path!r}: {report.records_read} records, "
                          f"{report.bad_row_count} bad (each needs a prompt, a reply and a true/false label)")
    return train, val, report


def kto_losses(logratio: torch.Tensor, kl_logratio: torch.Tensor, desirable: torch.Tensor, beta: float,
               w_desirable: float = 1.0, w_undesirable: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example (B,) losses and the reference point z0 (a detached scalar): logratio, kl_logratio (B,) are
    log pi - log pi_ref of each example and of its mismatched pair; desirable (B,) bool."""
    z0 = kl_logratio.detach().mean().clamp(min=0)
    good = w_desirable * (1 - torch.sigmoid(beta * (logratio - z0)))
    bad = w_undesirable * (1 - torch.sigmoid(beta * (z0 - logratio)))
    return torch.where(desirable, good, bad), z0


class KTOObjective(DPOObjective):
    """KTO on labelled replies; a micro-batch is B examples and their B mismatched pairs (no gradient through the
    latter). Logs kl (z0), desirable_share, and reward_desirable / reward_undesirable: beta × log-ratio summed over
    the examples of that kind, divided by all the step's examples (their shares of the mean reward)."""

    stage = "kto"

    def __init__(self, cfg: KTOSection | None = None):
        self.cfg = cfg or KTOSection()
        self.reference = None

    def collate(self, rows: list[dict], ctx) -> dict:
        batch = collate_pairs(rows, ctx.pad_id)
        batch["desirable"] = torch.tensor([bool(r["desirable"]) for r in rows])
        return batch

    def loss_sum(self, ctx, batch, step_units):
        c, B = self.cfg, batch["desirable"].shape[0]
        own = {k: batch[k][:B] for k in ("tokens", "positions", "labels")}
        mismatched = {k: batch[k][B:] for k in ("tokens", "positions", "labels")}
        logp = sequence_logps(ctx.model, own)[0]
        with torch.no_grad():
            kl_logp = sequence_logps(ctx.model, mismatched)[0]
        ref = self._reference(ctx, batch).to(logp.dtype)  # (2B,): own, mismatched
        logratio, kl_logratio = logp - ref[:B], kl_logp - ref[B:]
        losses, z0 = kto_losses(logratio.float(), kl_logratio.float(), batch["desirable"], c.beta,
                                c.desirable_weight, c.undesirable_weight)
        with torch.no_grad():
            r = c.beta * logratio.float()
            d = batch["desirable"]
            metrics = {"kl": float(z0) * B, "reward_desirable": float(r[d].sum()),
                       "reward_undesirable": float(r[~d].sum()), "desirable_share": float(d.sum())}
        return losses.sum(), metrics
