"""Whole-model quantization: pick the linears, run a method, save and load quantized checkpoints.

``quantize_model(model, method, **opts)`` replaces `nn.Linear` modules by path after loading (as `apply_lora` does);
the model code never changes. Methods: ``int8`` (per-channel; ``llm_int8=True`` for LLM.int8() W8A8 with outlier
columns), ``int4`` / ``rtn`` (group-wise), ``nf4``, ``awq`` and ``gptq`` (need calibration tokens), ``bitnet``
(packs BitLinear layers; ternarizes plain linears post hoc).

A quantized checkpoint is a directory with ``config.json`` -- the model's Hugging Face config plus a
``quantization_config`` block (``quant_method: "lmforge"``, the method and its options, and the spec of every
quantized module by native path) -- and ``model.safetensors`` holding the native state dict (codes, scales, zero
points, unquantized tensors). `load_quantized(dir)` rebuilds each module from its spec and loads the tensors back
bit-exactly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError, ConfigError, did_you_mean
from ..models.converters import converter_for
from ..models.hf import architecture_of, hf_config_dict, parse_dtype, read_hf_config
from ..models.modules import ALL_LINEAR, linear_modules, select_targets, set_module
from ..models.transformer import Transformer
from .awq import awq_block
from .base import QuantLinear, check_group_size
from .bitnet import BitLinear, PackedBitLinear
from .calibration import BlockwiseCalibration
from .formats import Int4ActOrderLinear
from .gptq import gptq_block
from .linear import Int4Linear, Int8Linear
from .nf4 import NF4Linear
from .qat import FakeQuantLinear

__all__ = ["QUANT_LINEARS", "METHODS", "HEAD_METHODS", "quantize_model", "quantize_head", "save_quantized",
           "load_quantized", "build_quantized", "dequantize_model", "quantized_size", "quantized_linears"]

QUANT_LINEARS: dict[str, type[QuantLinear]] = {c.kind: c for c in (Int8Linear, Int4Linear, Int4ActOrderLinear,
                                                                   NF4Linear, PackedBitLinear)}
METHODS = ("int8", "int4", "rtn", "nf4", "awq", "gptq", "bitnet")
HEAD_METHODS = ("keep", "int8", "int4", "nf4")  # what `lm_head=` can make of the output head
FORMAT_VERSION = 1


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, QuantLinear)}


def _targets(model: nn.Module, targets, kinds: tuple[type, ...]) -> list[str]:
    linears = {p: m for p, m in linear_modules(model).items() if type(m) in kinds}
    chosen = select_targets(list(linears), targets)
    if not chosen:
        raise ConfigError(f"quantization targets {targets!r} match no full-precision linear layer "
                          f"(already quantized, or names like {', '.join(list(linears)[:3]) or 'none'})")
    return chosen


def _check_group(model: nn.Module, paths: list[str], group_size: int) -> None:
    check_group_size({p: model.get_submodule(p).in_features for p in paths}, group_size)


def _calibrated(model: nn.Module, method: str, paths: list[str], calib: torch.Tensor, batch_size: int,
                block_fn) -> None:
    """Run a block-by-block calibration pass; `block_fn(block, stats, names)` returns {name: new module}."""
    per_block: dict[int, set[str]] = {}
    for p in paths:
        parts = p.split(".")
        if parts[0] != "layers":
            raise ConfigError(f"method '{method}' quantizes transformer blocks only; '{p}' is outside them "
                              f"(leave lm_head out of the targets)")
        per_block.setdefault(int(parts[1]), set()).add(".".join(parts[2:]))

    def linears_of(block):
        i = next(j for j, b in enumerate(model.layers) if b is block)
        return {n: block.get_submodule(n) for n in per_block.get(i, ())}

    def quantize_block(i, block, stats):
        for name, module in block_fn(block, stats, per_block.get(i, set())).items():
            set_module(block, name, module)

    BlockwiseCalibration(model, calib, batch_size).run(linears_of, quantize_block, hessian=method == "gptq")


@torch.no_grad()
def quantize_model(model: Transformer, method: str, *, targets: list[str] | str = ALL_LINEAR,
                   group_size: int = 128, calib: torch.Tensor | None = None, calib_file: str | Path | None = None,
                   tokenizer=None, calib_samples: int = 128, calib_seq_len: int = 512, calib_batch_size: int = 8,
                   act_order: bool = False, damp: float = 0.01, llm_int8: bool = False,
                   outlier_threshold: float = 6.0, block_size: int = 64, double_quant: bool = True,
                   dtype: torch.dtype | None = None, lm_head: str = "keep") -> Transformer:
    """Quantize `model` in place with `method` and return it. `targets` selects linears as LoRA does (default: all
    but lm_head). AWQ/GPTQ read `calib` (n, T) token ids or `calib_file` tokenized with `tokenizer`.
    Scales are stored in `dtype` (default: each weight's dtype). `lm_head` (one of HEAD_METHODS) also quantizes
    the output head by round-to-nearest (`quantize_head`): decode reads it once per token, 0.5-1 GB at 8B."""
    method = method.lower()
    if method not in METHODS:
        raise ConfigError(f"unknown quantization method '{method}'{did_you_mean(method, METHODS)}; "
                          f"available: {', '.join(METHODS)}")
    if calib is None and calib_file is not None:
        if tokenizer is None:
            raise ConfigError("calib_file needs a tokenizer to turn the text into token ids")
        from .calibration import calibration_tokens

        calib = calibration_tokens(calib_file, tokenizer, calib_samples, calib_seq_len)
    if method in ("awq", "gptq") and calib is None:
        raise ConfigError(f"method '{method}' needs calibration tokens: pass calib=(n, seq_len) token ids, or "
                          f"calib_file=... with a tokenizer")
    options: dict = {"method": method}
    if method == "bitnet":
        paths = _targets(model, targets, (nn.Linear, BitLinear))
        for p in paths:
            set_module(model, p, PackedBitLinear.from_linear(model.get_submodule(p), dtype))
    elif method in ("int8", "nf4", "int4", "rtn"):
        paths = _targets(model, targets, (nn.Linear,))
        if method == "int8":
            options.update(llm_int8=llm_int8, outlier_threshold=outlier_threshold if llm_int8 else None)
        elif method == "nf4":
            options.update(block_size=block_size, double_quant=double_quant)
        else:
            _check_group(model, paths, group_size)
            options.update(group_size=group_size)
        for p in paths:
            set_module(model, p, _round_to_nearest(model.get_submodule(p), method, group_size, block_size,
                                                   double_quant, dtype, llm_int8, outlier_threshold))
    elif method == "awq":
        paths = _targets(model, targets, (nn.Linear,))
        _check_group(model, paths, group_size)
        options.update(group_size=group_size, calib_samples=int(calib.shape[0]), calib_seq_len=int(calib.shape[1]))
        _calibrated(model, method, paths, calib, calib_batch_size,
                    lambda block, stats, names: awq_block(block, stats, names, group_size, dtype=dtype))
    else:  # gptq
        paths = _targets(model, targets, (nn.Linear,))
        _check_group(model, paths, group_size)
        options.update(group_size=group_size, act_order=act_order, damp=damp,
                       calib_samples=int(calib.shape[0]), calib_seq_len=int(calib.shape[1]))
        _calibrated(model, method, paths, calib, calib_batch_size,
                    lambda block, stats, names: gptq_block(block, stats, names, group_size, act_order, damp, dtype))
    if lm_head != "keep":
        quantize_head(model, lm_head, group_size=group_size, block_size=block_size, double_quant=double_quant,
                      dtype=dtype)
        options["lm_head"] = lm_head
    model.quantization_config = options
    return model


@torch.no_grad()
def quantize_head(model: Transformer, method: str, *, group_size: int = 128, block_size: int = 64,
                  double_quant: bool = True, dtype: torch.dtype | None = None) -> None:
    """Quantize the output head in place: int8 per channel, int4 in groups of `group_size`, or nf4 ("keep": leave
    it). A head tied to the embedding is untied first: it gets its own (quantized) copy of the matrix and the
    embedding stays full precision, since a lookup reads one row a token (llama.cpp's K-quant mixes keep the
    output matrix in 6 bits the same way)."""
    if method not in HEAD_METHODS:
        raise ConfigError(f"lm_head: unknown method '{method}'{did_you_mean(method, HEAD_METHODS)}; "
                          f"use one of {', '.join(HEAD_METHODS)}")
    if method == "keep":
        return
    if model.lm_head is None:
        w = model.embed.weight
        model.lm_head = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        model.lm_head.weight.copy_(w)
        model.cfg = model.cfg.model_copy(update={"tie_embeddings": False})
    head = model.lm_head
    if type(head) is not nn.Linear:
        raise ConfigError(f"lm_head is already a {type(head).__name__}: quantize the head once (lm_head=keep)")
    if method == "int4":
        _check_group(model, ["lm_head"], group_size)
    set_module(model, "lm_head", _round_to_nearest(head, method, group_size, block_size, double_quant, dtype))


def _round_to_nearest(linear: nn.Linear, method: str, group_size: int, block_size: int, double_quant: bool,
                      dtype: torch.dtype | None, llm_int8: bool = False, outlier_threshold: float = 6.0) -> QuantLinear:
    """`linear` as the quantized layer of a round-to-nearest method (int8 [LLM.int8()], int4/rtn, nf4)."""
    if method == "int8":
        act_bits, thr = (8, outlier_threshold) if llm_int8 else (None, None)
        return Int8Linear.from_linear(linear, act_bits, thr, dtype)
    if method == "nf4":
        return NF4Linear.from_linear(linear, block_size, double_quant, dtype=dtype)
    return Int4Linear.from_linear(linear, group_size, dtype)


def quantized_size(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's tensors: quantized linears (codes + constants), and everything else."""
    quant = sum(m.nbytes for m in quantized_linears(model).values())
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"quantized_bytes": quant, "total_bytes": total}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_quantized(model: Transformer, out_dir: str | Path) -> Path:
    """Write `model` (with quantized linears) as config.json (+ quantization_config) and model.safetensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(isinstance(m, (FakeQuantLinear, BitLinear)) for m in model.modules()):
        raise ConfigError("the model still has training-time fake-quant layers (QAT/BitLinear): convert them first "
                          "(convert_qat(model) or quantize_model(model, 'bitnet'))")
    specs = {p: m.spec() for p, m in quantized_linears(model).items()}
    dtype = model.embed.weight.dtype
    config = hf_config_dict(model.cfg, dtype)
    config["quantization_config"] = {"quant_method": "lmforge", "format_version": FORMAT_VERSION,
                                     **model.quantization_config, "modules": specs}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = out / f".model.safetensors.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt", "quant_method": "lmforge"})
    os.replace(tmp, out / "model.safetensors")
    _write_json(out / "config.json", config)
    cfg = model.cfg
    gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                             ("pad_token_id", cfg.pad_token_id)) if v is not None}
    if gen:
        _write_json(out / "generation_config.json", gen)
    return out


def load_quantized(path: str | Path, device: str | torch.device = "cpu",
                   dtype: str | torch.dtype | None = None) -> Transformer:
    """Rebuild a model saved by `save_quantized`: quantized modules from their specs, tensors loaded exactly.

    `dtype` (default: the checkpoint's) is the compute dtype: floating tensors are cast to it, codes never are."""
    path = Path(path)
    hf = read_hf_config(path)
    qc = hf.get("quantization_config")
    if not qc or qc.get("quant_method") != "lmforge":
        raise CheckpointError(f"'{path}' is not an lmforge quantized checkpoint (config.json has no "
                              f"quantization_config with quant_method 'lmforge'); load it with load_hf")
    cfg = converter_for(architecture_of(hf)).build_config(hf)
    specs: dict[str, dict] = qc.get("modules", {})
    file = path / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"no model.safetensors in '{path}'")
    with safe_open(str(file), framework="pt", device=str(device)) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    saved = parse_dtype(hf.get("torch_dtype") or "float32")
    model = build_quantized(cfg, specs, saved, state, str(file))
    model.quantization_config = {k: v for k, v in qc.items() if k not in ("modules", "quant_method", "format_version")}
    return model if dtype is None else model.to(parse_dtype(dtype))


def build_quantized(cfg, specs: dict[str, dict], dtype: torch.dtype, state: dict[str, torch.Tensor],
                    source: str) -> Transformer:
    """A Transformer whose linears at the paths of `specs` are `QUANT_LINEARS[spec["type"]]`, filled with the native
    state dict `state` (every tensor keeps its dtype, bit-exact); `source` names the file in errors."""
    for p, spec in specs.items():
        if spec.get("type") not in QUANT_LINEARS:
            raise CheckpointError(f"{source}: module '{p}' has unknown quantized type {spec.get('type')!r}")

    def linear(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        spec = specs.get(name)
        if spec is None:
            return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
        opts = {k: v for k, v in spec.items() if k not in ("type", "bias")}
        try:
            return QUANT_LINEARS[spec["type"]](in_features, out_features, spec["bias"], **opts, dtype=dtype)
        except ValueError as e:  # options that do not fit the layer's shape (a group size that does not divide)
            raise CheckpointError(f"{source}: module '{name}': {e}") from None

    with torch.device("meta"):
        model = Transformer(cfg, linear).to(dtype)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"lacks '{missing[0]}'" if missing else f"has unexpected tensor '{unexpected[0]}'"
        raise CheckpointError(f"{source} {what} (+{len(missing) + len(unexpected) - 1} more mismatches)")
    bad = next((k for k, t in state.items() if t.shape != expected[k].shape), None)
    if bad is not None:
        raise CheckpointError(f"{source}: tensor '{bad}' has shape {tuple(state[bad].shape)}, config.json implies "
                              f"{tuple(expected[bad].shape)}")
    model.load_state_dict(state, strict=True, assign=True)  # assign: every tensor keeps its saved dtype, bit-exact
    model.reset_buffers()
    return model.eval()


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized linear by an `nn.Linear` holding its dequantized weight (in place; returns `model`):
    what a full-precision export (or a merge of an adapter trained on the quantized model) writes."""
    for path, q in quantized_linears(model).items():
        w = q.weight
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=w.dtype, device=w.device)
        lin.weight.copy_(w)
        if q.bias is not None:
            lin.bias.copy_(q.bias)
        lin.requires_grad_(False)
        set_module(model, path, lin)
    model.quantization_config = {}
    return model
