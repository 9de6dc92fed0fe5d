"""Chain-of-thought: few-shot prompts with worked reasoning, answer extraction, and self-consistency voting.

Self-consistency (Wang et al., 2022): sample n reasoning paths at a temperature above zero, take each one's final
answer, and return the majority; answers are normalized first ("42.0", "42", "$42" vote together).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .llm import ChatModel

COT_INSTRUCTION = ("Solve the problem. Think step by step, then give the final answer on its own line as "
                   "'The answer is X.'")


@dataclass
class CotExample:
    question: str
    reasoning: str
    answer: str


def cot_messages(question: str, examples: Sequence[CotExample] = (), instruction: str = COT_INSTRUCTION,
                 zero_shot_trigger: str = "Let's think step by step.") -> list[dict]:
    """Few-shot CoT as chat turns: each example's question, then its reasoning ending in 'The answer is X.'; with
    no examples, the zero-shot trigger is appended to the question instead."""
    messages = [{"role": "system", "content": instruction}]
    for ex in examples:
        messages += [{"role": "user", "content": ex.question},
                     {"role": "assistant", "content": f"{ex.reasoning.strip()}\nThe answer is {ex.answer}."}]
    content = question if examples else f"{question}\n{zero_shot_trigger}"
    return messages + [{"role": "user", "content": content}]


_ANSWER_IS = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|answer\s*:)\s*(.+?)(?:\.\s*$|\.\s+|\n|$)", re.I | re.M)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The answer a reasoning text ends with: after the last 'The answer is' / 'Answer:', else its last number."""
    found = _ANSWER_IS.findall(text)
    if found:
        return found[-1].strip().strip("*").strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """For voting: a number becomes its canonical form (1,000.0 → 1000); other text is lower-cased, trimmed of
    punctuation and articles."""
    a = answer.strip().strip(".").strip()
    num = _NUMBER.fullmatch(a.replace("$", "").replace("%", "").strip())
    if num:
        value = float(num.group().replace(",", ""))
        return str(int(value)) if value.is_integer() else f"{value:g}"
    a = re.sub(r"^(the|a|an)\s+", "", a.lower())
    return re.sub(r"[\s.!?\"']+$", "", a)


@dataclass
class Vote:
    answer: str | None  # the majority's normalized answer (None if no sample had one)
    counts: dict[str, int]  # normalized answer → votes
    samples: list[str]  # every sampled reasoning text

    @property
    def agreement(self) -> float:
        return (self.counts.get(self.answer, 0) / len(self.samples)) if self.samples and self.answer else 0.0


def majority_vote(samples: Sequence[str]) -> Vote:
    """The most common normalized answer among reasoning texts (ties: the one reached first)."""
    answers = [normalize_answer(a) for a in map(extract_answer, samples) if a]
    counts = Counter(answers)
    best = max(counts, key=lambda a: (counts[a], -answers.index(a))) if counts else None
    return Vote(best, dict(counts), list(samples))


def self_consistency(llm: ChatModel, question: str, examples: Sequence[CotExample] = (), n: int = 5,
                     temperature: float = 0.7, max_tokens: int = 256, seed: int | None = 0) -> Vote:
    """Sample n chains of thought in one request (`n`, seeded) and return the majority answer."""
    reply = llm.chat(cot_messages(question, examples), n=n, temperature=temperature, max_tokens=max_tokens,
                     seed=seed)
    return majority_vote(reply.choices)
