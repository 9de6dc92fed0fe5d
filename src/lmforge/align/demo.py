"""A preference task with a known answer, on the quickstart's reverse-letters task: what the alignment tests, the
example (`examples/align_pipeline.py`) and docs/alignment.md run.

The SFT model answers ``reverse: a b c`` with ``reversed: c b a``. The hidden preference: replies that mention the
target letter ``z`` are better. Preference pairs are (the reversal with one letter replaced by ``z``, the plain
reversal) on prompts without ``z``; the known reward is 1 when the reply mentions ``z``, else 0. A reward model has to
find the rule from pairs; DPO and PPO have to make greedy replies follow it, which they never do by chance on prompts
without ``z`` beyond the SFT model's mistakes.
"""
from __future__ import annotations

import json
import random
import string
from collections.abc import Sequence
from pathlib import Path

from ..infer import SamplingParams, generate

__all__ = [
    "TARGET",
    "greedy_replies",
    "greedy_reward",
    "make_task_files",
    "mentions_target",
    "reply_letters",
    "reversal_credit",
]

TARGET = "z"
LETTERS = [c for c in string.ascii_lowercase if c != TARGET]


def reply_letters(text: str) -> list[str]:
    """The letters of a reply ``reversed: c b a`` (everything after the first colon)."""
    return text.split(":", 1)[-1].split()


def mentions_target(prompts: Sequence, completions: Sequence[str]) -> list[float]:
    """The known reward (a `ppo.reward_fn`): 1.0 when the reply's letters include the target letter."""
    return [float(TARGET in reply_letters(c)) for c in completions]


def reversal_credit(prompts: Sequence, completions: Sequence[str]) -> list[float]:
    """Share of letters in the right place of the reversal (1.0 = exact); prompts are message lists."""
    out = []
    for messages, reply in zip(prompts, completions):
        want = messages[-1]["content"].split(":", 1)[-1].split()[::-1]
        got = reply_letters(reply)
        out.append(sum(a == b for a, b in zip(want, got)) / max(len(want), len(got), 1))
    return out


def _letters(rng: random.Random, min_len: int, max_len: int) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len))]


def _pair(rng: random.Random, min_len: int, max_len: int) -> dict:
    s = _letters(rng, min_len, max_len)
    answer = s[::-1]
    marked = list(answer)
    marked[rng.randrange(len(marked))] = TARGET
    return {"prompt": "reverse: " + " ".join(s), "chosen": "reversed: " + " ".join(marked),
            "rejected": "reversed: " + " ".join(answer)}


def make_task_files(out: str | Path, n_pairs: int = 800, n_val: int = 200, n_prompts: int = 800, seed: int = 1,
                    min_len: int = 3, max_len: int = 5) -> dict[str, Path]:
    """Preference pairs (train/val JSONL, prompt/chosen/rejected) and PPO prompts (train/val JSONL, prompt), all on
    prompts without the target letter, written to `out`."""
    rng = random.Random(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {k: out / f"{k}.jsonl" for k in ("pairs", "pairs_val", "prompts", "prompts_val")}
    rows = {"pairs": [_pair(rng, min_len, max_len) for _ in range(n_pairs)],
            "pairs_val": [_pair(rng, min_len, max_len) for _ in range(n_val)],
            "prompts": [{"prompt": "reverse: " + " ".join(_letters(rng, min_len, max_len))} for _ in range(n_prompts)],
            "prompts_val": [{"prompt": "reverse: " + " ".join(_letters(rng, min_len, max_len))} for _ in range(n_val)]}
    for k, path in files.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[k]))
    return files


def greedy_replies(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy replies of `model` (a Transformer) to user prompts, through the chat template."""
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
           for p in prompts]
    outs = generate(model, ids, SamplingParams(temperature=0, max_new_tokens=max_new_tokens), tokenizer=tokenizer)
    return [o.text for o in outs]


def greedy_reward(model, tokenizer, prompts: Sequence[str], reward=mentions_target) -> float:
    """Mean known reward of greedy replies to `prompts`."""
    replies = greedy_replies(model, tokenizer, prompts)
    messages = [[{"role": "user", "content": p}] for p in prompts]
    return sum(reward(messages, replies)) / max(len(prompts), 1)
