"""Tokenizers for lmforge: Hugging Face ``tokenizers`` backends plus chat templates rendered like transformers.

- ``Tokenizer.from_dir(path)`` loads a checkpoint's tokenizer (special tokens, chat template, stop ids).
- ``render_chat_template`` renders Jinja chat templates byte-identically to ``apply_chat_template``.
- ``BUILTIN_TEMPLATES`` / ``get_template`` hold templates for checkpoints that ship none.
- ``train_bpe`` / ``save_pretrained_tokenizer`` make small real tokenizers for tests and examples.
"""
from lmforge.tokenizer.chat import ChatTemplateError, render_chat_template
from lmforge.tokenizer.templates import BUILTIN_TEMPLATES, get_template
from lmforge.tokenizer.tokenizer import StreamDecoder, Tokenizer
from lmforge.tokenizer.train import save_pretrained_tokenizer, train_bpe

__all__ = [
    "Tokenizer",
    "StreamDecoder",
    "render_chat_template",
    "ChatTemplateError",
    "BUILTIN_TEMPLATES",
    "get_template",
    "train_bpe",
    "save_pretrained_tokenizer",
]
