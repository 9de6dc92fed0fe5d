"""LLM-as-judge: a judge model (any `EvalModel`, e.g. a local lmforge checkpoint) rates answers.

Two protocols, as in the GPT-4-feedback evaluations of Vicuna / MT-Bench:

- **rubric**: rate one answer from 1 to 10 (optionally against a reference answer); the judge is asked to end with
  ``Rating: [[N]]``, and `parse_rating` also accepts "8/10", "Score: 7", "rating of 6" and a lone number.
- **pairwise**: which of two answers is better; asked for ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie). Each pair is
  judged in both orders to cancel the judge's position bias: a winner must win both, otherwise it is a tie.

Unparseable verdicts are counted (``judge_parse_failures``), never silently scored.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from ..infer import SamplingParams

RUBRIC_PROMPT = """You are an impartial judge. Assess the quality of the assistant's answer to the user's question below: \
helpfulness, correctness, relevance, depth and clarity.{ref_hint} Give a short justification, then rate the answer \
from 1 (useless) to 10 (excellent) on the last line in exactly this form: Rating: [[N]]

[Question]
{question}
{reference}
[Answer]
{answer}
[End of answer]"""

PAIRWISE_PROMPT = """You are an impartial judge. Compare the two assistants' answers to the user's question below and \
decide which one answers it better (helpfulness, correctness, relevance, depth, clarity). Ignore the order in which \
they appear and their length.{ref_hint} Explain briefly, then give your verdict on the last line in exactly this \
form: [[A]] if assistant A is better, [[B]] if assistant B is better, [[C]] for a tie.

[Question]
{question}
{reference}
[Assistant A]
{answer_a}
[End of assistant A]

[Assistant B]
{answer_b}
[End of assistant B]"""

_RATING_PATTERNS = [
    r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]",
    r"\[\s*(\d+(?:\.\d+)?)\s*\]",
    r"(?:rating|score|grade)\s*(?:is|of|:|：|=)?\s*(\d+(?:\.\d+)?)",
    r"(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b",
    r"(?:评分|得分|分数)\s*[:：为是]?\s*(\d+(?:\.\d+)?)",
]


def parse_rating(text: str, low: float = 1, high: float = 10) -> float | None:
    """The judge's 1-10 rating from free text, or None. The last match of the most explicit pattern wins."""
    for pattern in _RATING_PATTERNS:
        hits = [float(m) for m in re.findall(pattern, text, flags=re.IGNORECASE)]
        hits = [h for h in hits if low <= h <= high]
        if hits:
            return hits[-1]
    numbers = {float(m) for m in re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)(?![\d.])", text)}
    numbers = {n for n in numbers if low <= n <= high}
    return numbers.pop() if len(numbers) == 1 else None


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' from a pairwise judgement, or None."""
    hits = re.findall(r"\[\[\s*([ABC])\s*\]\]", text)
    if hits:
        return {"A": "A", "B": "B", "C": "tie"}[hits[-1]]
    low = text.lower()
    if re.search(r"\b(tie|equally good|both are equally)\b", low):
        return "tie"
    says = re.findall(r"(?:assistant|answer|response)\s+([ab])\s+(?:is|was)\s+(?:better|superior|preferred)", low)
    if says:
        return says[-1].upper()
    bare = re.fullmatch(r"\W*([AB])\W*", text.strip())
    return bare.group(1) if bare else None


class Judge:
    """Rates answers with a judge model; prompts go through the judge tokenizer's chat template when it has one."""

    def __init__(self, model, max_new_tokens: int = 256):
        self.model = model
        self.params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)

    def _ids(self, text: str) -> list[int]:
        tok = self.model.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=True)
        return tok.encode(text)

    @staticmethod
    def _reference(reference: str | None) -> tuple[str, str]:
        if not reference:
            return "", ""
        return " Use the reference answer to check correctness.", f"\n[Reference answer]\n{reference}\n[End of reference]\n"

    def rate(self, questions: Sequence[str], answers: Sequence[str],
             references: Sequence[str | None] | None = None) -> tuple[list[float | None], list[str]]:
        """1-10 ratings (None where unparseable) and the judge's raw outputs."""
        refs = references or [None] * len(questions)
        prompts = []
        for q, a, r in zip(questions, answers, refs):
            hint, ref = self._reference(r)
            prompts.append(self._ids(RUBRIC_PROMPT.format(question=q, answer=a, reference=ref, ref_hint=hint)))
        outs = self.model.complete(prompts, self.params)
        return [parse_rating(o) for o in outs], outs

    def compare(self, questions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str],
                references: Sequence[str | None] | None = None) -> tuple[list[str | None], list[str]]:
        """'A' / 'B' / 'tie' per question (None where unparseable), judged in both orders."""
        refs = references or [None] * len(questions)
        prompts = []
        for q, a, b, r in zip(questions, answers_a, answers_b, refs):
            hint, ref = self._reference(r)
            for x, y in ((a, b), (b, a)):
                prompts.append(self._ids(PAIRWISE_PROMPT.format(question=q, answer_a=x, answer_b=y, reference=ref,
                                                                ref_hint=hint)))
        outs = self.model.complete(prompts, self.params)
        verdicts = []
        for i in range(len(questions)):
            first, swapped = parse_verdict(outs[2 * i]), parse_verdict(outs[2 * i + 1])
            if first is None or swapped is None:
                verdicts.append(None)
                continue
            swapped = {"A": "B", "B": "A", "tie": "tie"}[swapped]  # back to the original order
            verdicts.append(first if first == swapped else "tie")
        return verdicts, outs
