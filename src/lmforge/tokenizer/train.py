"""Train a small byte-level BPE and save it as a Hugging Face tokenizer directory.

Used by tests and examples to get a real ``tokenizers`` tokenizer without downloading one. The layout written by
``save_pretrained_tokenizer`` is what Llama-3 style checkpoints ship (``tokenizer.json`` + ``tokenizer_config.json``
with ``tokenizer_class: PreTrainedTokenizerFast``), so ``transformers.AutoTokenizer`` loads it too.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lmforge.errors import ConfigError

DEFAULT_SPECIAL_TOKENS = (
    "<s>", "</s>", "<pad>", "<unk>",
    "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
)


def train_bpe(
    texts: Iterable[str], vocab_size: int = 512, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS
) -> tokenizers.Tokenizer:
    """Train a GPT-2 style byte-level BPE on ``texts``.

    All 256 byte symbols are in the initial alphabet, so any text encodes without an unknown token, and characters
    outside the training text (CJK, emoji) become several byte tokens, which is what stream-decoding tests need.
    ``special_tokens`` get the first ids and are registered as special added tokens.
    """
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _ensure_special(tok: tokenizers.Tokenizer, token: str | None) -> int | None:
    """Return the id of ``token``, adding it as a special token when the vocabulary lacks it."""
    if token is None:
        return None
    if tok.token_to_id(token) is None:
        tok.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)])
    return tok.token_to_id(token)


def save_pretrained_tokenizer(
    tokenizer: tokenizers.Tokenizer,
    out_dir: str | Path,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    unk_token: str | None = None,
    chat_template: str | None = None,
    add_bos_token: bool = False,
) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir`` (created) and return it.

    Named special tokens missing from the vocabulary are added as special tokens. With ``add_bos_token`` the
    post-processor becomes ``ByteLevel`` + ``TemplateProcessing("<bos> $A")``, as in Llama-3 checkpoints, so the bos
    is added by plain ``tokenizers`` and by transformers alike (transformers ignores ``add_bos_token`` in the config
    when a ``tokenizer.json`` exists). The chat template goes into ``tokenizer_config.json`` as a string, which every
    transformers version reads (newer ones write ``chat_template.jinja`` instead; ``Tokenizer.from_dir`` reads both).
    The input tokenizer is not modified.
    """
    tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    ids = {name: _ensure_special(tok, value) for name, value in
           [("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token), ("unk_token", unk_token)]}
    if add_bos_token:
        if bos_token is None:
            raise ConfigError("add_bos_token=True needs bos_token; pass bos_token='<s>' (or your bos string)")
        prepend = processors.TemplateProcessing(
            single=f"{bos_token}:0 $A:0",
            pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1",
            special_tokens=[(bos_token, ids["bos_token"])],
        )
        current = tok.post_processor
        keep = isinstance(current, processors.ByteLevel)  # offsets handling; anything else would add tokens twice
        tok.post_processor = processors.Sequence([current, prepend]) if keep else prepend

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }
    config = {
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{name: value for name, value in [("bos_token", bos_token), ("eos_token", eos_token),
                                            ("pad_token", pad_token), ("unk_token", unk_token),
                                            ("chat_template", chat_template)] if value is not None},
    }
    text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (out / "tokenizer_config.json").write_text(text, encoding="utf-8")
    return out
