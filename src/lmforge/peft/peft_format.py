"""LoRA adapters in PEFT's on-disk format, so `peft.PeftModel.from_pretrained` reads what lmforge writes and back.

A PEFT adapter directory holds `adapter_config.json` (r, lora_alpha, target_modules, ...) and
`adapter_model.safetensors` with keys ``base_model.model.<HF module path>.lora_A.weight`` (r, in_features) and
``.lora_B.weight`` (out_features, r), plus ``base_model.model.<HF tensor name>`` for modules_to_save. LoRA tensors
have the same layout for every architecture (PEFT keeps nn.Linear layout even over GPT-2's transposed Conv1D, and
flags that with fan_in_fan_out), so only the module names need translating, through the model's converter.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pydantic
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_write as _atomic_write
from ..errors import CheckpointError, ConfigError
from ..models.converters import Converter, _pattern, converter_for
from .lora import (OUTPUT_HEAD, LoraConfig, apply_lora, compact_targets, linear_modules, load_tensors_into,
                   lora_layers, lora_state_dict, modules_to_save, rank_for, select_targets)

__all__ = ["save_peft_adapter", "load_peft_adapter", "resize_for_adapter", "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's PeftModelForCausalLM -> LoraModel -> the transformers model
# adapter_config.json settings lmforge cannot reproduce yet: reading them silently would give different logits.
UNSUPPORTED = ("lora_bias", "bias", "alpha_pattern", "layers_to_transform",
               "exclude_modules", "target_parameters", "trainable_token_indices", "layer_replication")


def _hf_names(conv: Converter, model: nn.Module) -> dict[str, str | None]:
    """{native linear path: HF module path, or None where the HF layout fuses it (GPT-2/BLOOM q/k/v)}."""
    return {p: conv.hf_module_name(p) for p in linear_modules(model)}


def _is_conv1d(conv: Converter, native_module: str) -> bool:
    """Whether HF stores this linear transposed (GPT-2's Conv1D), which PEFT calls fan_in_fan_out."""
    name = f"{native_module}.weight"
    return any(r.transform == "T" and _pattern(r.native).match(name) for r in conv.names if isinstance(r.native, str))


def check_peft_targets(model: nn.Module) -> dict[str, str | None]:
    """The HF module name of every linear; a one-line ConfigError when a LoRA layer sits on a linear the checkpoint
    stores fused with others (no PEFT adapter can hold it). Runs before training, so a run never ends in it."""
    arch = model.cfg.arch
    hf = _hf_names(converter_for(arch), model)
    for path in lora_layers(model):
        if hf[path] is None:
            ok = sorted({p.rsplit(".", 1)[-1] for p, h in hf.items() if h is not None and p != OUTPUT_HEAD})
            raise ConfigError(f"{arch} stores '{path}' fused with other weights in one tensor (q|k|v, gate|up or "
                              f"stacked experts), so a PEFT adapter cannot hold a LoRA on it; for {arch} use "
                              f"target_modules {ok}")
    return hf


def save_peft_adapter(model: nn.Module, lora_cfg: LoraConfig, out_dir: str | Path,
                      base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA layers (and `lora_cfg.modules_to_save`) as a PEFT adapter directory; return it."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("the model has no LoRA layers to save; apply LoRA first")
    arch = model.cfg.arch
    conv = converter_for(arch)
    hf = check_peft_targets(model)
    for path, layer in layers.items():
        if layer.r != rank_for(path, lora_cfg):
            raise ConfigError(f"LoRA layer '{path}' has rank {layer.r} but the config says "
                              f"r={rank_for(path, lora_cfg)}")
        if hasattr(layer, "lora_magnitude_vector") != lora_cfg.use_dora:
            raise ConfigError(f"LoRA layer '{path}' is {type(layer).__name__} but the config says "
                              f"use_dora={lora_cfg.use_dora}")

    tensors = {f"{PREFIX}{hf[p]}.{name}": t.detach().cpu().contiguous()
               for p, layer in layers.items() for name, t in layer.adapter_tensors().items()}
    rank_pattern = {hf[p]: layer.r for p, layer in layers.items() if layer.r != lora_cfg.r}
    saved = modules_to_save(model, lora_cfg.modules_to_save)
    saved_hf = []
    for path in saved:
        if conv.hf_module_name(path) is None:
            raise ConfigError(f"modules_to_save '{path}' has no separate tensor in {arch} checkpoints; "
                              "PEFT cannot save it")
        saved_hf.append(conv.hf_module_name(path))
    native = {f"{p}.{n}": t.detach() for p, m in saved.items() for n, t in m.named_parameters(recurse=False)}
    tensors.update({PREFIX + name: t.cpu().contiguous() for name, t in conv.to_hf(native, model.cfg)})

    hf_linears = [h for h in hf.values() if h is not None]
    alpha = int(lora_cfg.alpha) if float(lora_cfg.alpha).is_integer() else lora_cfg.alpha
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.r, "lora_alpha": alpha, "lora_dropout": lora_cfg.dropout, "use_rslora": lora_cfg.use_rslora,
        "target_modules": compact_targets([hf[p] for p in layers], hf_linears),
        "modules_to_save": saved_hf or None, "bias": "none",
        "fan_in_fan_out": any(_is_conv1d(conv, p) for p in layers),
        "init_lora_weights": True if lora_cfg.init == "default" else "gaussian",
        "inference_mode": True, "use_dora": lora_cfg.use_dora, "lora_bias": False, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": rank_pattern, "alpha_pattern": {}, "exclude_modules": None,
        "revision": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return out


def _read_config(adapter_dir: Path) -> dict:
    file = adapter_dir / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in '{adapter_dir}': pass a PEFT adapter directory")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: peft_type {raw.get('peft_type')!r} is not supported; "
                              "lmforge reads LORA adapters")
    for key in UNSUPPORTED:
        if raw.get(key) not in (None, False, "none", {}, []):
            raise CheckpointError(f"{file}: {key}={raw[key]!r} is not supported by lmforge's LoRA yet")
    return raw


def _read_tensors(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, file name) from adapter_model.safetensors, or the older adapter_model.bin."""
    if (adapter_dir / WEIGHTS_FILE).is_file():
        return load_file(str(adapter_dir / WEIGHTS_FILE)), WEIGHTS_FILE
    if (adapter_dir / "adapter_model.bin").is_file():
        return torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True), "adapter_model.bin"
    raise CheckpointError(f"no {WEIGHTS_FILE} (or adapter_model.bin) in '{adapter_dir}'")


def _native_rank_pattern(pattern: dict, hf: dict[str, str], targeted: list[str], r: int) -> dict[str, int]:
    """PEFT's rank_pattern (keys match an HF module path's tail, as regexes) as {native path: rank} for the targeted
    modules whose rank differs from r."""
    out = {}
    for path in targeted:
        for key, rank in pattern.items():
            if re.fullmatch(rf"(.*\.)?(?:{key})", hf[path]):
                if rank != r:
                    out[path] = int(rank)
                break
    return out


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> LoraConfig:
    """Apply the LoRA a PEFT adapter directory describes to `model` (a base model without LoRA) and load its
    tensors; return the native LoraConfig it amounts to (HF target names translated to native ones)."""
    adapter_dir = Path(adapter_dir)
    raw = _read_config(adapter_dir)
    tensors, source = _read_tensors(adapter_dir)
    source = f"{adapter_dir / source}"
    arch = model.cfg.arch
    conv = converter_for(arch)

    # Sort the file's tensors into LoRA weights (by native module) and modules_to_save weights (native names).
    incoming: dict[str, torch.Tensor] = {}
    file_name: dict[str, str] = {}  # native name -> key in the file, for error messages
    lora_modules: set[str] = set()
    saved: set[str] = set()  # modules_to_save, native module paths
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        m = re.fullmatch(r"(.+)\.(lora_[AB]\.weight|lora_magnitude_vector)", name)
        if m:
            native = conv.native_module_name(m[1])
            if native is None:
                raise CheckpointError(f"{source}: '{key}' is a LoRA on '{m[1]}', which {arch} checkpoints fuse or "
                                      "lmforge does not know; lmforge reads LoRA on separate linear layers only")
            lora_modules.add(native)
            pairs = [(f"{native}.{m[2]}", t)]
        else:
            pairs = conv.to_native(name, t, model.cfg)
            saved.update(n.rsplit(".", 1)[0] for n, _ in pairs)
        for native_name, tensor in pairs:
            incoming[native_name], file_name[native_name] = tensor, key

    # The modules the config targets (PEFT's matching, on HF names) must be exactly those the file has LoRA for.
    hf = {p: h for p, h in _hf_names(conv, model).items() if h is not None}
    to_native = {h: p for p, h in hf.items()}
    targeted = [to_native[h] for h in select_targets(list(to_native), raw.get("target_modules") or [],
                                                     head=conv.hf_module_name(OUTPUT_HEAD))]
    missing = [p for p in targeted if p not in lora_modules]
    extra = sorted(lora_modules - set(targeted))
    if missing:
        raise CheckpointError(f"{source} has no LoRA tensors for '{hf[missing[0]]}', which {CONFIG_FILE} targets")
    if extra:
        raise CheckpointError(f"{source} has LoRA tensors for '{hf.get(extra[0], extra[0])}', which the "
                              f"target_modules of {CONFIG_FILE} do not select")

    targets = compact_targets(targeted, list(linear_modules(model)))
    try:
        r = raw["r"]
        cfg = LoraConfig(
            r=r, alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout") or 0.0,
            use_rslora=bool(raw.get("use_rslora")), target_modules=targets,
            init="gaussian" if raw.get("init_lora_weights") == "gaussian" else "default", modules_to_save=sorted(saved),
            rank_pattern=_native_rank_pattern(raw.get("rank_pattern") or {}, hf, targeted, r),
            use_dora=bool(raw.get("use_dora")))
    except (KeyError, pydantic.ValidationError) as e:
        detail = f"missing '{e.args[0]}'" if isinstance(e, KeyError) else e.errors()[0]["msg"]
        raise CheckpointError(f"{adapter_dir / CONFIG_FILE}: invalid LoRA settings ({detail})") from None
    apply_lora(model, cfg)
    load_tensors_into(lora_state_dict(model, cfg), incoming, source, display_names=file_name)
    return cfg


def resize_for_adapter(model: nn.Module, adapter_dir: str | Path) -> int | None:
    """Grow ``model`` to the vocabulary of a PEFT adapter whose ``modules_to_save`` hold a resized embedding or LM
    head (Chinese-LLaMA's stage-2 adapters), so ``load_peft_adapter`` can load it onto the original base model; the
    adapter's tensors then replace those rows. Returns the new size, or None when the adapter needs no resize."""
    from safetensors import safe_open

    from ..models.resize import resize_token_embeddings

    file = Path(adapter_dir) / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"no {WEIGHTS_FILE} in '{adapter_dir}': pass a PEFT adapter directory")
    conv = converter_for(model.cfg.arch)
    rows = []
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            name = key.removeprefix(PREFIX)
            if "lora_" in name or not name.endswith("weight"):
                continue
            for native, t in conv.to_native(name, f.get_tensor(key), model.cfg):
                if native in ("embed.weight", "lm_head.weight"):
                    rows.append(t.shape[0])
    size = max(rows, default=0)
    if size <= model.embed.weight.shape[0]:
        return None
    return resize_token_embeddings(model, size)
