"""`lmforge eval MODEL TASKS...`: run task files against a model; results as JSON and a Markdown table."""
from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ..atomic import atomic_write
from ..config import Section, aliases
from ..errors import ConfigError, LmforgeError
from ..infer import SamplingParams
from . import metrics as M
from .judge import Judge
from .model import EvalModel, LocalModel, perplexity
from .sandbox import run_program
from .tasks import Task, load_tasks


class EvalConfig(Section):
    model: str = Field(description="checkpoint directory (config.json + safetensors + tokenizer.json), .gguf file "
                                   "or Hugging Face id (org/name)")
    tasks: list[str] = Field(description="task files: YAML (a task or a suite) or JSONL")
    adapter: str | None = None
    """Adapter directory applied on top of the model: any lmforge trains (LoRA, DoRA, IA3, prefix, prompt, ...)."""
    revision: str | None = None
    """Branch, tag or commit of a Hugging Face id (default: main)."""
    device: str = "auto"
    """cpu, cuda or cuda:N; auto = cuda when available, else cpu."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype; auto = bfloat16 on a GPU that supports it, else float32."""
    batch_size: int = Field(8, ge=1)
    """Prompts per generate() call / rows per scoring forward."""
    limit: int | None = Field(None, ge=1)
    """Evaluate only the first N rows of every task."""
    chat_template: str | None = None
    """Built-in template name or Jinja text, when the checkpoint has none (tasks with chat: true)."""
    judge_model: str | None = None
    """Default judge checkpoint for judge tasks that name none."""
    out: str | None = Field("runs/eval", validation_alias=aliases("out", "output"))
    """Directory for results.json and results.md, rewritten after every task (None = print only)."""
    samples: int = Field(3, ge=0)
    """Example outputs kept per task in results.json."""
    seed: int = 0
    """Seed of sampled generations (tasks with temperature > 0, pass@k samples)."""

    @field_validator("tasks", mode="before")
    @classmethod
    def _comma_list(cls, v):
        """tasks=a.yaml,b.jsonl on the command line is a list too."""
        return [t for t in v.split(",") if t] if isinstance(v, str) else v


# ---------------------------------------------------------------------------------------------------- helpers


def _prompt_ids(model: EvalModel, task: Task, text: str) -> list[int]:
    tok = model.tokenizer
    if task.chat:
        messages = ([{"role": "system", "content": task.system}] if task.system else []) + \
                   [{"role": "user", "content": text}]
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return tok.encode(text)


def _params(task: Task, seed: int, stop: list[str] | None = None) -> SamplingParams:
    return SamplingParams(max_new_tokens=task.max_new_tokens, temperature=task.temperature, top_p=task.top_p,
                          stop=stop if stop is not None else task.stop, seed=seed)


def extract_answer(text: str, pattern: str | None) -> str:
    """The answer inside a model output: the first group (or whole match) of `pattern`, else the stripped text."""
    if not pattern:
        return text.strip()
    m = re.search(pattern, text, flags=re.DOTALL)
    if not m:
        return text.strip()
    return (m.group(1) if m.groups() else m.group(0)).strip()


def _gold_index(task: Task, row: dict, choices: list[str]) -> int:
    label = row.get(task.label_field, row.get(task.answer_field))
    if isinstance(label, int) and 0 <= label < len(choices):
        return label
    if isinstance(label, str):
        if label in choices:
            return choices.index(label)
        if len(label) == 1 and label.upper() in "ABCDEFGHIJ"[: len(choices)]:
            return "ABCDEFGHIJ".index(label.upper())
    raise ConfigError(f"task '{task.name}': row label {label!r} is neither a choice index, a letter, nor a choice")


# ---------------------------------------------------------------------------------------------------- task kinds


def eval_generate(model: EvalModel, task: Task, rows: list[dict], seed: int) -> tuple[dict, list[dict]]:
    prompts = [_prompt_ids(model, task, task.render(r)) for r in rows]
    outputs = model.complete(prompts, _params(task, seed))
    answers = [extract_answer(o, task.extract) for o in outputs]
    refs = [r[task.answer_field] for r in rows]
    scores: dict[str, float] = {}
    per_row: dict[str, list[float]] = {}
    for name in task.metrics:
        if name in ("exact_match", "contains"):
            fn = M.exact_match if name == "exact_match" else M.contains
            per_row[name] = [fn(a, r, task.normalize) for a, r in zip(answers, refs)]
            scores[name] = sum(per_row[name]) / len(rows)
        elif name == "bleu":
            scores["bleu"] = M.bleu(answers, refs, tokenize=task.bleu_tokenize)
        elif name == "rouge":
            scores.update(M.rouge(answers, refs, tokenizer=task.rouge_tokenizer))
    samples = [{"prompt": task.render(r), "output": o, "answer": a, "reference": ref,
                **{k: v[i] for k, v in per_row.items()}} for i, (r, o, a, ref) in
               enumerate(zip(rows, outputs, answers, refs))]
    return scores, samples


def eval_multiple_choice(model: EvalModel, task: Task, rows: list[dict], seed: int) -> tuple[dict, list[dict]]:
    tok = model.tokenizer
    requests, spans, all_choices, gold = [], [], [], []
    for r in rows:
        choices = [str(c) for c in r[task.choices_field]]
        context = task.render(r)
        start = len(requests)
        for c in choices:
            cont = task.continuation.format(**{**r, "choice": c})
            ctx = context
            if ctx.endswith(" ") and cont[:1] not in (" ", ""):  # keep the space with the continuation (one token)
                ctx, cont = ctx.rstrip(" "), " " + cont
            whole, ctx_ids = tok.encode(ctx + cont), tok.encode(ctx)
            if whole[: len(ctx_ids)] == ctx_ids and len(whole) > len(ctx_ids):
                requests.append((ctx_ids, whole[len(ctx_ids):]))
            else:  # the boundary merged into one token: encode the parts separately
                requests.append((ctx_ids, tok.encode(cont, add_special_tokens=False)))
        spans.append((start, len(requests)))
        all_choices.append(choices)
        gold.append(_gold_index(task, r, choices))
    ll = model.loglikelihood(requests)
    per_row = [ll[a:b] for a, b in spans]
    scores = M.choice_accuracy(per_row, all_choices, gold)
    samples = [{"prompt": task.render(r), "choices": c, "loglikelihoods": [round(x, 4) for x in l], "gold": g}
               for r, c, l, g in zip(rows, all_choices, per_row, gold)]
    return scores, samples


def eval_perplexity(model: EvalModel, task: Task, rows: list[dict], seed: int) -> tuple[dict, list[dict]]:
    tok = model.tokenizer
    nll, n = 0.0, 0
    for r in rows:
        ids = tok.encode(r["text"], add_special_tokens=False)
        if task.add_bos and tok.bos_id is not None:
            ids = [tok.bos_id] + ids
        s, c = model.rolling_nll(ids, task.window, task.stride)
        nll, n = nll + s, n + c
    return {"perplexity": perplexity(nll, n), "nll_per_token": nll / max(n, 1), "tokens": n}, []


_CODE_FENCE = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)
CODE_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]


def build_program(prompt: str, completion: str, tests: str, entry_point: str | None, chat: bool) -> str:
    """HumanEval-style program: prompt + completion (or the completion's code block for chat models) + tests,
    then `check(entry_point)` when the tests define `check`."""
    fenced = _CODE_FENCE.search(completion)
    body = fenced.group(1) if fenced else completion
    code = body if (chat or fenced) else prompt + body
    tail = f"\ncheck({entry_point})\n" if entry_point and "def check" in tests else "\n"
    return f"{code}\n\n{tests}{tail}"


def eval_code(model: EvalModel, task: Task, rows: list[dict], seed: int) -> tuple[dict, list[dict]]:
    texts = [task.render(r) for r in rows]
    prompts = [_prompt_ids(model, task, t) for t in texts]
    stops = task.stop or ([] if task.chat else CODE_STOPS)
    outputs = model.complete([p for p in prompts for _ in range(task.n_samples)], _params(task, seed, stops))
    scores = {f"pass@{k}": 0.0 for k in task.k}
    samples, statuses = [], defaultdict(int)
    for i, r in enumerate(rows):
        outs = outputs[i * task.n_samples:(i + 1) * task.n_samples]
        results = [run_program(build_program(texts[i], o, r[task.tests_field], r.get(task.entry_point_field),
                                             task.chat), timeout=task.timeout, memory_mb=task.memory_mb) for o in outs]
        c = sum(res.passed for res in results)
        for res in results:
            statuses[res.status] += 1
        for k in task.k:
            scores[f"pass@{k}"] += M.pass_at_k(task.n_samples, c, k) / len(rows)
        samples.append({"prompt": texts[i], "output": outs[0], "passed": c, "n": task.n_samples,
                        "status": results[0].status, "stderr": results[0].stderr[-300:]})
    scores.update({f"programs_{k}": v for k, v in statuses.items()})
    return scores, samples


def eval_judge(model: EvalModel, task: Task, rows: list[dict], seed: int, judge_model: EvalModel | None
               ) -> tuple[dict, list[dict]]:
    if judge_model is None:
        raise ConfigError(f"task '{task.name}' needs a judge: set judge.model in the task or judge_model=DIR")
    questions = [task.render(r) for r in rows]
    answers = model.complete([_prompt_ids(model, task, q) for q in questions], _params(task, seed))
    refs = [r.get(task.judge.reference_field) for r in rows] if task.judge.reference_field else None
    judge = Judge(judge_model, task.judge.max_new_tokens)
    if task.judge.mode == "rubric":
        ratings, raw = judge.rate(questions, answers, refs)
        valid = [x for x in ratings if x is not None]
        scores = {"judge_score": sum(valid) / len(valid) if valid else float("nan"),
                  "judge_parse_failures": len(ratings) - len(valid)}
        samples = [{"prompt": q, "output": a, "rating": s, "judge": j} for q, a, s, j in
                   zip(questions, answers, ratings, raw[: len(questions)])]
    else:
        baseline = [str(r[task.judge.baseline_field]) for r in rows]
        verdicts, raw = judge.compare(questions, answers, baseline, refs)
        valid = [v for v in verdicts if v is not None]
        wins, ties = valid.count("A"), valid.count("tie")
        scores = {"win_rate": (wins + 0.5 * ties) / len(valid) if valid else float("nan"), "wins": wins,
                  "ties": ties, "losses": valid.count("B"), "judge_parse_failures": len(verdicts) - len(valid)}
        samples = [{"prompt": q, "output": a, "baseline": b, "verdict": v, "judge": raw[2 * i]}
                   for i, (q, a, b, v) in enumerate(zip(questions, answers, baseline, verdicts))]
    return scores, samples


# ---------------------------------------------------------------------------------------------------- driver


def evaluate_task(model: EvalModel, task: Task, *, limit: int | None = None, seed: int = 0,
                  judge_model: EvalModel | None = None, samples: int = 3) -> dict:
    """Run one task; returns {task, type, category, n, metrics, seconds, samples}."""
    rows = task.load_rows()
    rows = rows[:limit] if limit else rows
    t0 = time.perf_counter()
    if task.type == "generate":
        scores, examples = eval_generate(model, task, rows, seed)
    elif task.type == "multiple_choice":
        scores, examples = eval_multiple_choice(model, task, rows, seed)
    elif task.type == "perplexity":
        scores, examples = eval_perplexity(model, task, rows, seed)
    elif task.type == "code":
        scores, examples = eval_code(model, task, rows, seed)
    else:
        scores, examples = eval_judge(model, task, rows, seed, judge_model)
    return {"task": task.name, "type": task.type, "category": task.category, "n": len(rows), "metrics": scores,
            "seconds": round(time.perf_counter() - t0, 2), "samples": examples[:samples]}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def markdown_table(results: list[dict]) -> str:
    """| task | category | type | n | metric | value | — one line per metric, tasks grouped by category."""
    lines = ["| task | category | type | n | metric | value |", "|---|---|---|---:|---|---:|"]
    for r in sorted(results, key=lambda r: (r["category"] or "~", r["task"])):
        for k, v in r["metrics"].items():
            lines.append(f"| {r['task']} | {r['category'] or ''} | {r['type']} | {r['n']} | {k} | {_fmt(v)} |")
    return "\n".join(lines)


def _missing_requirement(task: Task, cfg: EvalConfig) -> str | None:
    """Why `task` cannot run with this config (checked for every task before any runs), or None."""
    if task.type == "judge" and not (task.judge.model or cfg.judge_model):
        return f"task '{task.name}' needs a judge: set judge.model in the task or judge_model=DIR"
    return None


def _write_report(cfg: EvalConfig, report: dict) -> None:
    """results.json + results.md, each replaced whole (written after every task: finished results are never lost)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table([r for r in report["results"] if "metrics" in r])
    not_run = [f"- {r['task']}: not run ({r['error']})" for r in report["results"] if "error" in r]
    md = "\n\n".join([f"# lmforge eval: {cfg.model}", table, *(["\n".join(not_run)] if not_run else [])]) + "\n"
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(
        json.dumps(report, indent=2, ensure_ascii=False, default=str)))
    atomic_write(out / "results.md", lambda tmp: tmp.write_text(md))


def _run_one(task: Task, cfg: EvalConfig, model: EvalModel, judges: dict, failed: dict) -> dict:
    """One task's result, or its error (recorded in `failed`): one broken task (a judge that fails to load ...)
    does not lose the others."""
    try:
        judge = None
        if task.type == "judge":
            path = task.judge.model or cfg.judge_model
            if path not in judges:
                judges[path] = model if path == cfg.model and not cfg.adapter else LocalModel.load(
                    path, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size)
            judge = judges[path]
        res = evaluate_task(model, task, limit=cfg.limit, seed=cfg.seed, judge_model=judge, samples=cfg.samples)
    except LmforgeError as e:
        failed[task.name] = f"task '{task.name}': {e}"
        print(f"[eval] {task.name} failed: {e}", flush=True)
        return {"task": task.name, "type": task.type, "category": task.category, "error": str(e)}
    shown = ", ".join(f"{k} {_fmt(v)}" for k, v in res["metrics"].items())
    print(f"[eval] {task.name} ({task.type}, n={res['n']}, {res['seconds']}s): {shown}", flush=True)
    return res


def run_eval(cfg: EvalConfig, model: EvalModel | None = None) -> dict:
    """Load the model (unless given), run every task, write results.json + results.md; return the results.

    Every task's requirements are checked before any runs: a task that cannot run (a judge task without a judge)
    is reported at once and skipped, the others run, and the run ends with a one-line error naming what was
    skipped. A task that fails while running is recorded the same way. Results are written after every task."""
    tasks = [t for path in cfg.tasks for t in load_tasks(path)]
    if not tasks:
        raise ConfigError("no tasks: pass task files (YAML or JSONL)")
    for t in tasks:  # fail on a broken file before loading any weights
        t.load_rows()
    missing = {t.name: why for t in tasks if (why := _missing_requirement(t, cfg))}
    for why in missing.values():
        print(f"[eval] skipping: {why}", flush=True)
    if len(missing) == len(tasks):
        raise ConfigError("; ".join(missing.values()))
    if model is None:
        model = LocalModel.load(cfg.model, cfg.adapter, cfg.device, cfg.dtype, cfg.batch_size, cfg.chat_template,
                                cfg.revision)
    judges: dict[str, EvalModel] = {}
    report = {"model": cfg.model, "adapter": cfg.adapter, "config": cfg.model_dump(mode="json"), "results": []}
    failed = dict(missing)
    for task in tasks:
        if task.name in missing:
            res = {"task": task.name, "type": task.type, "category": task.category, "error": missing[task.name]}
        else:
            res = _run_one(task, cfg, model, judges, failed)
        report["results"].append(res)
        if cfg.out:
            _write_report(cfg, report)
    if cfg.out:
        print(f"[eval] wrote {Path(cfg.out) / 'results.json'} and {Path(cfg.out) / 'results.md'}")
    print(markdown_table([r for r in report["results"] if "metrics" in r]))
    if failed:
        ran = len(tasks) - len(failed)
        raise ConfigError(f"{len(failed)} of {len(tasks)} tasks not run ({'; '.join(failed.values())}); the "
                          f"{ran} other{'s' if ran != 1 else ''} finished" +
                          (f" and are in {Path(cfg.out) / 'results.json'}" if cfg.out else ""))
    return report


def split_eval_args(args: list[str]) -> tuple[str | None, list[str]]:
    """`MODEL TASK1 TASK2 ... [key=value | --key value ...]` -> (config path, overrides) for `load_config`:
    the first bare argument is the model, the following bare ones are task files."""
    from ..args import split_args

    bare, rest, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") or "=" in a:
            rest.append(a)
            if a.startswith("--") and "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--") \
                    and a not in ("--debug",):
                rest.append(args[i + 1])
                i += 1
        else:
            bare.append(a)
        i += 1
    config, overrides = split_args(rest)
    if bare:
        overrides.insert(0, f"model={bare[0]}")
    if len(bare) > 1:
        overrides.insert(1, "tasks=[" + ",".join(json.dumps(t) for t in bare[1:]) + "]")
    return config, overrides
