"""GRPO's rewards: built-in verifiers, Python functions named in the config, a reward model; several, weighted.

Every reward maps a batch of (prompt, completion, dataset row) to one float per completion, or None where it has
no opinion. Built-ins (`grpo.rewards[i].fn`):

- ``exact_match``: 1 when the answer (the last ``<answer>…</answer>`` if any, else the whole completion) equals the
  row's reference after normalisation (case, punctuation, articles, whitespace), else 0;
- ``number_match``: 1 when the number in the last ``\\boxed{…}`` (else the last number of the last non-empty line)
  equals the reference's number (GSM8K's ``… #### 42`` is read after ``####``), else 0;
- ``format``: 1 when the completion matches `pattern` whole (default ``<think>…</think> <answer>…</answer>``);
- ``code_tests``: 1 when the completion's code (its first fenced block, else all of it) followed by the row's tests
  exits 0 in `lmforge.eval.sandbox`, else 0;
- ``reward_model``: the score of a stage-rm model on prompt + completion.

A reward that raises, returns the wrong count or non-numbers is retried one completion at a time, so only the
completions it fails on are marked missing (reported with their prompt index, counted in ``reward_missing``); a NaN
or infinite value is reported and marked missing the same way; the step goes on. `required_columns` lets the run refuse a prompts file without a column a reward reads, before training.
"""
from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Callable, Sequence

import torch

from ..errors import ConfigError
from ..eval.metrics import normalize_answer
from .config import RewardSpec

__all__ = ["BUILTINS", "RewardSet", "extract_answer", "extract_number", "reference_number", "required_columns"]

log = logging.getLogger("lmforge.grpo")

DEFAULT_FORMAT = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def extract_answer(text: str) -> str:
    """The last <answer>…</answer> of `text`, else `text` itself (stripped)."""
    found = _ANSWER.findall(text)
    return (found[-1] if found else text).strip()


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{…} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def _to_float(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def extract_number(text: str) -> float | None:
    """The number in the last \\boxed{} of `text`, else the last number on its last non-empty line, else None."""
    boxed = _boxed(text)
    if boxed is not None:
        nums = _NUMBER.findall(boxed.replace("$", ""))
        return _to_float(nums[-1]) if nums else None
    lines = [ln for ln in extract_answer(text).splitlines() if ln.strip()]
    nums = _NUMBER.findall(lines[-1]) if lines else []
    return _to_float(nums[-1]) if nums else None


def reference_number(ref) -> float | None:
    """A reference answer's number: a number as is, GSM8K's text after '####', else as `extract_number`."""
    if isinstance(ref, (int, float)) and not isinstance(ref, bool):
        return float(ref)
    text = str(ref)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return extract_number(text)


# ------------------------------------------------------------------------------------------------ built-ins


def _exact_match(spec: RewardSpec):
    def fn(prompts, completions, **columns):
        refs = columns[spec.column]
        return [float(normalize_answer(extract_answer(c)) == normalize_answer(str(r).rsplit("####", 1)[-1]))
                for c, r in zip(completions, refs)]
    return fn


def _number_match(spec: RewardSpec):
    def fn(prompts, completions, **columns):
        out = []
        for c, r in zip(completions, columns[spec.column]):
            got, want = extract_number(c), reference_number(r)
            out.append(None if want is None else float(got is not None and math.isclose(got, want, rel_tol=1e-6,
                                                                                          abs_tol=1e-9)))
        return out
    return fn


def _format(spec: RewardSpec):
    pattern = re.compile(spec.pattern or DEFAULT_FORMAT, re.DOTALL)
    return lambda prompts, completions, **columns: [float(pattern.fullmatch(c) is not None) for c in completions]


def _code_tests(spec: RewardSpec):
    from ..eval.runner import build_program
    from ..eval.sandbox import run_program

    def fn(prompts, completions, **columns):
        return [float(run_program(build_program("", c, str(t), None, chat=True), timeout=spec.timeout).passed)
                for c, t in zip(completions, columns[spec.column])]
    return fn


BUILTINS: dict[str, Callable[[RewardSpec], Callable]] = {
    "exact_match": _exact_match, "number_match": _number_match, "format": _format, "code_tests": _code_tests,
}
_COLUMN_BUILTINS = ("exact_match", "number_match", "code_tests")
_GIVEN = ("prompts", "completions", "completion_ids", "prompt_ids")


def _reward_model_fn(spec: RewardSpec, device, dtype):
    from .ppo import pad_rollout
    from .reward import load_reward_model

    if spec.model is None:
        raise ConfigError("grpo.rewards: fn reward_model needs model: a directory written by stage rm")
    device = device or "cpu"  # RewardSet(specs) without a device: score on the CPU
    rm = load_reward_model(spec.model, dtype=dtype, device=device).requires_grad_(False).eval()

    @torch.no_grad()
    def fn(prompts, completions, prompt_ids, completion_ids, pad_id=0, **columns):
        b = pad_rollout(prompt_ids, [c or [pad_id] for c in completion_ids], pad_id)
        return rm(b["tokens"].to(device), b["positions"].to(device)).float().cpu().tolist()
    return fn, rm


def required_columns(spec: RewardSpec, fn: Callable | None = None) -> list[str]:
    """Dataset columns a reward reads: a built-in's `column`; a function's parameters without a default (beside
    prompts, completions, prompt_ids, completion_ids)."""
    if spec.fn in _COLUMN_BUILTINS:
        return [spec.column]
    if fn is None or spec.fn in BUILTINS or spec.fn == "reward_model":
        return []
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.name not in _GIVEN and p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _accepts(fn: Callable) -> tuple[bool, set[str]]:
    """(takes **kwargs, names it takes)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True, set()
    return any(p.kind == p.VAR_KEYWORD for p in params), {p.name for p in params}


def _report(name: str, what: str, failed: list[tuple[int, str]], group: int) -> None:
    """One warning per reward and batch, however many completions it failed on: the first (its prompt index,
    completion index and error), then how many more and their prompts."""
    if not failed:
        return
    (i, err), rest = failed[0], failed[1:]
    more = sorted({j // group for j, _ in rest})
    shown = ", ".join(map(str, more[:10])) + (", ..." if len(more) > 10 else "")
    log.warning("reward '%s' %s on prompt %d (completion %d): %s%s; marked missing", name, what, i // group, i, err,
                f"; and on {len(rest)} more completions (prompts {shown})" if rest else "")


class RewardSet:
    """The configured rewards; calling it scores a batch: (N, F) float32 with NaN where a reward is missing."""

    def __init__(self, specs: Sequence[RewardSpec], device=None, dtype=torch.float32, pad_id: int = 0):
        from .ppo import load_reward_fn

        if not specs:
            raise ConfigError("stage grpo needs at least one reward: set grpo.rewards, e.g. [{fn: number_match}]")
        self.specs, self.fns, self.names, self.pad_id, self.models = list(specs), [], [], pad_id, []
        for i, spec in enumerate(self.specs):
            if spec.fn in BUILTINS:
                fn = BUILTINS[spec.fn](spec)
            elif spec.fn == "reward_model":
                fn, rm = _reward_model_fn(spec, device, dtype)
                self.models.append(rm)
            elif ":" in spec.fn:
                try:
                    fn = load_reward_fn(spec.fn)
                except ConfigError as e:
                    raise ConfigError(str(e).replace("ppo.reward_fn", f"grpo.rewards[{i}].fn")) from None
            else:
                raise ConfigError(f"grpo.rewards[{i}].fn '{spec.fn}' is neither a built-in ("
                                  f"{', '.join([*BUILTINS, 'reward_model'])}) nor 'module:function'")
            self.fns.append(fn)
            name = spec.fn.rpartition(":")[2].removesuffix(".py")
            self.names.append(name if name not in self.names else f"{name}_{i}")
        self.weights = torch.tensor([s.weight for s in self.specs], dtype=torch.float32)

    def check_columns(self, rows: Sequence[dict], where: str) -> None:
        """One-line ConfigError when a reward reads a column some prompt rows lack (before any training)."""
        for i, (spec, fn) in enumerate(zip(self.specs, self.fns)):
            for col in required_columns(spec, fn):
                missing = sum(col not in r.get("record", {}) for r in rows)
                if missing:
                    fix = (f"or set grpo.rewards[{i}].column to the column that holds it" if spec.fn in BUILTINS else
                           f"or give the function's parameter '{col}' a default")
                    raise ConfigError(f"grpo.rewards[{i}] ({spec.fn}) reads column '{col}', which {missing} of "
                                      f"{len(rows)} prompts in {where} lack; add it to every row, {fix}")

    def _call(self, fn, prompts, completions, rows, prompt_ids, completion_ids) -> list:
        kwargs_ok, names = _accepts(fn)
        columns = {k: [r.get(k) for r in rows] for k in set().union(*(r.keys() for r in rows))
                   if k not in _GIVEN and (kwargs_ok or k in names)}
        given = {"prompts": prompts, "completions": completions, "prompt_ids": prompt_ids,
                 "completion_ids": completion_ids, "pad_id": self.pad_id}
        given = {k: v for k, v in given.items() if kwargs_ok or k in names}
        out = list(fn(**given, **columns))
        if len(out) != len(completions):
            raise ValueError(f"returned {len(out)} values for {len(completions)} completions")
        return [None if v is None else float(v) for v in out]

    def __call__(self, prompts: list, completions: list[str], rows: list[dict], prompt_ids: list[list[int]],
                 completion_ids: list[list[int]], group: int = 1) -> tuple[torch.Tensor, int]:
        """Scores (N, F) float32 (NaN = missing) and how many (sample, reward) scores are missing. `rows` are the
        records of the prompts file; `group` maps completion i to prompt i // group in failure reports."""
        n = len(completions)
        scores = torch.full((n, len(self.fns)), float("nan"))
        missing = 0
        for f, (fn, name) in enumerate(zip(self.fns, self.names)):
            args = (prompts, completions, rows, prompt_ids, completion_ids)
            try:
                values = self._call(fn, *args)
            except Exception as e:  # noqa: BLE001 - find the completions it fails on, one at a time
                log.warning("reward '%s' failed on the batch (%s: %s); retrying one completion at a time",
                            name, type(e).__name__, e)
                values, failed = [None] * n, []
                for i in range(n):
                    try:
                        values[i] = self._call(fn, *([a[i]] for a in args))[0]
                    except Exception as e1:  # noqa: BLE001
                        failed.append((i, f"{type(e1).__name__}: {e1}"))
                _report(name, "failed", failed, group)
            # None = no opinion; NaN or inf is a broken score: reported, as a failure is
            _report(name, "returned a non-finite value", [(i, repr(v)) for i, v in enumerate(values)
                                                          if v is not None and not math.isfinite(v)], group)
            scores[:, f] = torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float32)
            bad = ~torch.isfinite(scores[:, f])
            missing += int(bad.sum())
            scores[bad, f] = float("nan")
        return scores, missing

    def total(self, scores: torch.Tensor) -> torch.Tensor:
        """(N,) weighted sum over the rewards that scored each sample; NaN where none did."""
        present = ~scores.isnan()
        total = (scores.nan_to_num(0.0) * self.weights).sum(-1)
        return total.masked_fill(~present.any(-1), float("nan"))
