"""Merge a new tokenizer's pieces into a base tokenizer without moving any existing id (Chinese-LLaMA's vocabulary
expansion, for Hugging Face ``tokenizers`` files).

Every piece of the new tokenizer that the base lacks is appended after the base's last id (added tokens included),
so a model trained on the base keeps every embedding row where it was and only grows new rows at the end.

How a piece is appended depends on the base model:

- **BPE** (GPT-2 / Llama-3 / Qwen byte-level, or SentencePiece-style ``▁`` with byte fallback): a token is reachable
  only through merges. Merges apply by rank, and appended merges rank after every existing one, so the base's merges
  run to completion first. For each new piece we therefore segment it with the merges the merged tokenizer already
  has, then append the merges that join those segments left to right. A join whose result is not itself a new piece
  adds an intermediate "bridge" token (counted in the report); a character the base alphabet lacks is added as a
  single-symbol token.
- **Unigram**: the piece is appended with the new tokenizer's log-probability score (or, for BPE pieces, which have
  none, the base's lowest score), and Viterbi segmentation picks it up wherever it wins.

Pieces are carried between tokenizers as bytes, then written in the base's alphabet (byte-level symbols, or ``▁``
for spaces), so a byte-level BPE and a SentencePiece-style unigram merge either way. Pieces the base's
pre-tokenizer would split (a word plus punctuation, inner spaces) could never be produced and are skipped.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import tokenizers
from tokenizers import pre_tokenizers

from lmforge.errors import CheckpointError, ConfigError

__all__ = ["MergeReport", "merge_tokenizers", "merge_tokenizer_dirs", "tokens_per_char", "subtoken_ids",
           "bpe_segment", "id_span", "EXPANSION_FILE"]

EXPANSION_FILE = "vocab_expansion.json"  # written beside a merged tokenizer / resized checkpoint: base size, counts
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte-fallback pieces
_SP_SPACE = "▁"


# ------------------------------------------------------------------------------------------------- alphabets


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level BPE alphabet)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    assert set(out.values()) == set(alphabet)
    return out


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _components(node: dict | None) -> Iterator[dict]:
    """A normalizer / pre-tokenizer / decoder JSON node and, for a Sequence, its members (recursively)."""
    if not node:
        return
    yield node
    for key in ("pretokenizers", "normalizers", "decoders"):
        for child in node.get(key) or []:
            yield from _components(child)


def _alphabet(spec: dict) -> str:
    """How a tokenizer's model spells text: 'bytelevel' (GPT-2 byte symbols), 'metaspace' (spaces as ▁) or 'plain'."""
    if any(c.get("type") == "ByteLevel" for c in _components(spec.get("pre_tokenizer"))):
        return "bytelevel"
    metaspace_pre = any(c.get("type") == "Metaspace" for c in _components(spec.get("pre_tokenizer")))
    replaces_space = any(c.get("type") == "Replace" and c.get("content") == _SP_SPACE
                         for c in _components(spec.get("normalizer")))
    return "metaspace" if metaspace_pre or replaces_space else "plain"


def _piece_bytes(piece: str, alphabet: str) -> bytes | None:
    """The raw bytes a model piece stands for; None for byte-fallback pieces (every base has its own)."""
    if alphabet == "bytelevel":
        if not all(c in CHAR_TO_BYTE for c in piece):
            return None
        return bytes(CHAR_TO_BYTE[c] for c in piece)
    if _BYTE_PIECE.match(piece):
        return None
    return piece.replace(_SP_SPACE, " ").encode("utf-8") if alphabet == "metaspace" else piece.encode("utf-8")


def _spell(raw: bytes, alphabet: str) -> str | None:
    """``raw`` in a model's alphabet; None when it cannot be written there (partial UTF-8 outside byte-level)."""
    if alphabet == "bytelevel":
        return "".join(BYTE_TO_CHAR[b] for b in raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.replace(" ", _SP_SPACE) if alphabet == "metaspace" else text


# ------------------------------------------------------------------------------------------------------ BPE


def bpe_segment(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Split ``word`` (in the model's alphabet) into characters and apply merges by rank, lowest first, leftmost
    first among equals: what ``tokenizers``' BPE model does to one pre-token (without dropout)."""
    parts = list(word)
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get((parts[i], parts[i + 1]))
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    """Merges as pairs, from either serialization ("a b" strings, older tokenizers; [a, b] lists, newer)."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges", [])]


# ----------------------------------------------------------------------------------------------------- merging


@dataclass
class MergeReport:
    """What ``merge_tokenizers`` did."""

    base_vocab_size: int
    """Ids of the base tokenizer (added tokens included); every one is unchanged in the merged tokenizer."""
    vocab_size: int
    """Ids of the merged tokenizer."""
    candidates: int
    """Pieces of the new tokenizer (special and byte-fallback pieces excluded)."""
    already_present: int
    added: int
    """New pieces appended."""
    bridges: int
    """Extra tokens added only so a new piece can be reached (BPE intermediates, missing base characters)."""
    skipped: int
    """Pieces the base cannot produce (split by its pre-tokenizer, or not expressible in its alphabet)."""
    merges_added: int = 0
    tokens_per_char_before: float | None = None
    tokens_per_char_after: float | None = None
    sample_chars: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        line = (f"merged vocabulary: {self.base_vocab_size:,} -> {self.vocab_size:,} ids ({self.added:,} new pieces, "
                f"{self.bridges:,} bridge tokens; {self.already_present:,} already present, {self.skipped:,} "
                "unreachable skipped)")
        if self.tokens_per_char_before is not None:
            ratio = self.tokens_per_char_after / self.tokens_per_char_before
            line += (f"\ntokens per character on the sample ({self.sample_chars:,} chars): "
                     f"{self.tokens_per_char_before:.3f} -> {self.tokens_per_char_after:.3f} ({ratio:.2f}x)")
        return line


def _new_pieces(spec: dict) -> Iterator[tuple[str, float | None]]:
    """(piece, unigram score or None) of a tokenizer's model vocabulary, in the order it learned them: id order for
    BPE (merge order: a piece's parts come first), descending score for unigram."""
    model = spec["model"]
    if model["type"] == "BPE":
        for piece, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
            yield piece, None
    elif model["type"] == "Unigram":
        for piece, score in sorted(model["vocab"], key=lambda ps: -ps[1]):
            yield piece, score
    else:
        raise ConfigError(f"new tokenizer: model type {model['type']} is not supported; train a bpe or unigram one")


def _single_pretoken(base: tokenizers.Tokenizer, raw: bytes) -> bool:
    """Whether the base's pre-tokenizer keeps this text in one piece (else no token can span it)."""
    pre = base.pre_tokenizer
    if pre is None:
        return True
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return True  # part of one character: always inside a single pre-token
    return len(pre.pre_tokenize_str(text)) == 1


def merge_tokenizers(base: tokenizers.Tokenizer, new: tokenizers.Tokenizer,
                     max_new_pieces: int | None = None) -> tuple[tokenizers.Tokenizer, MergeReport]:
    """A copy of ``base`` with the pieces of ``new`` it lacks appended after its last id (``max_new_pieces`` first
    pieces at most). Neither input is modified; every id of ``base`` means the same token afterwards."""
    spec = json.loads(base.to_str())
    new_spec = json.loads(new.to_str())
    model = spec["model"]
    if model["type"] not in ("BPE", "Unigram"):
        raise ConfigError(f"base tokenizer: model type {model['type']} is not supported; lmforge merges into BPE "
                          "and Unigram tokenizers")
    if model["type"] == "BPE" and (model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")):
        raise ConfigError("base tokenizer: BPE with continuing_subword_prefix/end_of_word_suffix is not supported")
    base_alpha, new_alpha = _alphabet(spec), _alphabet(new_spec)
    base_size = id_span(base)
    specials = {t.content for t in new.get_added_tokens_decoder().values()}
    report = MergeReport(base_vocab_size=base_size, vocab_size=base_size, candidates=0, already_present=0, added=0,
                         bridges=0, skipped=0)

    existing: set[str] = set(model["vocab"]) if model["type"] == "BPE" else {p for p, _ in model["vocab"]}
    wanted: list[tuple[str, float | None]] = []
    for piece, score in _new_pieces(new_spec):
        raw = None if piece in specials else _piece_bytes(piece, new_alpha)
        if not raw:
            continue
        report.candidates += 1
        spelled = _spell(raw, base_alpha)
        if spelled is None or not _single_pretoken(base, raw):
            report.skipped += 1
        elif spelled in existing:
            report.already_present += 1
        else:
            wanted.append((spelled, score))
            existing.add(spelled)
    if max_new_pieces is not None:
        wanted = wanted[:max_new_pieces]

    if model["type"] == "BPE":
        _append_bpe(model, wanted, base_size, report)
    else:
        _append_unigram(model, wanted, base_size, report)
    merged = tokenizers.Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    report.vocab_size = id_span(merged)
    return merged, report


def id_span(tokenizer) -> int:
    """Largest id + 1 (added tokens included): the embedding rows a model needs for ``tokenizer``."""
    backend = getattr(tokenizer, "backend", tokenizer)
    return max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1


def _append_bpe(model: dict, wanted: list[tuple[str, float | None]], base_size: int, report: MergeReport) -> None:
    vocab: dict[str, int] = model["vocab"]
    pairs = _merge_pairs(model)
    ranks = {p: i for i, p in enumerate(pairs)}
    as_strings = bool(model.get("merges")) and isinstance(model["merges"][0], str)
    next_id = base_size  # after every id, added tokens included

    def add_token(token: str, bridge: bool) -> None:
        nonlocal next_id
        vocab[token] = next_id
        next_id += 1
        report.bridges += bridge

    def add_merge(a: str, b: str) -> None:
        ranks[(a, b)] = len(pairs)
        pairs.append((a, b))
        report.merges_added += 1

    targets = {piece for piece, _ in wanted}
    for piece, _ in wanted:
        if piece in vocab:  # became a bridge of an earlier piece
            report.bridges -= 1
            report.added += 1
            continue
        for ch in dict.fromkeys(piece):  # a character the base alphabet lacks starts as its own symbol
            if ch not in vocab:
                add_token(ch, bridge=ch != piece)
        # Encoding runs every earlier merge first, so re-segment after each appended merge: what is left is exactly
        # what the next merge must join. Join a pair that is already a token or a wanted piece when there is one
        # (no bridge needed), else the leftmost pair.
        while len(parts := bpe_segment(piece, ranks)) > 1:
            joins = [a + b for a, b in zip(parts, parts[1:])]
            i = next((j for j, t in enumerate(joins) if t in vocab or t in targets), 0)
            add_merge(parts[i], parts[i + 1])
            if joins[i] not in vocab:
                add_token(joins[i], bridge=joins[i] != piece)
        report.added += 1
    model["merges"] = [f"{a} {b}" for a, b in pairs] if as_strings else [[a, b] for a, b in pairs]


def _append_unigram(model: dict, wanted: list[tuple[str, float | None]], base_size: int, report: MergeReport) -> None:
    vocab: list[list] = model["vocab"]
    if len(vocab) < base_size:
        raise ConfigError(f"base tokenizer: {base_size - len(vocab)} added tokens sit after the unigram vocabulary "
                          "(ids must stay contiguous); merge into the tokenizer without them")
    floor = min((s for _, s in vocab), default=0.0)
    for piece, score in wanted:
        vocab.append([piece, score if score is not None else floor])
        report.added += 1


# ------------------------------------------------------------------------------------------------- measuring


def tokens_per_char(tokenizer, text: str) -> float:
    """Tokens per character of ``text`` (no special tokens): lower means a cheaper, longer context. Takes a
    ``tokenizers.Tokenizer`` or an lmforge ``Tokenizer``."""
    backend = getattr(tokenizer, "backend", tokenizer)
    if not text:
        raise ConfigError("tokens_per_char needs a non-empty sample text")
    return len(backend.encode(text, add_special_tokens=False).ids) / len(text)


def subtoken_ids(old, new, ids: Sequence[int]) -> list[list[int]]:
    """For each id of the ``new`` (merged) tokenizer, the ids its piece splits into under the ``old`` tokenizer's
    model (normalizer and pre-tokenizer skipped: the piece is already in the model's alphabet). Used to initialize a
    new embedding row as the mean of its parts."""
    old_b, new_b = getattr(old, "backend", old), getattr(new, "backend", new)
    out = []
    for i in ids:
        piece = new_b.id_to_token(int(i))
        out.append([] if piece is None else [t.id for t in old_b.model.tokenize(piece)])
    return out


# ------------------------------------------------------------------------------------------------- directories

TOKENIZER_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def merge_tokenizer_dirs(base_dir: str | Path, new_dir: str | Path, out_dir: str | Path, *,
                         sample_text: str | None = None, max_new_pieces: int | None = None) -> MergeReport:
    """Merge the tokenizer in ``new_dir`` into the one in ``base_dir`` and write a checkpoint-style tokenizer
    directory to ``out_dir``: the merged ``tokenizer.json``, the base's config files (special tokens, chat template:
    their ids are unchanged) and ``vocab_expansion.json`` (the report). With ``sample_text``, tokens per character
    before and after are measured on it."""
    base_dir, new_dir, out = Path(base_dir), Path(new_dir), Path(out_dir)
    for d, what in ((base_dir, "base"), (new_dir, "new")):
        if not (d / "tokenizer.json").is_file():
            raise CheckpointError(f"{what} tokenizer: no tokenizer.json in '{d}'; pass a tokenizer directory")
    base = tokenizers.Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    new = tokenizers.Tokenizer.from_file(str(new_dir / "tokenizer.json"))
    merged, report = merge_tokenizers(base, new, max_new_pieces)
    if sample_text:
        report.tokens_per_char_before = tokens_per_char(base, sample_text)
        report.tokens_per_char_after = tokens_per_char(merged, sample_text)
        report.sample_chars = len(sample_text)
    out.mkdir(parents=True, exist_ok=True)
    merged.save(str(out / "tokenizer.json"))
    for name in (*TOKENIZER_CONFIG_FILES, "generation_config.json"):  # its eos ids are stop ids of the tokenizer
        if (base_dir / name).is_file() and (base_dir / name).resolve() != (out / name).resolve():
            (out / name).write_bytes((base_dir / name).read_bytes())
    info = {"base_tokenizer": str(base_dir), "new_tokenizer": str(new_dir), **report.to_dict()}
    (out / EXPANSION_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return report
