"""Tokenizers for lmforge: Hugging Face ``tokenizers`` backends plus chat templates rendered like transformers.

- ``Tokenizer.from_dir(path)`` loads a checkpoint's tokenizer (special tokens, chat template, stop ids).
- ``render_chat_template`` renders Jinja chat templates byte-identically to ``apply_chat_template``.
- ``BUILTIN_TEMPLATES`` / ``get_template`` hold templates for checkpoints that ship none.
- ``train_bpe`` / ``save_pretrained_tokenizer`` make small real tokenizers for tests and examples; ``train_unigram``
  a SentencePiece-style one with byte fallback.
- ``merge_tokenizers`` / ``merge_tokenizer_dirs`` append a new tokenizer's pieces to a base one, every id kept;
  ``tokens_per_char`` measures what that buys (vocabulary expansion, ``lmforge tokenizer``).
"""
from lmforge.tokenizer.chat import ChatTemplateError, render_chat_template
from lmforge.tokenizer.templates import BUILTIN_TEMPLATES, get_template
from lmforge.tokenizer.tokenizer import StreamDecoder, Tokenizer
from lmforge.tokenizer.train import save_pretrained_tokenizer, train_bpe
from lmforge.tokenizer.merge import MergeReport, merge_tokenizer_dirs, merge_tokenizers, tokens_per_char
from lmforge.tokenizer.train_cli import train_unigram

__all__ = [
    "Tokenizer",
    "StreamDecoder",
    "render_chat_template",
    "ChatTemplateError",
    "BUILTIN_TEMPLATES",
    "get_template",
    "train_bpe",
    "save_pretrained_tokenizer",
    "train_unigram",
    "merge_tokenizers",
    "merge_tokenizer_dirs",
    "MergeReport",
    "tokens_per_char",
]
