"""Scoring functions: pure Python over strings and numbers, no model involved.

- `exact_match` (SQuAD-style normalisation optional), `contains`
- `bleu`: corpus BLEU from sacrebleu (its `13a` tokenizer, or `zh` for Chinese)
- `rouge`: ROUGE-1/2/L F1 from rouge-score; `tokenizer="chars"` or `"jieba"` makes it work on Chinese, where the
  default tokenizer (ASCII words only) would see no tokens at all
- `pass_at_k`: the unbiased estimator of Chen et al. 2021 (Codex), 1 - C(n-c, k) / C(n, k)
- `choice_accuracy`: multiple-choice accuracy from per-choice log-likelihoods, raw and length-normalised
"""
from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation) | set("，。！？；：、“”‘’（）《》【】—…")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation (ASCII and CJK) and English articles, squeeze whitespace (SQuAD's rule)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _refs(reference: str | Sequence[str]) -> list[str]:
    return [reference] if isinstance(reference, str) else [str(r) for r in reference]


def exact_match(prediction: str, reference: str | Sequence[str], normalize: bool = True) -> float:
    """1.0 if the prediction equals any reference (after `normalize_answer`, or after strip() only)."""
    norm = normalize_answer if normalize else str.strip
    return float(any(norm(prediction) == norm(r) for r in _refs(reference)))


def contains(prediction: str, reference: str | Sequence[str], normalize: bool = True) -> float:
    """1.0 if any reference occurs inside the prediction (e.g. a needle in a long-context probe)."""
    norm = normalize_answer if normalize else str.strip
    return float(any(norm(r) in norm(prediction) for r in _refs(reference)))


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]], tokenize: str = "13a") -> float:
    """Corpus BLEU (0-100) with sacrebleu; each prediction may have several references."""
    import sacrebleu

    refs = [_refs(r) for r in references]
    n_refs = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(n_refs)]  # sacrebleu: one stream per ref
    return float(sacrebleu.corpus_bleu(list(predictions), streams, tokenize=tokenize).score)


class _ListTokenizer:
    """rouge-score tokenizer interface over a function text -> tokens."""

    def __init__(self, fn):
        self.fn = fn

    def tokenize(self, text: str) -> list[str]:
        return [t for t in self.fn(text) if t.strip() and t not in _PUNCT]


def _rouge_tokenizer(name: str):
    if name == "default":
        return None
    if name == "chars":  # every non-space character is a token: CJK text without word segmentation
        return _ListTokenizer(lambda s: list(s.lower()))
    if name == "jieba":
        import jieba

        jieba.setLogLevel(60)
        return _ListTokenizer(lambda s: jieba.lcut(s.lower()))
    if name == "whitespace":
        return _ListTokenizer(lambda s: s.lower().split())
    raise ConfigError(f"rouge_tokenizer '{name}' is not one of default, chars, jieba, whitespace")


def rouge(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
          tokenizer: str = "default") -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (0-1), best reference per prediction. tokenizer: default (rouge-score's ASCII words,
    Porter-stemmed), chars or jieba (Chinese), whitespace."""
    from rouge_score import rouge_scorer

    tok = _rouge_tokenizer(tokenizer)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=tok is None, tokenizer=tok)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        scores = [scorer.score(r, pred) for r in _refs(ref)]
        for k in totals:
            totals[k] += max(s[k].fmeasure for s in scores)
    n = max(len(predictions), 1)
    return {k: v / n for k, v in totals.items()}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) passes: 1 - C(n-c,k)/C(n,k),
    computed as a stable product (Chen et al. 2021)."""
    if k > n:
        raise ConfigError(f"pass@{k} needs at least {k} samples per problem, got n={n}; raise n_samples")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def choice_accuracy(loglikelihoods: Sequence[Sequence[float]], choices: Sequence[Sequence[str]],
                    gold: Sequence[int]) -> dict[str, float]:
    """acc: argmax of summed log-likelihood; acc_norm: argmax of log-likelihood per character of the choice text
    (lm-evaluation-harness's acc_norm), which stops long answers from losing just for being long."""
    acc = norm = 0
    for ll, ch, g in zip(loglikelihoods, choices, gold):
        acc += int(np.argmax(ll)) == g
        norm += int(np.argmax([x / max(len(c), 1) for x, c in zip(ll, ch)])) == g
    n = max(len(gold), 1)
    return {"acc": acc / n, "acc_norm": norm / n}
