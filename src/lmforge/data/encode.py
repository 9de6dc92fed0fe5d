"""Token ids and pre-shifted labels for documents (pretraining) and conversations (SFT).

Labels are pre-shifted: ``labels[t]`` is the id the model must predict after seeing ``tokens[: t + 1]``, or -100 where
there is no loss, so a sample is ``labels = tokens[1:] + [-100]`` with masked targets set to -100. The trainer computes
``cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100)`` with no shift, and packing concatenates
samples as they are.

Conversations are rendered once with the tokenizer's chat template and tokenized once with character offsets; a target
token is trained iff its characters lie inside an assistant span. The span of assistant turn i is
``[len(render(messages[:i], add_generation_prompt=True)), len(render(messages[:i+1])))`` minus trailing whitespace:
the assistant's content plus the template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``), so the model learns to
stop, but not the layout newline after it, which generation never produces.
"""
from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from dataclasses import dataclass

import jinja2

from lmforge.data.formats import BadRecord, Conversation, Document

__all__ = ["Sample", "IGNORE", "shifted_labels", "assistant_spans", "encode_documents", "encode_conversations",
           "fit_length"]

IGNORE = -100


@dataclass
class Sample:
    """One encoded sample: ``tokens`` (T,) and pre-shifted ``labels`` (T,), python int lists; ``source`` (file, row)."""

    tokens: list[int]
    labels: list[int]
    source: tuple[str, int] = ("", 0)

    @property
    def num_targets(self) -> int:
        return sum(1 for y in self.labels if y != IGNORE)


def shifted_labels(tokens: Sequence[int], trained: Sequence[bool] | None = None) -> list[int]:
    """``labels[t] = tokens[t + 1]`` where ``trained[t + 1]`` (default: all), else -100; the last label is -100."""
    n = len(tokens)
    if trained is None:
        return [*tokens[1:], IGNORE][:n]
    return [tokens[t + 1] if trained[t + 1] else IGNORE for t in range(n - 1)] + ([IGNORE] if n else [])


# ------------------------------------------------------------------------------------------------ documents


def encode_documents(docs: Sequence[Document], tokenizer) -> list[Sample]:
    """``[bos] + encode(text) + [eos]`` per document (bos/eos only where the tokenizer has them), every target trained.

    Special tokens are added here, not by the tokenizer's post-processor (``add_special_tokens=False``), so the layout
    is the same for every tokenizer.
    """
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    encodings = tokenizer.backend.encode_batch([d.text for d in docs], add_special_tokens=False)
    out = []
    for doc, enc in zip(docs, encodings):
        tokens = bos + list(enc.ids) + eos
        out.append(Sample(tokens, shifted_labels(tokens), doc.source))
    return out


# ------------------------------------------------------------------------------------------------ conversations


def _locate(text: str, piece: str, cursor: int) -> tuple[int, int]:
    """The first place at or after ``cursor`` where the longest possible prefix of ``piece`` occurs in ``text``.

    A template that renders a turn differently once it is no longer the last one (e.g. an end token only after the
    final message) still matches up to the difference. Returns ``(start, end)``; ``start == end`` if nothing matches.
    """
    lo, hi = 0, len(piece)  # largest k such that piece[:k] occurs (occurrence is monotone in k)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if text.find(piece[:mid], cursor) >= 0 else (lo, mid - 1)
    start = text.find(piece[:lo], cursor)
    return start, start + lo


def assistant_spans(tokenizer, messages: list[dict],
                    tools: list | None = None) -> tuple[str, list[tuple[int, int]], bool]:
    """Render ``messages`` and find the character span of every assistant turn in the rendered text.

    Returns ``(text, spans, prefix_stable)``. When the template is prefix-stable (each prefix rendering is a prefix of
    the full text) spans come straight from prefix lengths. Otherwise each assistant turn is rendered on its own
    (``render(messages[:i+1])`` from the turn's content on) and the longest prefix of that piece is located in the
    full text, in order; a turn whose content cannot be found that way raises :class:`BadRecord`. Template errors
    (``raise_exception``, Jinja errors) raise BadRecord too.
    """

    def render(msgs: list[dict], gen: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tools=tools, tokenize=False)
        except jinja2.TemplateError as e:
            raise BadRecord(f"chat template failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    text = render(messages, False)
    spans: list[tuple[int, int]] = []
    stable, cursor, turn = True, 0, 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        if upto.startswith(prompt) and text.startswith(upto) and len(prompt) >= cursor:
            start, end = len(prompt), len(upto)
        else:
            stable = False
            # This turn as the template renders it, from its content on (templates may trim the content).
            first = upto.find(m["content"].strip(), len(os.path.commonprefix([prompt, upto])))
            if first < 0:
                raise BadRecord(f"assistant turn {turn} content not found in the template's rendering")
            start, end = _locate(text, upto[first:], cursor)
            if end <= start or m["content"].strip() not in text[start:end]:
                raise BadRecord(f"assistant turn {turn} not found in the rendered conversation (template rewrites it)")
        end = start + len(text[start:end].rstrip())
        spans.append((start, end))
        cursor, turn = end, turn + 1
    return text, spans, stable


def _trained_tokens(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Whether each token's character span ``[s, e)`` lies inside one of ``spans`` (sorted, disjoint).

    A zero-width token (some tokenizers trim whitespace offsets) counts as inside when ``a <= s < b``.
    """
    starts = [a for a, _ in spans]
    out = []
    for s, e in offsets:
        k = bisect.bisect_right(starts, s) - 1  # the last span starting at or before s
        out.append(k >= 0 and s < spans[k][1] and e <= spans[k][1])
    return out


def encode_conversations(convs: Sequence[Conversation], tokenizer, train_on_prompt: bool = False,
                         on_bad=None) -> tuple[list[Sample], int]:
    """Encode conversations; returns ``(samples, n_not_prefix_stable)``.

    Each conversation is rendered with the chat template and tokenized once (``backend.encode(text,
    add_special_tokens=False)``: templates write their own bos); only assistant-span targets are trained unless
    ``train_on_prompt``. Conversations the template rejects go to ``on_bad(file, row, reason)``.
    """
    rendered: list[tuple[Conversation, str, list[tuple[int, int]]]] = []
    unstable = 0
    for conv in convs:
        try:
            text, spans, stable = assistant_spans(tokenizer, conv.messages, conv.tools)
        except BadRecord as e:
            if on_bad is not None:
                on_bad(conv.source[0], conv.source[1], str(e))
            continue
        unstable += not stable
        rendered.append((conv, text, spans))
    encodings = tokenizer.backend.encode_batch([t for _, t, _ in rendered], add_special_tokens=False)
    out = []
    for (conv, _, spans), enc in zip(rendered, encodings):
        tokens = list(enc.ids)
        trained = None if train_on_prompt else _trained_tokens(enc.offsets, spans)
        out.append(Sample(tokens, shifted_labels(tokens, trained), conv.source))
    return out, unstable


# ------------------------------------------------------------------------------------------------ length


def fit_length(sample: Sample, max_len: int, mode: str) -> tuple[list[Sample], str]:
    """Make ``sample`` fit in ``max_len`` tokens. ``mode``: ``right`` (keep the start), ``drop``, or ``chunk`` (split
    into consecutive ``max_len`` pieces, each with positions restarting at 0).

    Returns ``(pieces, status)`` with status ``ok | truncated | chunked | dropped | empty`` (``empty``: no trained
    target left). A cut keeps the label at the cut (the true next token), so chunking loses no target.
    """
    n = len(sample.tokens)
    if n <= max_len:
        pieces, status = [sample], "ok"
    elif mode == "drop":
        return [], "dropped"
    elif mode == "chunk":
        pieces = [Sample(sample.tokens[i: i + max_len], sample.labels[i: i + max_len], sample.source)
                  for i in range(0, n, max_len)]
        status = "chunked"
    else:
        pieces, status = [Sample(sample.tokens[:max_len], sample.labels[:max_len], sample.source)], "truncated"
    pieces = [p for p in pieces if p.num_targets]
    return (pieces, status) if pieces else ([], "empty")
