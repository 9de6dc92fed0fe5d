"""Split documents into retrieval chunks: at most `max_tokens` each, `overlap` tokens carried between neighbours.

Boundaries, strongest first: a heading (a Markdown `#` line; HTML headings arrive as such) always starts a new chunk
and chunks never span two sections (the heading line itself is not in the chunk's text: it is its `heading`
path, which `embed_text` puts first); then paragraph breaks and sentence ends (`. ! ?` before whitespace, and the
Chinese `。！？`, which need none); a single sentence longer than `max_tokens` is cut between words (or between
characters for CJK text). A chunk's text is an exact slice of its document, so a cited passage can be found again.

Token counts come from the embedder's own tokenizer when it has one (chunks then fit its window), else from
`simple_token_count` (words, numbers, punctuation marks and each CJK character count one). Counts of neighbouring
sentences are added, not recounted, which can differ from the joined count by a token or so at a seam.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ConfigError
from .documents import Document

TokenCounter = Callable[[str], int]

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_SIMPLE_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")
_ATOM = re.compile(rf"[{_CJK}][^\S\n]*|[^\s{_CJK}]+\s*")  # a word with its trailing space, or one CJK character
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
# A sentence ends after . ! ? (then closing quotes/brackets) followed by whitespace, after 。！？ (then closers), or at
# a blank line.
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]’”]*(?=\s)|[。！？]+[”’」』）)]*|\n[ \t]*\n")


def simple_token_count(text: str) -> int:
    """Rough token count without a tokenizer: words, numbers, punctuation marks and CJK characters count one."""
    return len(_SIMPLE_TOKEN.findall(text))


def tokenizer_counter(tokenizer) -> TokenCounter:
    """A counter from a `tokenizers.Tokenizer` (special tokens and any padding it is set up for not counted; turn
    its truncation off, as `embeddings` does, or long texts count as the truncation length)."""
    return lambda text: sum(tokenizer.encode(text, add_special_tokens=False).attention_mask)


@dataclass
class Chunk:
    text: str
    source: str  # the document's source path
    position: int  # index of this chunk within its document
    start: int  # character offsets of `text` in the document
    end: int
    heading: str = ""  # heading path of the section, "Install > From source"
    metadata: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.source}#{self.position}"

    @property
    def embed_text(self) -> str:
        """What gets embedded and keyword-indexed: the heading path, then the text."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


@dataclass
class _Unit:  # a sentence (or a piece of one) of a section
    start: int
    end: int
    tokens: int


def _sections(text: str) -> list[tuple[int, int, str]]:
    """(start, end, heading path) of each section; a section begins at its heading line."""
    cuts = [(m.start(), len(m.group(1)), m.group(2).strip()) for m in _HEADING.finditer(text)]
    if not cuts or cuts[0][0] > 0:
        cuts.insert(0, (0, 0, ""))
    path: list[tuple[int, str]] = []  # (level, title) stack
    out = []
    for i, (start, level, title) in enumerate(cuts):
        if level:
            path = [p for p in path if p[0] < level] + [(level, title)]
        end = cuts[i + 1][0] if i + 1 < len(cuts) else len(text)
        out.append((start, end, " > ".join(t for _, t in path)))
    return out


def _stripped(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _units(text: str, start: int, end: int, max_tokens: int, count: TokenCounter) -> list[_Unit]:
    """Sentences of a section's body (its heading line left out: it is the chunk's `heading`); long ones cut."""
    if _HEADING.match(text, start):
        line_end = text.find("\n", start, end)
        start = end if line_end < 0 else line_end
    bounds = [start, *(m.end() for m in _SENTENCE_END.finditer(text, start, end)), end]
    units = []
    for a, b in zip(bounds, bounds[1:]):
        a, b = _stripped(text, a, b)
        if a == b:
            continue
        n = count(text[a:b])
        units.extend([_Unit(a, b, n)] if n <= max_tokens else _split_long(text, a, b, max_tokens, count))
    return units


def _split_long(text: str, start: int, end: int, max_tokens: int, count: TokenCounter) -> list[_Unit]:
    """Cut one over-long sentence between words (between characters for CJK)."""
    pieces: list[_Unit] = []
    cur_start, cur_end, cur_tokens = start, start, 0
    for m in _ATOM.finditer(text, start, end):
        n = count(m.group())
        if cur_tokens and cur_tokens + n > max_tokens:
            pieces.append(_Unit(*_stripped(text, cur_start, cur_end), cur_tokens))
            cur_start, cur_tokens = m.start(), 0
        cur_end, cur_tokens = m.end(), cur_tokens + n  # (a single atom over the limit stays whole)
    if cur_tokens:
        pieces.append(_Unit(*_stripped(text, cur_start, cur_end), cur_tokens))
    return pieces


def _pack(units: list[_Unit], max_tokens: int, overlap: int) -> list[list[_Unit]]:
    """Greedy: fill a chunk with whole units; the next one starts with the previous chunk's last units (≤ overlap
    tokens) when they fit beside the unit that did not."""
    chunks: list[list[_Unit]] = []
    cur: list[_Unit] = []
    for u in units:
        if cur and sum(x.tokens for x in cur) + u.tokens > max_tokens:
            chunks.append(cur)
            carry: list[_Unit] = []
            for x in reversed(cur[1:]):  # never carry a whole chunk (no progress)
                if sum(c.tokens for c in carry) + x.tokens > overlap:
                    break
                carry.insert(0, x)
            while carry and sum(c.tokens for c in carry) + u.tokens > max_tokens:
                carry.pop(0)
            cur = carry
        cur.append(u)
    if cur:
        chunks.append(cur)
    return chunks


def chunk_text(text: str, max_tokens: int = 200, overlap: int = 40,
               count_tokens: TokenCounter | None = None) -> list[tuple[int, int, str]]:
    """(start, end, heading path) of each chunk of `text`."""
    if max_tokens < 1:
        raise ConfigError(f"chunk max_tokens must be at least 1 (got {max_tokens})")
    if not 0 <= overlap < max_tokens:
        raise ConfigError(f"chunk overlap must be between 0 and max_tokens - 1 = {max_tokens - 1} (got {overlap})")
    count = count_tokens or simple_token_count
    out = []
    for s_start, s_end, heading in _sections(text):
        units = _units(text, s_start, s_end, max_tokens, count)
        for group in _pack(units, max_tokens, overlap):
            out.append((group[0].start, group[-1].end, heading))
    return out


def chunk_document(doc: Document, max_tokens: int = 200, overlap: int = 40,
                   count_tokens: TokenCounter | None = None) -> list[Chunk]:
    """The chunks of one document, with source, position, offsets and heading path."""
    spans = chunk_text(doc.text, max_tokens, overlap, count_tokens)
    return [Chunk(doc.text[a:b], doc.source, i, a, b, heading, dict(doc.metadata)) for i, (a, b, heading)
            in enumerate(spans)]


def chunk_documents(docs: list[Document], max_tokens: int = 200, overlap: int = 40,
                    count_tokens: TokenCounter | None = None) -> list[Chunk]:
    return [c for d in docs for c in chunk_document(d, max_tokens, overlap, count_tokens)]
