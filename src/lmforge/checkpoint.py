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

from .errors import CheckpointError, LmforgeError

__all__ = ["TOKENIZER_FILES", "has_tokenizer", "resolve_dtype", "load_model_and_tokenizer", "save_tokenizer_files",
           "load_tensors_into"]

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


@torch.no_grad()
def load_tensors_into(current: dict[str, torch.Tensor], incoming: dict[str, torch.Tensor], source: str,
                      display_names: dict[str, str] | None = None) -> None:
    """Copy `incoming` into the tensors of `current` (same names, same shapes, storage shared with a model).

    One-line CheckpointError naming the first missing, unexpected or mis-shaped tensor (by `display_names[name]`
    where given, e.g. the name in the file)."""
    show = display_names or {}
    missing = [k for k in current if k not in incoming]
    unexpected = [k for k in incoming if k not in current]
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        what = f"lacks '{show.get(first, first)}'" if missing else f"has unexpected tensor '{show.get(first, first)}'"
        more = len(missing) + len(unexpected) - 1
        raise CheckpointError(f"{source} {what}" + (f" (+{more} more mismatched names)" if more else ""))
    for name, dst in current.items():
        src = incoming[name]
        if src.shape != dst.shape:
            raise CheckpointError(f"{source}: tensor '{show.get(name, name)}' has shape {tuple(src.shape)}, "
                                  f"the model expects {tuple(dst.shape)}")
        dst.copy_(src)
