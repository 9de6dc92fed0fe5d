"""Preference data: (prompt, chosen, rejected) pairs and instructGPT-style rankings, read from the files users have.

A record may be any of (field names can be remapped with ``data.columns``; LLaMA-Factory's names work as they are):

- strings: ``{"prompt": str, "chosen": str, "rejected": str}`` with optional ``system``; alpaca-style
  ``instruction``/``input`` (+ ``history``) for the prompt;
- chat messages: ``{"messages" | "conversations" | "prompt": [turns], "chosen": reply, "rejected": reply}`` where a turn
  is ``{"role", "content"}`` or sharegpt's ``{"from", "value"}`` and a reply is a string, one message, or a one-message
  list (LLaMA-Factory's ``dpo_en_demo.json``, TRL's conversational form);
- implicit prompt: ``{"chosen": [turns], "rejected": [turns]}`` whose shared first turns are the prompt;
- rankings: ``{"prompt" | "messages": ..., "responses": [replies]}`` best first, or with ``ranks`` (1 = best) or
  ``scores`` (higher = better); K ranked replies become the K(K-1)/2 ordered pairs (ties give none), as instructGPT
  trains its reward model.

Every message list goes through the SFT parser (`lmforge.data.formats`), so roles, system prompts and tools mean the
same as in SFT. Bad records never stop loading: each is reported with its file and 1-based row number.

A pair is encoded as two sequences rendered with the chat template, each with pre-shifted labels on its final reply
only (earlier assistant turns are prompt). PPO reads prompts only: the conversation up to its last user turn.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import torch

from ..data import DataConfig, collate
from ..data.encode import IGNORE, assistant_spans, shifted_labels
from ..data.formats import (BadRecord, Source, _read_json_file, _Unreadable, parse_record, read_rows,
                            resolve_sources)
from ..errors import ConfigError, LmforgeError, did_you_mean

__all__ = [
    "PreferenceDataset",
    "PreferencePair",
    "PreferenceReport",
    "PromptDataset",
    "PromptExample",
    "build_preference_datasets",
    "build_prompt_datasets",
    "collate_pairs",
    "encode_reply",
    "fit_reply",
    "parse_preference",
    "parse_prompt",
    "preference_sources",
]

# our field -> the columns tried, in order (the first is the canonical name; data.columns may name any other)
FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages", "conversations"),
    "prompt": ("prompt", "instruction", "question"),
    "query": ("query", "input"),
    "history": ("history",),
    "system": ("system",),
    "tools": ("tools",),
    "chosen": ("chosen",),
    "rejected": ("rejected",),
    "responses": ("responses", "completions", "answers"),
    "ranks": ("ranks",),
    "scores": ("scores",),
    "completion": ("completion", "response"),  # KTO: one reply and its label
    "label": ("label", "kto_tag"),
}
_KEY_ALIASES = {alias: name for name, aliases in FIELDS.items() for alias in aliases}  # LLaMA-Factory: conversations


@dataclass
class PreferencePair:
    """A prompt (messages ending with a user or tool turn) and two replies, the first preferred."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    tools: list | None = None
    source: tuple[str, int] = ("", 0)


@dataclass
class PromptExample:
    """A PPO prompt: the conversation so far, ending with a user or tool turn."""

    prompt: list[dict[str, str]]
    tools: list | None = None
    source: tuple[str, int] = ("", 0)
    record: dict | None = None  # the whole row, for reward functions that read its other columns (GRPO)


# ------------------------------------------------------------------------------------------------ parsing records


def _getter(record: dict, columns: dict[str, str]) -> Callable[[str], Any]:
    """``get(field)``: the mapped column if ``columns`` names one, else the first of the field's usual names present."""
    mapped = {_KEY_ALIASES.get(k, k): v for k, v in columns.items()}

    def get(name: str) -> Any:
        if name in mapped:
            return record.get(mapped[name])
        return next((record[c] for c in FIELDS[name] if c in record), None)

    return get


def check_columns(columns: dict[str, str], where: str) -> None:
    for key in columns:
        if key not in _KEY_ALIASES:
            raise ConfigError(f"{where}: data.columns key {key!r} is not a preference field"
                              f"{did_you_mean(key, _KEY_ALIASES)}; fields: {', '.join(FIELDS)}")


def _as_message(reply: Any, what: str) -> dict:
    """A reply as one message dict: a string, a message, or a one-message list."""
    if isinstance(reply, list) and len(reply) == 1:
        reply = reply[0]
    if isinstance(reply, str):
        return {"role": "assistant", "content": reply}
    if isinstance(reply, dict):
        return reply
    raise BadRecord(f"{what} is {'missing' if reply is None else type(reply).__name__}; expected a string or one "
                    "assistant message")


def _prompt_turns(get: Callable[[str], Any]) -> list | None:
    """The prompt as raw turns (messages, a prompt list, or alpaca-style strings); None when the record has none."""
    msgs = get("messages")
    if msgs is None and isinstance(get("prompt"), list):
        msgs = get("prompt")
    if msgs is not None:
        if not isinstance(msgs, list):
            raise BadRecord(f"messages is {type(msgs).__name__}, not a list")
        return list(msgs)
    prompt, query = get("prompt"), get("query")
    if prompt is None and query is None:
        return None
    for value, name in ((prompt, "prompt"), (query, "input")):
        if value is not None and not isinstance(value, str):
            raise BadRecord(f"{name} is {type(value).__name__}, not a string")
    text = "\n".join(p for p in (prompt, query) if p)
    history = get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        raise BadRecord("history must be a list of [user, assistant] pairs")
    turns = [{"role": r, "content": c} for u, a in history for r, c in (("user", u), ("assistant", a))]
    return turns + [{"role": "user", "content": text}]


def _conversation(turns: list, reply: dict, get: Callable[[str], Any], tags: dict[str, str]):
    """Validate turns + reply with the SFT parser; return (prompt messages, reply text, tools)."""
    conv = parse_record({"conversations": [*turns, reply], "system": get("system"), "tools": get("tools")},
                        "sharegpt", tags=tags)
    prompt = conv.messages[:-1]
    if not prompt or prompt[-1]["role"] not in ("user", "tool"):
        last = prompt[-1]["role"] if prompt else "nothing"
        raise BadRecord(f"the prompt must end with a user turn, not {last}")
    return prompt, conv.messages[-1]["content"], conv.tools


def _implicit_prompt(chosen: Any, rejected: Any) -> tuple[list, dict, dict]:
    """Split two full conversations at the end of their shared first turns: (prompt turns, chosen, rejected)."""
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise BadRecord("no prompt: give a prompt or messages column (or chosen/rejected as full conversations)")
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    if len(chosen) != k + 1 or len(rejected) != k + 1:
        raise BadRecord("chosen and rejected conversations must differ in their last message only")
    return chosen[:k], chosen[k], rejected[k]


def _ranked_pairs(responses: Any, ranks: Any, scores: Any) -> list[tuple[Any, Any]]:
    """(better, worse) for every ordered pair of a ranking; ties give no pair."""
    if not isinstance(responses, list) or len(responses) < 2:
        raise BadRecord("responses must be a list of at least two replies")
    if ranks is not None and scores is not None:
        raise BadRecord("give ranks or scores, not both")
    order = ranks if ranks is not None else scores
    if order is None:
        key = [-i for i in range(len(responses))]  # listed best first
    elif (not isinstance(order, list) or len(order) != len(responses)
          or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in order)):
        raise BadRecord(f"{'ranks' if ranks is not None else 'scores'} must be {len(responses)} numbers, one per "
                        "response")
    else:
        key = [-x for x in order] if ranks is not None else list(order)  # higher key = better
    return [(responses[i], responses[j]) for i in range(len(responses)) for j in range(len(responses))
            if key[i] > key[j]]


def parse_preference(record: Any, columns: dict[str, str] | None = None,
                     tags: dict[str, str] | None = None) -> list[PreferencePair]:
    """The pairs of one record (one, or K(K-1)/2 for a ranking); BadRecord with the reason otherwise."""
    if not isinstance(record, dict):
        raise BadRecord(f"record is {type(record).__name__}, not an object")
    get, tags = _getter(record, columns or {}), tags or {}
    turns = _prompt_turns(get)
    if get("responses") is not None:
        if turns is None:
            raise BadRecord("a ranking needs a prompt or messages column")
        raw = _ranked_pairs(get("responses"), get("ranks"), get("scores"))
        if not raw:
            raise BadRecord("all responses are ranked equal: no pair")
    elif get("chosen") is None or get("rejected") is None:
        raise BadRecord(f"no {'chosen' if get('chosen') is None else 'rejected'} reply (and no responses ranking)")
    elif turns is None:
        turns, chosen, rejected = _implicit_prompt(get("chosen"), get("rejected"))
        raw = [(chosen, rejected)]
    else:
        raw = [(get("chosen"), get("rejected"))]
    pairs = []
    for chosen, rejected in raw:
        prompt, good, tools = _conversation(turns, _as_message(chosen, "chosen"), get, tags)
        _, bad, _ = _conversation(turns, _as_message(rejected, "rejected"), get, tags)
        if good == bad:
            raise BadRecord("chosen and rejected replies are identical")
        pairs.append(PreferencePair(prompt, good, bad, tools))
    return pairs


def parse_prompt(record: Any, columns: dict[str, str] | None = None,
                 tags: dict[str, str] | None = None) -> PromptExample:
    """A PPO prompt from any record with a prompt side (preference, SFT or prompt-only rows): trailing assistant
    turns are dropped, so SFT conversations work as prompts."""
    if not isinstance(record, dict):
        raise BadRecord(f"record is {type(record).__name__}, not an object")
    get = _getter(record, columns or {})
    turns = _prompt_turns(get)
    if turns is None:
        raise BadRecord("no prompt: give a prompt or messages column")
    conv = parse_record({"conversations": [*turns, {"role": "assistant", "content": "-"}], "system": get("system"),
                         "tools": get("tools")}, "sharegpt", tags=tags or {})
    messages = conv.messages[:-1]
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages or messages[-1]["role"] not in ("user", "tool"):
        raise BadRecord("the prompt has no user turn")
    return PromptExample(messages, conv.tools, record=record)


# ------------------------------------------------------------------------------------------------ files


def preference_sources(cfg: DataConfig) -> list[Source]:
    """The files of ``data.path``, or of ``data.dataset`` entries in ``<path>/dataset_info.json`` (LLaMA-Factory's
    ranking entries, e.g. ``dpo_en_demo``, included)."""
    if cfg.dataset is None:
        return resolve_sources(cfg.path, None, cfg.format, cfg.columns)
    folder = Path(cfg.path if isinstance(cfg.path, str) else cfg.path[0])
    info_file = folder / "dataset_info.json"
    if not info_file.is_file():
        raise ConfigError(f"data.dataset is set but {info_file} does not exist")
    info = _read_json_file(info_file)
    out = []
    for name in (n.strip() for n in cfg.dataset.split(",") if n.strip()):
        if name not in info:
            raise ConfigError(f"dataset {name!r} is not in {info_file}{did_you_mean(name, info)}")
        entry = info[name]
        if "file_name" not in entry:
            raise ConfigError(f"dataset {name!r} in {info_file} is a hub dataset; lmforge reads local files only: "
                              "download it and point data.path at the files")
        target = folder / entry["file_name"]
        if not target.exists():
            raise ConfigError(f"data file not found: {target} (dataset {name!r} in {info_file})")
        files = sorted(p for p in target.iterdir() if p.is_file()) if target.is_dir() else [target]
        cols = {**entry.get("columns", {}), **cfg.columns}
        out += [Source(f, "auto", cols, dict(entry.get("tags", {}))) for f in files]
    return out


@dataclass
class PreferenceReport:
    """What loading and encoding did to preference (or prompt) data; ``summary()`` is printed before training."""

    records_read: int = 0
    records: int = 0
    """Good records."""
    rankings: int = 0
    """Good records that were rankings of more than two replies."""
    pairs: int = 0
    """Pairs from good records (rankings expanded), or prompts for PPO."""
    bad_rows: list[tuple[str, int, str]] = field(default_factory=list)
    bad_row_count: int = 0
    truncated: int = 0
    """Sequences cut to max_seq_len (prompt start trimmed, then reply end)."""
    dropped: int = 0
    """Pairs dropped: too long with truncation=drop, or no reply token left."""
    train: int = 0
    val: int = 0
    max_seq_len: int = 0
    unit: str = "pairs"
    _bad_keys: set = field(default_factory=set, repr=False)

    MAX_BAD_ROWS = 20

    def add_bad(self, file: str, row: int, reason: str) -> None:
        """Count a bad row once (a ranking's pairs can each fail on encoding): bad rows are a share of rows read."""
        if (file, row) in self._bad_keys:
            return
        self._bad_keys.add((file, row))
        self.bad_row_count += 1
        if len(self.bad_rows) < self.MAX_BAD_ROWS:
            self.bad_rows.append((file, row, reason))

    def summary(self) -> str:
        lines = [f"data: {self.records_read:,} records, {self.bad_row_count:,} bad"
                 + (f"; {self.rankings:,} rankings expanded" if self.rankings else "")]
        lines += [f"  bad row {f}:{row}: {why}" for f, row, why in self.bad_rows[:3]]
        if self.bad_row_count > 3:
            lines.append(f"  ... {self.bad_row_count - 3:,} more bad rows (report.bad_rows)")
        lines.append(f"{self.unit}: {self.train:,} train / {self.val:,} val; {self.truncated:,} sequences truncated "
                     f"and {self.dropped:,} {self.unit} dropped at max_seq_len {self.max_seq_len}")
        return "\n".join(lines)


def _read(cfg: DataConfig, parse: Callable, report: PreferenceReport) -> list:
    """Parse every row of every source: a list of (parsed record) with .source set, bad rows reported."""
    out = []
    for source in preference_sources(cfg):
        check_columns(source.columns, str(source.path))
        for row, record in read_rows(source.path):
            report.records_read += 1
            try:
                if isinstance(record, _Unreadable):  # a JSONL line that is not JSON
                    raise BadRecord(record.reason)
                item = parse(record, source.columns, source.tags)
            except BadRecord as e:
                report.add_bad(str(source.path), row, str(e))
                continue
            for x in item if isinstance(item, list) else [item]:
                x.source = (str(source.path), row)
            out.append(item)
    return out


def _split(items: list, cfg: DataConfig, parse: Callable, report: PreferenceReport) -> tuple[list, list]:
    """Train/validation by record (a ranking's pairs stay on one side), as data.val_split / data.val_path say."""
    if cfg.max_samples is not None:
        items = items[: cfg.max_samples]
    if cfg.val_path is not None:
        val = _read(cfg.model_copy(update={"path": cfg.val_path, "dataset": None}), parse, report)
        return items, val
    if cfg.val_split > 0 and len(items) > 1:
        n_val = min(max(1, round(len(items) * cfg.val_split)), len(items) - 1)
        held = set(random.Random(cfg.seed).sample(range(len(items)), n_val))
        return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
    return items, []


# ------------------------------------------------------------------------------------------------ encoding


def encode_reply(tokenizer, prompt: list[dict], reply: str, tools: list | None = None) -> tuple[list[int], list[int]]:
    """Tokens of prompt + reply rendered with the chat template, ending with the reply's last token (the template's
    end-of-turn token, e.g. ``<|im_end|>``), and pre-shifted labels on the reply only (content + end-of-turn token,
    as SFT trains it). A reward model reads the sequence's last token, so it scores exactly where a generated reply
    ends too."""
    text, spans, _ = assistant_spans(tokenizer, [*prompt, {"role": "assistant", "content": reply}], tools)
    a, b = spans[-1]
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    trained = [a <= s < b and e <= b for s, e in enc.offsets]
    if not any(trained):
        raise BadRecord("the reply has no tokens after rendering")
    end = len(trained) - trained[::-1].index(True)  # the sequence ends with the reply's end-of-turn token, as a
    tokens = list(enc.ids[:end])  # generated reply does (the template's layout after it is dropped)
    return tokens, shifted_labels(tokens, trained[:end])


def fit_reply(tokens: list[int], labels: list[int], max_len: int, max_prompt_len: int,
              mode: str) -> tuple[list[int], list[int], str]:
    """Fit one sequence into ``max_len``: keep the last ``max_prompt_len`` prompt tokens, then cut the reply's end.

    Returns ``(tokens, labels, status)``, status ``ok | truncated | dropped | empty`` (empty: no reply token left).
    """
    if len(tokens) <= max_len:
        return tokens, labels, "ok"
    if mode == "drop":
        return [], [], "dropped"
    prompt_len = next((t + 1 for t, y in enumerate(labels) if y != IGNORE), len(tokens))
    start = prompt_len - min(prompt_len, max_prompt_len)
    tokens, labels = tokens[start:start + max_len], labels[start:start + max_len]
    return (tokens, labels, "truncated") if any(y != IGNORE for y in labels) else ([], [], "empty")


class PreferenceDataset(torch.utils.data.Dataset):
    """Encoded pairs: row i is ``{chosen_tokens, chosen_labels, rejected_tokens, rejected_labels}`` (int lists),
    plus ``ref_logps`` (chosen, rejected) once reference log-probs are precomputed (`set_reference`)."""

    def __init__(self, rows: list[dict], pairs: list[PreferencePair]):
        self.rows, self.pairs = rows, pairs
        self.ref_logps: torch.Tensor | None = None  # (N, 2) float32

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return row if self.ref_logps is None else {**row, "ref_logps": self.ref_logps[i].tolist()}

    def set_reference(self, ref_logps: torch.Tensor) -> None:
        if ref_logps.shape != (len(self), 2):
            raise ValueError(f"reference log-probs must be ({len(self)}, 2), got {tuple(ref_logps.shape)}")
        self.ref_logps = ref_logps.float().cpu()


def _encode_pairs(pairs: list[PreferencePair], tokenizer, cfg: DataConfig, max_prompt_len: int,
                  report: PreferenceReport) -> PreferenceDataset:
    rows, kept = [], []
    for p in pairs:
        try:
            fitted = [fit_reply(*encode_reply(tokenizer, p.prompt, reply, p.tools), cfg.max_seq_len, max_prompt_len,
                                cfg.truncation) for reply in (p.chosen, p.rejected)]
        except BadRecord as e:
            report.add_bad(p.source[0], p.source[1], str(e))
            continue
        if any(status in ("dropped", "empty") for _, _, status in fitted):
            report.dropped += 1
            continue
        report.truncated += sum(status == "truncated" for _, _, status in fitted)
        (ct, cl, _), (rt, rl, _) = fitted
        rows.append({"chosen_tokens": ct, "chosen_labels": cl, "rejected_tokens": rt, "rejected_labels": rl})
        kept.append(p)
    return PreferenceDataset(rows, kept)


def build_preference_datasets(cfg: DataConfig, tokenizer, max_prompt_len: int | None = None
                              ) -> tuple[PreferenceDataset, PreferenceDataset | None, PreferenceReport]:
    """Read, split (by record) and encode preference data: ``(train, val or None, report)``."""
    report = PreferenceReport(max_seq_len=cfg.max_seq_len)
    max_prompt_len = max_prompt_len or cfg.max_seq_len // 2
    records = _read(cfg, parse_preference, report)
    train_rec, val_rec = _split(records, cfg, parse_preference, report)
    report.records = len(train_rec) + len(val_rec)
    report.rankings = sum(len(r) > 1 for r in train_rec + val_rec)
    report.pairs = sum(len(r) for r in train_rec + val_rec)
    train = _encode_pairs([p for r in train_rec for p in r], tokenizer, cfg, max_prompt_len, report)
    val = _encode_pairs([p for r in val_rec for p in r], tokenizer, cfg, max_prompt_len, report) if val_rec else None
    report.train, report.val = len(train), len(val) if val is not None else 0
    if len(train) == 0:
        first = f" (first bad row: {':'.join(map(str, report.bad_rows[0]))})" if report.bad_rows else ""
        raise ConfigError(f"no usable preference pairs in data.path={cfg.path!r}: {report.records_read} records, "
                          f"{report.bad_row_count} bad, {report.dropped} dropped at max_seq_len "
                          f"{cfg.max_seq_len}{first}")
    return train, val, report


class PromptDataset(torch.utils.data.Dataset):
    """PPO/GRPO prompts: row i is ``{"tokens": prompt ids ending with the generation prompt, "messages": [...],
    "record": the file's row (every column, for reward functions)}``."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _encode_prompts(examples: list[PromptExample], tokenizer, max_prompt_len: int, cfg: DataConfig,
                    report: PreferenceReport) -> PromptDataset:
    rows = []
    for ex in examples:
        try:
            ids = tokenizer.apply_chat_template(ex.prompt, add_generation_prompt=True, tools=ex.tools, tokenize=True)
        except (jinja2.TemplateError, LmforgeError) as e:  # a template's raise_exception: the row is bad, not the run
            report.add_bad(ex.source[0], ex.source[1], f"chat template failed: {str(e).splitlines()[0]}")
            continue
        if len(ids) > max_prompt_len:
            if cfg.truncation == "drop":
                report.dropped += 1
                continue
            ids, report.truncated = ids[-max_prompt_len:], report.truncated + 1
        rows.append({"tokens": ids, "messages": ex.prompt, "record": ex.record or {}})
    return PromptDataset(rows)


def build_prompt_datasets(cfg: DataConfig, tokenizer, max_prompt_len: int
                          ) -> tuple[PromptDataset, PromptDataset | None, PreferenceReport]:
    """PPO prompts from any record with a prompt side: ``(train, val or None, report)``."""
    report = PreferenceReport(max_seq_len=max_prompt_len, unit="prompts")
    examples = _read(cfg, parse_prompt, report)
    train_ex, val_ex = _split(examples, cfg, parse_prompt, report)
    report.records = report.pairs = len(train_ex) + len(val_ex)
    train = _encode_prompts(train_ex, tokenizer, max_prompt_len, cfg, report)
    val = _encode_prompts(val_ex, tokenizer, max_prompt_len, cfg, report) if val_ex else None
    report.train, report.val = len(train), len(val) if val is not None else 0
    if len(train) == 0:
        raise ConfigError(f"no usable prompts in data.path={cfg.path!r}: {report.records_read} records, "
                          f"{report.bad_row_count} bad")
    return train, val, report


# ------------------------------------------------------------------------------------------------ batching


def collate_pairs(rows: Sequence[dict], pad_id: int | None) -> dict[str, torch.Tensor]:
    """Chosen sequences then rejected ones, right-padded: ``tokens``/``labels``/``positions`` (2B, T) int64 (as
    `lmforge.data.collate`), plus ``ref_logps`` (2B,) float32 when the rows carry precomputed reference log-probs."""
    seqs = [{"tokens": r[f"{side}_tokens"], "labels": r[f"{side}_labels"]} for side in ("chosen", "rejected")
            for r in rows]
    batch = collate(seqs, pad_id)
    if all("ref_logps" in r for r in rows):
        batch["ref_logps"] = torch.tensor([r["ref_logps"][k] for k in (0, 1) for r in rows], dtype=torch.float32)
    return batch
