"""Quantized checkpoint formats: lmforge's own, and GPTQ / AWQ as transformers, vLLM and the GPTQ/AWQ tools write them.

`load_quantized_checkpoint` is what `lmforge.models.load_hf` calls when config.json has a ``quantization_config``:
it dispatches on ``quant_method`` (``lmforge``, ``gptq``, ``awq``), builds the quantized model on the device and
then installs each layer's fused kernel for that device (`prepare_fast_path`), so every verb gets the fast path
without asking for it. `save_format(model, dir, "gptq" | "awq" | "lmforge")` writes one.

GPTQ and AWQ store what lmforge's `Int4Linear` stores -- 4-bit codes q, per group of input columns a scale s and a
zero point z, ``W = (q - z) * s`` -- in int32 words of eight 4-bit values (value j in bits 4j..4j+3), with the
layout of each (HF module names, config.json ``quantization_config``):

GPTQ (``quant_method: gptq``, ``checkpoint_format: gptq``)::

    qweight  int32 (in / 8, out)    word [i, o] packs W's codes q[o, 8i + j], j = 0..7     (packed along the input)
    qzeros   int32 (groups, out / 8) word [g, k] packs z[8k + j, g] - 1 (the "v1" offset; gptq_v2 stores z)
    scales   fp16  (groups, out)
    g_idx    int32 (in,)            group of each input column: i // group_size, or any order with act-order
                                    (``desc_act: true``), each group still of group_size columns

AWQ GEMM (``quant_method: awq``, ``version: gemm``)::

    qweight  int32 (in, out / 8)    word [i, k] packs q[8k + ORDER[j], i] in value j, ORDER = 0 2 4 6 1 3 5 7
    qzeros   int32 (groups, out / 8) same packing of z (no offset)
    scales   fp16  (groups, out)

8-bit GPTQ (lmforge's INT8): four 8-bit codes per word, one group (``group_size: -1``), code = q + 128 and zero
point 128 (``sym: true``). Every other tensor (embeddings, norms, the LM head, biases) is the plain HF tensor. AWQ's activation scales are
already folded into the preceding norm / linear by lmforge's AWQ, as AutoAWQ does for these architectures.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError, ConfigError
from .linear import Int4Linear, Int8Linear, prepare_fast_path
from .nf4 import pack_nibbles

__all__ = ["FORMATS", "READABLE", "Int4ActOrderLinear", "load_quantized_checkpoint", "save_format", "use_fast_path",
           "pack_int32", "unpack_int32", "AWQ_ORDER"]

FORMATS = ("lmforge", "gptq", "awq")  # what `lmforge quantize --format` writes
READABLE = FORMATS  # the quant_method values load_hf reads (others fall through to the plain loader)
INT4_METHODS = ("int4", "rtn", "awq", "gptq")
FORMAT_METHODS = {"lmforge": ("int8", "int4", "rtn", "nf4", "awq", "gptq", "bitnet"),  # methods each format holds
                  "gptq": (*INT4_METHODS, "int8"), "awq": INT4_METHODS}
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # value j of an AWQ word holds column 8k + AWQ_ORDER[j]
_QPARTS = (".qweight", ".qzeros", ".scales", ".g_idx")


class Int4ActOrderLinear(Int4Linear):
    """INT4 whose groups are not consecutive input columns: GPTQ's act-order (``desc_act``) layout, where group g
    holds the columns ``perm[g * group_size:(g + 1) * group_size]``. Stored as an `Int4Linear` over the permuted
    columns plus ``perm`` (in,); the forward gathers the input's columns into that order first."""

    kind = "int4_act_order"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 128,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, out_features, bias, group_size, dtype, device)
        self.register_buffer("perm", torch.arange(in_features, device=device))

    @property
    def weight(self) -> torch.Tensor:
        return super().weight[:, torch.argsort(self.perm)]  # back to the natural column order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.index_select(-1, self.perm))

    @classmethod
    @torch.no_grad()
    def pack(cls, layers: list[Int4Linear]) -> Int4ActOrderLinear | None:
        """As `QuantLinear.pack`, for layers whose columns share one order (q/k/v or gate/up see one input, so
        GPTQ gives them one Hessian and one order); None otherwise."""
        if any(type(m) is not cls or not torch.equal(m.perm, layers[0].perm) for m in layers):
            return None
        out = super().pack(layers)
        if out is not None:
            out.perm = layers[0].perm
        return out


def use_fast_path(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Install the device's fused kernels on every quantized linear of `model` (already on its device) for inputs
    of `dtype`; each layer checks its kernel against the reference on a probe input first. The probe's random
    numbers come from a forked generator, so loading a model never moves the caller's RNG."""
    device = next((t.device for t in model.buffers()), torch.device("cpu"))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return prepare_fast_path(model, dtype)


# ------------------------------------------------------------------------------------------------- int32 packing


def pack_int32(values: torch.Tensor, order: tuple[int, ...] | None = None, bits: int = 4) -> torch.Tensor:
    """`bits`-bit values (..., n) in [0, 2**bits) -> int32 words (..., n * bits / 32): value j of word k (bits
    j*bits ...) holds element k * 32/bits + order[j] (order: identity by default, `AWQ_ORDER` for AWQ)."""
    per = 32 // bits
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, per)  # (..., m, per)
    if order is not None:
        v = v[..., list(order)]
    words = (v << torch.arange(0, 32, bits, device=v.device)).sum(-1)  # in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(words: torch.Tensor, order: tuple[int, ...] | None = None, bits: int = 4) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 (..., m) -> uint8 (..., m * 32/bits)."""
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=words.dtype)
    v = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (..., m, 32/bits), value j
    if order is not None:
        v = v[..., torch.argsort(torch.tensor(order)).tolist()]  # element i sits in value order.index(i)
    return v.flatten(-2).to(torch.uint8)


# ------------------------------------------------------------------------------------------------------- writing


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _check_writable(model: nn.Module, fmt: str) -> tuple[dict[str, nn.Module], int, int]:
    """The layers `fmt` will hold, their common group size (-1: per output channel) and bits, or a one-line
    ConfigError: INT4 layers (gptq, awq), or weight-only INT8 per channel (gptq's 8-bit, symmetric)."""
    from ..models.modules import linear_modules
    from .model import quantized_linears

    quant = quantized_linears(model)
    method = model.quantization_config.get("method", "?")
    int8 = fmt == "gptq" and bool(quant) and all(type(m) is Int8Linear and m.act_bits is None for m in quant.values())
    if not int8 and (not quant or not all(isinstance(m, Int4Linear) for m in quant.values())):
        raise ConfigError(f"format {fmt} stores integer weights: quantize with method "
                          f"{', '.join(FORMAT_METHODS[fmt])} (method '{method}' is saved with format lmforge)")
    if fmt == "awq" and any(isinstance(m, Int4ActOrderLinear) for m in quant.values()):
        raise ConfigError("format awq has no act-order groups (g_idx): save this model with format gptq or lmforge")
    sizes = {-1 if int8 else m.group_size for m in quant.values()}
    if len(sizes) > 1:
        raise ConfigError(f"format {fmt} has one group_size for the whole model; this one mixes {sorted(sizes)}")
    plain = [p for p, m in linear_modules(model).items() if p.startswith("layers.") and p not in quant]
    if plain:
        raise ConfigError(f"format {fmt} quantizes every linear inside the blocks and '{plain[0]}' is not "
                          f"quantized: use targets=all-linear, or format lmforge")
    if "lm_head" in quant:
        raise ConfigError(f"format {fmt} keeps lm_head in full precision: leave it out of the targets")
    for p, m in quant.items():
        if m.in_features % 8 or m.out_features % 8:
            raise ConfigError(f"format {fmt} packs codes in int32 words: '{p}' is {m.in_features} -> "
                              f"{m.out_features}, not multiples of 8; use format lmforge")
    return quant, sizes.pop(), 8 if int8 else 4


def _hf_groups(conv, quant: dict[str, Int4Linear], fmt: str) -> dict[str, list[str]]:
    """{HF module: the native quantized linears it stores, in order}, or a one-line ConfigError for a fused module
    whose parts cannot share one GPTQ/AWQ tensor."""
    groups: dict[str, list[str]] = {}
    for p in quant:
        found = conv.linear_group(p)
        if found is None:
            raise ConfigError(f"format {fmt} cannot write '{p}': no Hugging Face name for it; use format lmforge")
        hf, parts, transform = found
        if hf in groups:
            continue
        others = ", ".join(q for q in parts if q != p)
        if len(parts) > 1 and transform not in ("qkv", "qkv_cat", "cat"):
            raise ConfigError(f"format {fmt} cannot write '{p}': the checkpoint interleaves it with {others} "
                              f"({transform}); use format lmforge")
        if len(parts) > 1 and any(quant.get(q) is None or isinstance(quant[q], Int4ActOrderLinear) for q in parts):
            raise ConfigError(f"format {fmt} cannot write '{p}': the checkpoint stores it fused with {others}, "
                              "which must all be INT4 with consecutive groups; use format lmforge")
        groups[hf] = list(parts)
    return groups


@torch.no_grad()
def save_format(model: nn.Module, out_dir: str | Path, fmt: str = "lmforge") -> Path:
    """Write a quantized `model` as `fmt`: lmforge (`save_quantized`), gptq or awq (the layouts in this module's
    docstring, float tensors in fp16 -- bf16 for a bf16 model -- as the GPTQ/AWQ kernels expect)."""
    from ..models.converters import converter_for
    from ..models.hf import hf_config_dict
    from .model import save_quantized

    if fmt not in FORMATS:
        raise ConfigError(f"unknown format '{fmt}'; available: {', '.join(FORMATS)}")
    if fmt == "lmforge":
        return save_quantized(model, out_dir)
    quant, group_size, bits = _check_writable(model, fmt)
    cfg = model.cfg
    conv = converter_for(cfg.arch)
    dtype = torch.bfloat16 if model.embed.weight.dtype == torch.bfloat16 else torch.float16
    groups = _hf_groups(conv, quant, fmt)
    owned = {f"{p}.{b}" for p, m in quant.items() for b, _ in m.named_buffers(recurse=False)}
    native = {k: v for k, v in model.state_dict().items() if k not in owned}  # biases of quantized layers stay
    tensors = {name: (t.to(dtype) if t.is_floating_point() else t).detach().cpu().contiguous()
               for name, t in conv.to_hf(native, cfg)}
    act_order = False
    for hf, parts in groups.items():
        layers = [quant[p] for p in parts]
        m = layers[0]
        # fused checkpoints (Phi-3 qkv_proj, GPT-2 c_attn) stack their linears' output rows
        if bits == 8:  # symmetric per channel: code = q + 128, one group of all input columns, zero point 128
            codes = torch.cat([layer.qweight.to(torch.int16) + 128 for layer in layers])  # (out, in) in [1, 255]
            scale = torch.cat([layer.scale for layer in layers])[:, None]  # (out, 1)
            zero = torch.full_like(scale, 128, dtype=torch.int16)
        else:
            codes = torch.cat([layer.codes() for layer in layers])  # (out, in) over stored columns
            scale = torch.cat([layer.nk_buffers()[1] for layer in layers])
            zero = torch.cat([layer.nk_buffers()[2] for layer in layers])
        if isinstance(m, Int4ActOrderLinear):
            inverse = torch.argsort(m.perm)
            codes = codes[:, inverse]  # natural column order; column i is in group (its position in perm) // g
            g_idx = (inverse // group_size).to(torch.int32)
            act_order = act_order or not torch.equal(m.perm, torch.arange(m.in_features, device=m.perm.device))
        else:
            g_idx = torch.arange(m.in_features, dtype=torch.int32, device=codes.device) // abs(group_size) \
                if group_size > 0 else torch.zeros(m.in_features, dtype=torch.int32, device=codes.device)
        if fmt == "gptq":
            tensors[f"{hf}.qweight"] = pack_int32(codes, bits=bits).T  # (in * bits / 32, out)
            v1 = (zero.T.to(torch.int64) - 1) & (2**bits - 1)  # the "v1" offset GPTQ kernels add back
            tensors[f"{hf}.qzeros"] = pack_int32(v1, bits=bits)  # (groups, out * bits / 32)
            tensors[f"{hf}.g_idx"] = g_idx
        else:
            tensors[f"{hf}.qweight"] = pack_int32(codes.T, AWQ_ORDER)  # (in, out / 8)
            tensors[f"{hf}.qzeros"] = pack_int32(zero.T, AWQ_ORDER)  # (groups, out / 8)
        tensors[f"{hf}.scales"] = scale.T.to(dtype)  # (groups, out)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if fmt == "gptq":
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": bits == 8,
              "static_groups": False, "true_sequential": True, "lm_head": False, "checkpoint_format": "gptq",
              "damp_percent": 0.01}
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": None}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".model.safetensors.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    _write_json(out / "config.json", {**hf_config_dict(cfg, dtype), "quantization_config": qc})
    gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                             ("pad_token_id", cfg.pad_token_id)) if v is not None}
    if gen:
        _write_json(out / "generation_config.json", gen)
    return out


# ------------------------------------------------------------------------------------------------------- reading


def _options(path: Path, qc: dict, method: str) -> dict:
    """The reading options of a GPTQ/AWQ quantization_config, or a one-line CheckpointError naming the field."""
    where = f"{path}/config.json quantization_config"
    bits = qc.get("bits", qc.get("w_bit", 4))
    if bits not in ((4, 8) if method == "gptq" else (4,)):
        raise CheckpointError(f"{where}.bits={bits} is not supported: lmforge reads "
                              f"{'4- and 8-bit' if method == 'gptq' else '4-bit'} {method.upper()}")
    group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if method == "gptq":
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointError(f"{where}.checkpoint_format='{fmt}' is not supported; readable: gptq, gptq_v2")
        return {"group_size": group_size, "zero_offset": 1 if fmt == "gptq" else 0, "bits": bits}
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise CheckpointError(f"{where}.version='{version}' is not supported: lmforge reads AWQ's gemm layout")
    if qc.get("zero_point", True) is not True:
        raise CheckpointError(f"{where}.zero_point=false is not supported: lmforge reads AWQ with zero points")
    return {"group_size": group_size, "bits": 4}


def _int4_state(source: str, name: str, parts: dict[str, torch.Tensor], method: str, opts: dict,
                dtype: torch.dtype) -> tuple[dict, dict[str, torch.Tensor]]:
    """(spec, native buffers) of one GPTQ/AWQ module from its parts."""
    missing = [s for s in _QPARTS[:3] if s not in parts]
    if missing:
        raise CheckpointError(f"{source}: quantized module '{name}' has no '{name}{missing[0]}'")
    qweight, qzeros, scales = parts[".qweight"], parts[".qzeros"], parts[".scales"]
    bits = opts["bits"]
    if method == "gptq":
        codes = unpack_int32(qweight.T.contiguous(), bits=bits)  # (out, in)
        zero = (unpack_int32(qzeros, bits=bits).to(torch.int16) + opts["zero_offset"]) & (2**bits - 1)  # (groups, out)
    else:
        codes = unpack_int32(qweight, AWQ_ORDER).T.contiguous()  # (out, in)
        zero = unpack_int32(qzeros, AWQ_ORDER)
    out_f, in_f = codes.shape
    zero, scale = zero.T.to(torch.uint8).contiguous(), scales.T.to(dtype).contiguous()  # (out, groups)
    n_groups = scale.shape[1]
    if zero.shape != scale.shape or scale.shape[0] != out_f or in_f % n_groups:
        raise CheckpointError(f"{source}: '{name}' has qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} "
                              f"and scales {tuple(scales.shape)}, which do not fit one {method.upper()} layer")
    group_size = in_f // n_groups
    if bits == 8:  # lmforge's INT8 is per output channel and symmetric: one group, zero point 128
        if n_groups != 1 or not (zero == 128).all():
            raise CheckpointError(f"{source}: '{name}' is 8-bit GPTQ with {n_groups} groups and zero points other than "
                                  "128; lmforge reads 8-bit GPTQ per channel (group_size -1, sym true)")
        return {"type": Int8Linear.kind, "act_bits": None, "outlier_threshold": None}, {
            "qweight": (codes.to(torch.int16) - 128).to(torch.int8), "scale": scale[:, 0].contiguous()}
    spec = {"type": Int4Linear.kind, "group_size": group_size}
    buffers = {}
    g_idx = parts.get(".g_idx")
    if g_idx is not None and not torch.equal(g_idx.long().cpu(), torch.arange(in_f) // group_size):
        perm = torch.argsort(g_idx.long(), stable=True)  # columns of group 0 first, then group 1, ...
        if not torch.equal(torch.bincount(g_idx.long(), minlength=n_groups).cpu(), torch.full((n_groups,), group_size)):
            raise CheckpointError(f"{source}: '{name}.g_idx' does not give every group {group_size} columns")
        codes = codes[:, perm]
        spec["type"] = Int4ActOrderLinear.kind
        buffers["perm"] = perm
    buffers.update(qweight=pack_nibbles(codes), scale=scale, zero=zero)
    return spec, buffers


@torch.no_grad()
def _load_gptq_awq(path: Path, hf: dict, method: str, dtype: torch.dtype | None, device) -> nn.Module:
    from ..models.converters import converter_of
    from ..models.hf import _weight_files, parse_dtype  # the shard list (index.json or *.safetensors)
    from ..models.transformer import Transformer
    from .model import build_quantized

    qc = hf["quantization_config"]
    opts = _options(path, qc, method)
    conv = converter_of(hf)
    cfg = conv.build_config(hf)
    dtype = dtype or parse_dtype(hf.get("torch_dtype") or hf.get("dtype") or "float16")
    with torch.device("meta"):
        plain = Transformer(cfg)
    expected = set(plain.state_dict())  # the plain model's names: tells a stray zero bias apart
    out_features = {p: m.out_features for p, m in plain.named_modules() if isinstance(m, nn.Linear)}
    state: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for hf_name in f.keys():
                suffix = next((s for s in _QPARTS if hf_name.endswith(s)), None)
                if suffix is not None:
                    parts.setdefault(hf_name[: -len(suffix)], {})[suffix] = f.get_tensor(hf_name)
                    continue
                if conv.skips(hf_name, cfg):
                    continue
                t = f.get_tensor(hf_name)
                for name, native in conv.to_native(hf_name, t, cfg):
                    if name == "lm_head.weight" and cfg.tie_embeddings:
                        continue
                    if name.endswith(".bias") and name not in expected and not native.any():
                        continue  # GPTQ tools store a zero bias for every quantized layer
                    state[name] = native.to(dtype) if native.is_floating_point() else native
    specs: dict[str, dict] = {}
    source = str(path)
    for hf_module, ps in parts.items():
        found = conv.linear_group(hf_module, hf=True)
        if found is None or (len(found[1]) > 1 and found[2] not in ("qkv", "qkv_cat", "cat")):
            raise CheckpointError(f"{source}: quantized module '{hf_module}' has no counterpart lmforge reads in "
                                  f"{cfg.arch}")
        spec, buffers = _int4_state(source, hf_module, ps, method, opts, dtype)
        natives = found[1]
        sizes = [out_features[n] for n in natives]  # a fused module (Phi-3 qkv_proj) stacks its linears' rows
        if sum(sizes) != buffers["qweight"].shape[0]:
            raise CheckpointError(f"{source}: '{hf_module}' has {buffers['qweight'].shape[0]} output rows, "
                                  f"config.json implies {sum(sizes)}")
        split = {k: v.split(sizes) if k != "perm" else [v] * len(natives) for k, v in buffers.items()}
        for i, native_module in enumerate(natives):
            specs[native_module] = {**spec, "bias": f"{native_module}.bias" in state}
            state.update({f"{native_module}.{k}": v[i].contiguous() for k, v in split.items()})
    if not specs:
        raise CheckpointError(f"{source}: config.json says {method.upper()} but no tensor ends in .qweight")
    model = build_quantized(cfg, specs, dtype, state, source)
    model.quantization_config = {"method": method, "group_size": opts["group_size"], "format": method}
    return model


def load_quantized_checkpoint(path: str | Path, hf: dict, dtype: torch.dtype | None = None,
                              device: str | torch.device = "cpu") -> nn.Module:
    """The model of a quantized checkpoint directory with config.json `hf` (its ``quantization_config`` names the
    format), on `device`, floating tensors in `dtype` (default: the checkpoint's), fast path installed."""
    path = Path(path)
    method = str(hf["quantization_config"].get("quant_method", "")).lower()
    if method == "lmforge":
        from .model import load_quantized

        model = load_quantized(path, device=device, dtype=dtype)
    elif method in ("gptq", "awq"):
        model = _load_gptq_awq(path, hf, method, dtype, device)
    else:
        raise CheckpointError(f"{path}/config.json: quantization_config.quant_method '{method}' is not readable by "
                              f"lmforge; readable: {', '.join(READABLE)}")
    use_fast_path(model, model.embed.weight.dtype)
    return model
