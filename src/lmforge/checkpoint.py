"""Where a checkpoint path becomes a model and a tokenizer, for every verb.

A checkpoint is a Hugging Face directory (config.json + safetensors + tokenizer files) or a llama.cpp ``.gguf`` file
(config, weights and vocabulary all in one file). `load_hf` and `Tokenizer.from_dir` read both; this module is the
one place the CLI, the server, the engine's `LLM`, eval and the exporters go through, so they accept the same inputs
and fail with the same one-line errors.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .errors import LmforgeError

__all__ = ["TOKENIZER_FILES", "has_tokenizer", "resolve_dtype", "load_model_and_tokenizer", "save_tokenizer_files"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab_expansion.json")


def has_tokenizer(path: str | Path) -> bool:
    """A .gguf file always carries its vocabulary; a directory needs tokenizer.json."""
    from .models.gguf import is_gguf

    return is_gguf(path) or (Path(path) / "tokenizer.json").is_file()


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype | str | None:
    """'auto' -> bfloat16 on a GPU that supports it, else float32; anything else passes through to `load_hf`."""
    from .runtime import auto_dtype

    return auto_dtype(device) if name == "auto" else name


def load_model_and_tokenizer(path: str | Path, device: str = "auto", dtype: str | None = "auto",
                             chat_template: str | None = None, *, require_tokenizer: bool = False,
                             progress: bool | None = False, adapter: str | Path | None = None,
                             revision: str | None = None):
    """(Transformer, Tokenizer or None) from an HF checkpoint directory, a .gguf file or a Hugging Face id
    (`lmforge.hub.resolve_model`, at `revision`), with `adapter` applied if given: any adapter directory lmforge
    trains or reads (PEFT LoRA/DoRA, IA3, AdaLoRA, prefix/prompt methods, lmforge adapters; `peft.load_adapter`).

    `require_tokenizer`: a checkpoint without one is a one-line error (generate/chat) instead of None."""
    from .hub import resolve_model
    from .models.hf import load_hf, read_hf_config
    from .runtime import pick_device
    from .tokenizer import Tokenizer

    path = resolve_model(path, revision)
    read_hf_config(path)  # one-line error for a missing/invalid checkpoint before anything heavy
    found = has_tokenizer(path)
    if require_tokenizer and not found:
        raise LmforgeError(f"no tokenizer.json in '{path}': generate/chat need the checkpoint's tokenizer")
    adapter_dir = resolve_model(adapter, marker="adapter_config.json") if adapter is not None else None
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
        raise LmforgeError(f"adapter '{adapter}': no adapter_config.json there; pass the directory a PEFT or lmforge "
                           "training run wrote its adapter to")
    dev = pick_device(device)
    model = load_hf(path, dtype=resolve_dtype(dtype, dev), device=dev, progress=progress)
    if adapter_dir is not None:
        from .peft import load_adapter

        load_adapter(model, adapter_dir)
    tok = Tokenizer.from_dir(path, chat_template=chat_template) if found else None
    return model.eval(), tok


def save_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    """Give `dst` the tokenizer of checkpoint `src`: its files copied, or for a .gguf file written from its metadata
    (tokenizer.json, tokenizer_config.json with the chat template)."""
    from .models.gguf import is_gguf

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if is_gguf(src):
        from .tokenizer.gguf import save_tokenizer, tokenizer_from_gguf

        save_tokenizer(tokenizer_from_gguf(src), dst)
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
