"""Task definitions: local YAML or JSONL files, validated before any model is loaded.

A YAML file holds one task (a mapping with ``type``) or a suite (``tasks:`` a list of task mappings or paths of
task files, relative to the YAML). A task reads its rows from ``data:`` (a JSONL file, relative to the YAML) or from
inline ``rows:``. A bare ``.jsonl`` file is a task whose type follows from its first row: ``choices`` ->
multiple_choice, ``tests`` -> code, otherwise generate.

Prompts are Python format strings over the row's fields (``"Q: {question}\\nA:"``); with ``chat: true`` the
formatted prompt becomes the user turn of the model's chat template.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, model_validator

from ..config import Section, load_config
from ..errors import ConfigError

TaskType = Literal["generate", "multiple_choice", "perplexity", "code", "judge"]
METRICS = ("exact_match", "contains", "bleu", "rouge")


class JudgeSection(Section):
    model: str | None = None
    """Judge checkpoint directory (served by lmforge in process); defaults to the eval's judge_model."""
    mode: Literal["rubric", "pairwise"] = "rubric"
    """rubric: rate each answer 1-10; pairwise: compare with `baseline_field` answers (win rate)."""
    reference_field: str | None = None
    """Row field with a reference answer shown to the judge."""
    baseline_field: str | None = None
    """pairwise: row field with the answer to compare against."""
    max_new_tokens: int = Field(256, ge=1)


class Task(Section):
    name: str
    type: TaskType = "generate"
    category: str | None = None
    """Capability dimension for the report (comprehension, generation, knowledge, reasoning, long_context, safety)."""
    description: str | None = None
    data: str | None = None
    """JSONL file with one row per example (relative to the task file)."""
    rows: list[dict] = []
    """Inline rows (instead of `data`)."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N rows."""
    prompt: str = "{prompt}"
    """Python format string over a row's fields."""
    chat: bool = False
    """Send the prompt as a user turn through the model's chat template."""
    system: str | None = None
    answer_field: str = "answer"
    """Row field with the reference answer (a string or a list of acceptable answers)."""
    metrics: list[Literal["exact_match", "contains", "bleu", "rouge"]] = ["exact_match"]
    """generate: metrics over the (extracted) output."""
    extract: str | None = None
    """Regex applied to the output before scoring; its first group (or whole match) is the answer."""
    normalize: bool = True
    """exact_match/contains: lowercase, drop punctuation and articles first."""
    rouge_tokenizer: Literal["default", "chars", "jieba", "whitespace"] = "default"
    """ROUGE tokenization: default (English words), chars or jieba for Chinese."""
    bleu_tokenize: str = "13a"
    """sacrebleu tokenizer: 13a, zh, char, intl, none."""
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = []
    """Stop strings (generation ends before them)."""
    # multiple choice
    choices_field: str = "choices"
    label_field: str = "label"
    """Index (0-based) of the right choice, a letter A/B/C..., or the right choice's text."""
    continuation: str = " {choice}"
    """How a choice continues the prompt."""
    # code
    tests_field: str = "tests"
    """Python test code run after the program (asserts; HumanEval's `check` with entry_point)."""
    entry_point_field: str = "entry_point"
    n_samples: int = Field(1, ge=1)
    """Samples per problem for pass@k (use temperature > 0 when n_samples > 1)."""
    k: list[int] = [1]
    timeout: float = Field(10.0, gt=0)
    """Seconds each program may run."""
    memory_mb: int = Field(1024, ge=64)
    # perplexity
    text_file: str | None = None
    """perplexity: a text file (relative to the task file); or rows with a `text` field."""
    window: int = Field(1024, ge=2)
    """perplexity: tokens per window (<= the model's context)."""
    stride: int = Field(512, ge=1)
    """perplexity: how far each window moves; only the new tokens of a window are scored."""
    add_bos: bool = True
    judge: JudgeSection = JudgeSection()

    base_dir: str = "."
    """Directory relative paths resolve against (set by the loader)."""

    @model_validator(mode="after")
    def _check(self):
        if self.type == "perplexity" and self.stride > self.window:
            raise ValueError(f"task '{self.name}': stride ({self.stride}) must be <= window ({self.window})")
        if self.type == "code" and max(self.k) > self.n_samples:
            raise ValueError(f"task '{self.name}': pass@{max(self.k)} needs n_samples >= {max(self.k)}")
        if self.type == "judge" and self.judge.mode == "pairwise" and not self.judge.baseline_field:
            raise ValueError(f"task '{self.name}': pairwise judging needs judge.baseline_field")
        return self

    def path(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def load_rows(self) -> list[dict]:
        rows = list(self.rows)
        if self.data:
            rows += read_jsonl(self.path(self.data))
        if self.type == "perplexity" and self.text_file:
            return [{"text": self.path(self.text_file).read_text(encoding="utf-8")}]
        if not rows:
            raise ConfigError(f"task '{self.name}' has no rows: set data (a JSONL file), rows, or text_file")
        return rows[: self.limit] if self.limit else rows

    def render(self, row: dict, template: str | None = None) -> str:
        try:
            return (template or self.prompt).format(**row)
        except KeyError as e:
            raise ConfigError(f"task '{self.name}': prompt uses field {e} that the row lacks "
                              f"(row fields: {', '.join(row)})") from None


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"task data file not found: {path}")
    from ..data.formats import not_utf8, read_text, split_lines

    rows = []
    for i, line in enumerate(split_lines(read_text(path)), 1):  # rows end at \n: U+2028 may sit inside a string
        if line.strip():
            if why := not_utf8(line, i):
                raise ConfigError(f"{path}:{i}: {why}")
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{i}: invalid JSON ({e.msg})") from None
    return rows


def _infer_type(row: dict) -> str:
    if "choices" in row:
        return "multiple_choice"
    if "tests" in row:
        return "code"
    if set(row) == {"text"}:
        return "perplexity"
    return "generate"


def load_tasks(path: str | Path) -> list[Task]:
    """The tasks a YAML (task or suite) or JSONL file defines."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"task file not found: {p}")
    if p.suffix == ".jsonl":
        rows = read_jsonl(p)
        if not rows:
            raise ConfigError(f"{p}: no rows")
        kind = _infer_type(rows[0])
        return [load_config(Task, base={"name": p.stem, "type": kind, "data": p.name, "base_dir": str(p.parent),
                                        **({"prompt": "{prompt}"} if "prompt" in rows[0] else {})})]
    try:
        spec = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{p}: a task file is a mapping (one task) or has a 'tasks:' list (a suite)")
    defaults = spec.get("defaults", {})
    entries = spec["tasks"] if "tasks" in spec else [spec]
    tasks: list[Task] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            tasks += load_tasks(p.parent / entry)
            continue
        entry = {**defaults, **entry}
        entry.setdefault("name", p.stem if len(entries) == 1 else f"{p.stem}[{i}]")
        try:
            tasks.append(load_config(Task, base={**entry, "base_dir": str(p.parent)}))
        except ConfigError as e:
            raise ConfigError(f"{p}: task '{entry['name']}': {e}") from None
    return tasks
