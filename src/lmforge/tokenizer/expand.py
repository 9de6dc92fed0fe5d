"""Vocabulary expansion, the file side: resize a model for a merged tokenizer and write the expanded checkpoint.

``lmforge.tokenizer.merge`` adds pieces to a tokenizer keeping every old id; `resize_for_tokenizer` grows the model's
embedding and output layer to match (``lmforge.models.resize`` does the tensor work, with the ``mean`` or
``subtoken`` init), and `expand_checkpoint` (the ``lmforge tokenizer resize`` action) writes the result as an HF
checkpoint with the merged tokenizer's files and ``vocab_expansion.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..errors import CheckpointError, ConfigError
from ..models.resize import NewRowInit, resize_token_embeddings
from .merge import EXPANSION_FILE, TOKENIZER_CONFIG_FILES, id_span, subtoken_ids

__all__ = ["resize_for_tokenizer", "expand_checkpoint"]


def resize_for_tokenizer(model: nn.Module, old_tokenizer, new_tokenizer, init: NewRowInit = "mean",
                         pad_to_multiple_of: int | None = None) -> dict:
    """Resize ``model`` (trained with ``old_tokenizer``) for ``new_tokenizer``, a merge that kept every old id.

    New rows start at the old tokenizer's last id + 1; model rows past it (a padded vocabulary) were never a token,
    so they are re-initialized too. Returns ``{"base_vocab_size": first new id, "vocab_size": rows, "init": init}``.
    """
    rows = model.embed.weight.shape[0]
    first_new, wanted = min(rows, id_span(old_tokenizer)), id_span(new_tokenizer)
    if wanted <= first_new:
        raise ConfigError(f"the new tokenizer has no ids beyond the old one's {first_new}; nothing to resize")
    subtokens = subtoken_ids(old_tokenizer, new_tokenizer, range(first_new, wanted)) if init == "subtoken" else None
    size = resize_token_embeddings(model, max(rows, wanted), init=init, subtokens=subtokens, first_new=first_new,
                                   pad_to_multiple_of=pad_to_multiple_of)
    return {"base_vocab_size": first_new, "vocab_size": size, "tokenizer_vocab_size": wanted, "init": init}


def expand_checkpoint(model_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path,
                      init: NewRowInit = "mean", pad_to_multiple_of: int | None = None) -> dict:
    """Load the HF checkpoint ``model_dir``, resize it for the merged tokenizer in ``tokenizer_dir`` and write an HF
    checkpoint to ``out_dir`` with the merged tokenizer's files and ``vocab_expansion.json`` (the first new id, which
    ``trainable: new_embeddings`` reads). Returns that info."""
    from ..atomic import atomic_dir, check_replaceable
    from ..models.hf import load_hf, save_hf
    from .tokenizer import Tokenizer

    model_dir, tokenizer_dir, out = Path(model_dir), Path(tokenizer_dir), Path(out_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"no tokenizer.json in '{tokenizer_dir}'; pass the merged tokenizer's directory")
    check_replaceable(out)
    model = load_hf(model_dir, progress=False)
    old, new = Tokenizer.from_dir(model_dir), Tokenizer.from_dir(tokenizer_dir)
    info = resize_for_tokenizer(model, old, new, init, pad_to_multiple_of)
    info = {"model": str(model_dir), "tokenizer": str(tokenizer_dir), **info}
    with atomic_dir(out, replace_only_models=True) as tmp:  # the checkpoint appears whole, or not at all
        if model.quantization_config:  # a quantized checkpoint stays one: save_hf writes full-precision weights only
            from ..quant import save_quantized

            save_quantized(model, tmp)
        else:
            save_hf(model, tmp)
        for name in ("tokenizer.json", *TOKENIZER_CONFIG_FILES):  # generation_config.json comes from save_hf
            if (tokenizer_dir / name).is_file():
                (tmp / name).write_bytes((tokenizer_dir / name).read_bytes())
        (tmp / EXPANSION_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info
