"""`lmforge tokenizer train | merge | resize`: grow a model's vocabulary, as Chinese-LLaMA-Alpaca did.

    lmforge tokenizer train zh.txt more.jsonl --vocab-size 8000 --out runs/zh-tok      # learn pieces of a corpus
    lmforge tokenizer merge BASE_TOKENIZER runs/zh-tok --out runs/merged --sample zh.txt  # append what BASE lacks
    lmforge tokenizer resize BASE_MODEL runs/merged --out runs/expanded --init subtoken  # grow embedding + LM head

``train`` learns a byte-level BPE (``train_bpe``: every byte is a symbol, so nothing is unknown) or a
SentencePiece-style unigram with byte fallback (``<0x00>``..``<0xFF>`` pieces). ``merge`` keeps every base id and
reports tokens per character before/after; ``resize`` writes a checkpoint whose new rows are initialized from the old
ones (``lmforge.models.resize``), ready for ``trainable: embeddings`` training.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import tokenizers
from pydantic import Field, model_validator
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.config import Section
from lmforge.errors import ConfigError
from lmforge.tokenizer.train import DEFAULT_SPECIAL_TOKENS, save_pretrained_tokenizer, train_bpe

__all__ = ["TokenizerConfig", "run_tokenizer", "train_tokenizer", "train_unigram", "read_corpus", "ACTIONS"]

ACTIONS = {"train": "CORPUS... : learn a tokenizer", "merge": "BASE NEW : append NEW's pieces to BASE",
           "resize": "MODEL TOKENIZER : grow MODEL's embedding and LM head for a merged TOKENIZER"}
SP_SPACE = "▁"


# ------------------------------------------------------------------------------------------------ corpus


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON record (instructions, answers, message contents...), depth first."""
    if isinstance(value, str):
        if value.strip():
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def read_corpus(paths: Sequence[str | Path], max_chars: int | None = None) -> list[str]:
    """Texts of corpus files for tokenizer training: .txt blocks, and every string field of .json / .jsonl /
    .parquet records (whatever their format). Stops after ``max_chars`` characters."""
    from lmforge.data.formats import read_rows

    texts, total = [], 0
    for p in map(Path, paths):
        if not p.is_file():
            raise ConfigError(f"corpus file '{p}' does not exist; pass text/json/jsonl/parquet files")
        for _, record in read_rows(p, text_mode="blocks"):
            for text in _strings(record):
                texts.append(text)
                total += len(text)
                if max_chars is not None and total >= max_chars:
                    return texts
    if not texts:
        raise ConfigError(f"corpus {', '.join(map(str, paths))} holds no text")
    return texts


# ------------------------------------------------------------------------------------------------ training


def train_unigram(texts: Iterable[str], vocab_size: int = 8000, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
                  byte_fallback: bool = True, max_piece_length: int = 8) -> tokenizers.Tokenizer:
    """A SentencePiece-style unigram: spaces become ``▁`` and start each word's first piece, and with
    ``byte_fallback`` a character outside the vocabulary becomes its UTF-8 bytes (``<0xE6>``...) instead of
    ``<unk>``, as in Llama/Mistral tokenizers. ``vocab_size`` counts the 256 byte pieces and the special tokens."""
    special = list(dict.fromkeys([*special_tokens, "<unk>"]))
    n_bytes = 256 if byte_fallback else 0
    if vocab_size <= len(special) + n_bytes:
        raise ConfigError(f"vocab_size {vocab_size} leaves no room for pieces after {len(special)} special tokens "
                          f"and {n_bytes} byte pieces; raise it")
    tok = tokenizers.Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP_SPACE, prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size - n_bytes, special_tokens=special, unk_token="<unk>",
                                      max_piece_length=max_piece_length, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    if byte_fallback:
        floor = min(s for _, s in vocab) - 1.0  # below every real piece: bytes only where nothing else fits
        vocab += [[f"<0x{b:02X}>", floor] for b in range(256)]
        spec["model"]["byte_fallback"] = True
    out = tokenizers.Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    out.decoder = decoders.Sequence([decoders.Replace(SP_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return out


def train_tokenizer(texts: Sequence[str], vocab_size: int, kind: Literal["bpe", "unigram"] = "bpe",
                    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> tokenizers.Tokenizer:
    """A byte-level BPE (``train_bpe``) or a byte-fallback unigram (``train_unigram``) learned from ``texts``."""
    if kind == "bpe":
        if vocab_size <= 256 + len(special_tokens):
            raise ConfigError(f"vocab_size {vocab_size} must exceed the 256 byte symbols plus "
                              f"{len(special_tokens)} special tokens")
        return train_bpe(texts, vocab_size=vocab_size, special_tokens=special_tokens)
    return train_unigram(texts, vocab_size, special_tokens)


# ------------------------------------------------------------------------------------------------ the verb


class TokenizerConfig(Section):
    """`lmforge tokenizer ACTION INPUTS... --out DIR`: train | merge | resize (see the module docstring)."""

    action: Literal["train", "merge", "resize"]
    """train CORPUS...: learn a tokenizer. merge BASE NEW: append NEW's pieces to BASE (every BASE id kept).
    resize MODEL TOKENIZER: grow MODEL's embedding and LM head for the merged TOKENIZER."""
    inputs: list[str] = []
    """The action's positional arguments: corpus files (train), two tokenizer dirs (merge), a checkpoint and a
    tokenizer dir (resize)."""
    out: str
    """Output directory: a tokenizer directory (train, merge) or an HF checkpoint (resize)."""
    vocab_size: int = Field(8000, gt=0)
    """train: the size of the learned vocabulary, special tokens (and unigram byte pieces) included."""
    model: Literal["bpe", "unigram"] = "bpe"
    """train: byte-level BPE (every byte is a symbol) or SentencePiece-style unigram with byte fallback."""
    max_chars: int | None = Field(None, ge=1)
    """train: read at most this many characters of the corpus."""
    max_new_pieces: int | None = Field(None, ge=1)
    """merge: append at most this many of NEW's pieces (in the order NEW learned them)."""
    sample: str | None = None
    """merge: a text (or json/jsonl) file to report tokens per character on, before and after; train: the same for
    the new tokenizer."""
    init: Literal["mean", "subtoken"] = "mean"
    """resize: new rows = the mean of all old rows, or the mean of the rows of the pieces the old tokenizer splits
    each new token into."""
    pad_to_multiple_of: int | None = Field(None, ge=1)
    """resize: round the vocabulary up to a multiple of this (e.g. 64, for GPU-friendly matrix shapes)."""

    @model_validator(mode="after")
    def _fits_action(self):
        need = {"train": "at least 1 corpus file", "merge": "2 tokenizer dirs (BASE NEW)",
                "resize": "a checkpoint dir and a tokenizer dir (MODEL TOKENIZER)"}[self.action]
        ok = len(self.inputs) >= 1 if self.action == "train" else len(self.inputs) == 2
        if not ok:
            raise ValueError(f"tokenizer {self.action} takes {need}, got {len(self.inputs)}: "
                             f"lmforge tokenizer {self.action} {ACTIONS[self.action].split(':')[0].strip()} --out DIR")
        own = {"train": {"vocab_size", "model", "max_chars", "sample"}, "merge": {"max_new_pieces", "sample"},
               "resize": {"init", "pad_to_multiple_of"}}
        foreign = sorted((set().union(*own.values()) - own[self.action]) & self.model_fields_set)
        if foreign:
            raise ValueError(f"'{foreign[0]}' does not apply to tokenizer {self.action}; drop it")
        return self


def _sample_text(path: str | None) -> str | None:
    return None if path is None else "\n".join(read_corpus([path]))


def run_tokenizer(cfg: TokenizerConfig) -> dict:
    """Run the action; print and return a JSON-able summary."""
    result = {"train": _run_train, "merge": _run_merge, "resize": _run_resize}[cfg.action](cfg)
    print(json.dumps(result, ensure_ascii=False))
    return result


def _run_train(cfg: TokenizerConfig) -> dict:
    from lmforge.tokenizer.merge import tokens_per_char

    texts = read_corpus(cfg.inputs, cfg.max_chars)
    tok = train_tokenizer(texts, cfg.vocab_size, cfg.model)
    names = {k: v for k, v in (("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "<pad>"),
                               ("unk_token", "<unk>")) if tok.token_to_id(v) is not None}
    save_pretrained_tokenizer(tok, cfg.out, **names)
    out = {"action": "train", "out": cfg.out, "model": cfg.model, "vocab_size": tok.get_vocab_size(),
           "corpus_chars": sum(map(len, texts))}
    sample = _sample_text(cfg.sample)
    if sample:
        out["tokens_per_char"] = round(tokens_per_char(tok, sample), 4)
    return out


def _run_merge(cfg: TokenizerConfig) -> dict:
    from lmforge.tokenizer.merge import merge_tokenizer_dirs

    report = merge_tokenizer_dirs(cfg.inputs[0], cfg.inputs[1], cfg.out, sample_text=_sample_text(cfg.sample),
                                  max_new_pieces=cfg.max_new_pieces)
    print(report.summary())
    return {"action": "merge", "out": cfg.out, **report.to_dict()}


def _run_resize(cfg: TokenizerConfig) -> dict:
    from lmforge.tokenizer.expand import expand_checkpoint

    info = expand_checkpoint(cfg.inputs[0], cfg.inputs[1], cfg.out, cfg.init, cfg.pad_to_multiple_of)
    return {"action": "resize", "out": cfg.out, **info}
