"""One converter per Hugging Face architecture: config mapping and tensor-name mapping, both directions.

A converter is data (a rename table) plus, where a checkpoint fuses or transposes tensors, a small transform.
`REGISTRY` maps every `architectures` value we read to its converter; adding a family means adding an entry here.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from pydantic import ValidationError

from ..errors import CheckpointError
from .config import ModelConfig, RopeScaling

# ---------------------------------------------------------------------------------------------------------------
# Tensor-name tables. "{i}" is a layer index, "{e}" an expert index, "{p}" a parameter kind (weight|bias). A transform
# names how a tensor differs between the two layouts: "T" transposed (GPT-2's Conv1D), "qkv" q|k|v concatenated along
# the output dim of a Conv1D (GPT-2), "qkv_heads" fused per head as [head, q|k|v, head_dim] (BLOOM), "qkv_cat" q|k|v
# rows of a Linear (Phi-3, ChatGLM), "cat" equal row blocks of a Linear (gate|up: GLM, Phi-3, ChatGLM). Fused
# entries list their native names in order. Stacked experts (one HF tensor with a leading expert dim, native names
# with "{e}"): "experts_T" (E, in, out) per-expert transposed (or (E, out) biases), "experts_cat" gate|up halves of
# (E, in, 2f) (Llama 4), "experts_interleaved" gate/up alternating along 2f (GPT-OSS).
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rename:
    hf: str
    native: str | tuple[str, ...]
    transform: str | None = None


LLAMA_NAMES = [
    Rename("model.embed_tokens.weight", "embed.weight"),
    Rename("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    *(Rename(f"model.layers.{{i}}.self_attn.{n}.{{p}}", f"layers.{{i}}.attn.{n}.{{p}}") for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
    Rename("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    *(Rename(f"model.layers.{{i}}.mlp.{n}.{{p}}", f"layers.{{i}}.mlp.{n}.{{p}}") for n in ("gate_proj", "up_proj", "down_proj")),
    Rename("model.norm.weight", "norm.weight"),
    Rename("lm_head.weight", "lm_head.weight"),
]

_QKV = ("layers.{i}.attn.q_proj.{p}", "layers.{i}.attn.k_proj.{p}", "layers.{i}.attn.v_proj.{p}")

GPT2_NAMES = [
    Rename("transformer.wte.weight", "embed.weight"),
    Rename("transformer.wpe.weight", "pos_embed.weight"),
    Rename("transformer.h.{i}.ln_1.{p}", "layers.{i}.attn_norm.{p}"),
    Rename("transformer.h.{i}.attn.c_attn.{p}", _QKV, "qkv"),
    Rename("transformer.h.{i}.attn.c_proj.{p}", "layers.{i}.attn.o_proj.{p}", "T"),
    Rename("transformer.h.{i}.ln_2.{p}", "layers.{i}.mlp_norm.{p}"),
    Rename("transformer.h.{i}.mlp.c_fc.{p}", "layers.{i}.mlp.up_proj.{p}", "T"),
    Rename("transformer.h.{i}.mlp.c_proj.{p}", "layers.{i}.mlp.down_proj.{p}", "T"),
    Rename("transformer.ln_f.{p}", "norm.{p}"),
    Rename("lm_head.weight", "lm_head.weight"),
]

BLOOM_NAMES = [
    Rename("transformer.word_embeddings.weight", "embed.weight"),
    Rename("transformer.word_embeddings_layernorm.{p}", "embed_norm.{p}"),
    Rename("transformer.h.{i}.input_layernorm.{p}", "layers.{i}.attn_norm.{p}"),
    Rename("transformer.h.{i}.self_attention.query_key_value.{p}", _QKV, "qkv_heads"),
    Rename("transformer.h.{i}.self_attention.dense.{p}", "layers.{i}.attn.o_proj.{p}"),
    Rename("transformer.h.{i}.post_attention_layernorm.{p}", "layers.{i}.mlp_norm.{p}"),
    Rename("transformer.h.{i}.mlp.dense_h_to_4h.{p}", "layers.{i}.mlp.up_proj.{p}"),
    Rename("transformer.h.{i}.mlp.dense_4h_to_h.{p}", "layers.{i}.mlp.down_proj.{p}"),
    Rename("transformer.ln_f.{p}", "norm.{p}"),
    Rename("lm_head.weight", "lm_head.weight"),
]


def _pattern(template: str) -> re.Pattern:
    body = (re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
            .replace(r"\{p\}", r"(?P<p>weight|bias)"))
    return re.compile(f"^{body}$")


# ---------------------------------------------------------------------------------------------------------------
# Config mapping helpers
# ---------------------------------------------------------------------------------------------------------------

HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}


def _activation(hf: Mapping, key: str) -> str:
    name = hf.get(key, "silu")
    if name not in HF_ACTIVATIONS:
        raise CheckpointError(f"config.json {key}='{name}' is not supported; supported: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


# Every key a rope_scaling / rope_parameters dict may carry; any other would change the math in a way lmforge does not
# know, so it is refused (naming the key) rather than ignored.
_ROPE_KEYS = {"rope_type", "type", "factor", "rope_theta", "partial_rotary_factor", "original_max_position_embeddings",
              "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim", "truncate", "short_factor", "long_factor"}
_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")


def _rope_scaling_from_hf(scaling: Mapping, hf: Mapping, where: str) -> RopeScaling | None:
    """One rope_scaling / rope_parameters dict (`where` names it in errors) → RopeScaling (None: plain RoPE).

    original_max_position_embeddings as transformers resolves it: a top-level key wins (Phi-3 keeps it there), then
    the dict's own, then max_position_embeddings."""
    unknown = sorted(set(scaling) - _ROPE_KEYS)
    if unknown:
        raise CheckpointError(f"config.json {where}.{unknown[0]} is not understood by lmforge (it would change the "
                              f"RoPE math); known keys: {', '.join(sorted(_ROPE_KEYS))}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise CheckpointError(f"config.json {where}.rope_type='{kind}' is not supported; supported: "
                              f"{', '.join(_ROPE_TYPES)}")
    if kind == "default":
        return None
    original = (hf.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
                or hf.get("max_position_embeddings"))
    fields: dict = {"type": kind, "factor": scaling.get("factor")}
    if kind in ("llama3", "yarn", "longrope"):
        fields["original_max_seq_len"] = original
    if kind == "llama3":
        fields.update(low_freq_factor=scaling["low_freq_factor"], high_freq_factor=scaling["high_freq_factor"])
    if kind == "yarn":
        fields.update(attention_factor=scaling.get("attention_factor"), beta_fast=scaling.get("beta_fast") or 32.0,
                      beta_slow=scaling.get("beta_slow") or 1.0, mscale=scaling.get("mscale"),
                      mscale_all_dim=scaling.get("mscale_all_dim"), truncate=scaling.get("truncate", True))
    if kind == "longrope":
        fields.update(attention_factor=scaling.get("attention_factor"), short_factor=scaling.get("short_factor"),
                      long_factor=scaling.get("long_factor"))
    try:
        return RopeScaling(**fields)
    except (ValidationError, KeyError) as e:
        msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else f"missing {e}"
        raise CheckpointError(f"config.json {where} is invalid for rope_type '{kind}': {msg}") from None


def _rope_from_hf(hf: Mapping, default_theta: float = 10000.0) -> dict:
    """rope_theta + scaling from either transformers<5 keys (rope_theta, rope_scaling) or >=5 (rope_parameters)."""
    params = dict(hf.get("rope_parameters") or {})
    where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    scaling = dict(hf.get("rope_scaling") or {}) or params
    theta = hf.get("rope_theta", params.get("rope_theta", default_theta))
    out: dict = {"rope_theta": float(theta)}
    fraction = hf.get("partial_rotary_factor", params.get("partial_rotary_factor"))
    if fraction is not None:
        out["rotary_fraction"] = float(fraction)
    scaled = _rope_scaling_from_hf(scaling, hf, where)
    if scaled is not None:
        out["rope_scaling"] = scaled
    return out


def _rope_scaling_to_hf(s: RopeScaling) -> dict:
    """A RopeScaling as the rope_scaling dict transformers 4.x and 5.x read (only the keys its type uses)."""
    out: dict = {"rope_type": s.type}
    if s.factor is not None:
        out["factor"] = s.factor
    if s.type in ("llama3", "yarn", "longrope"):
        out["original_max_position_embeddings"] = s.original_max_seq_len
    if s.type == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    if s.type in ("yarn", "longrope") and s.attention_factor is not None:
        out["attention_factor"] = s.attention_factor
    if s.type == "yarn":
        out.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
        out.update({k: getattr(s, k) for k in ("mscale", "mscale_all_dim") if getattr(s, k) is not None})
    if s.type == "longrope":
        out.update(short_factor=list(s.short_factor), long_factor=list(s.long_factor))
    return out


def _rope_to_hf(cfg: ModelConfig) -> dict:
    """Write the transformers<5 keys, which both transformers 4.x and 5.x (and llama.cpp's converter) read."""
    out: dict = {"rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = _rope_scaling_to_hf(cfg.rope_scaling)
    return out


def _tokens(hf: Mapping) -> dict:
    return {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _require(hf: Mapping, key: str, expected, why: str) -> None:
    if hf.get(key, expected) != expected:
        raise CheckpointError(f"config.json {key}={hf[key]!r} is not supported ({why}); expected {expected!r}")


# ---------------------------------------------------------------------------------------------------------------
# Converter
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Join:
    """A tensor stored as several parts (a quantized weight and its scales), rebuilt into one before mapping.

    `suffixes` name the parts (the HF name is base + suffix); `result` is the rebuilt tensor's suffix; `fn` takes the
    parts in order. `quantized_first` limits a first suffix that also names ordinary tensors (".weight") to its
    quantized form (a non-float dtype)."""

    suffixes: tuple[str, ...]
    result: str
    fn: Callable[..., torch.Tensor]
    quantized_first: bool = False

    def part(self, name: str, tensor: torch.Tensor) -> tuple[str, int] | None:
        """(base, part index) when `name` is one of this join's parts."""
        for idx, suffix in sorted(enumerate(self.suffixes), key=lambda x: -len(x[1])):  # longest suffix first
            if name.endswith(suffix):
                if idx == 0 and self.quantized_first and tensor.dtype in _FULL_PRECISION:
                    return None
                return name[: -len(suffix)], idx
        return None


_FULL_PRECISION = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _fp8_join(weight, scale_inv):
    from .dequant import fp8_block_dequant
    return fp8_block_dequant(weight, scale_inv)


def _mxfp4_join(blocks, scales):
    """MXFP4 stacked experts (E, out, in/32, 16) -> (E, in, out), the layout of the unquantized tensor."""
    from .dequant import mxfp4_dequant
    return mxfp4_dequant(blocks, scales).transpose(-1, -2).contiguous()


FP8_BLOCKS = Join((".weight", ".weight_scale_inv"), ".weight", _fp8_join, quantized_first=True)
MXFP4 = Join(("_blocks", "_scales"), "", _mxfp4_join)


@dataclass
class Converter:
    """Maps one HF architecture to the native model and back.

    `config_from_hf(hf_dict) -> dict of ModelConfig fields`; `config_to_hf(cfg) -> dict` (arch-specific keys; the
    caller adds `architectures`, `torch_dtype`); `names` the tensor rename table; `ignore` HF keys that are
    derived buffers, not weights; `extra_to_hf(cfg)` buffers a checkpoint format stores although they are derived
    (ChatGLM's rotary inv_freq), written on save. `joins` rebuild quantized tensors from their parts on load;
    `extra_layers`: tensors of layers numbered n_layers and up are skipped on load (DeepSeek-V3's / GLM-4.5's
    multi-token-prediction modules, which lmforge does not run).
    """

    architectures: tuple[str, ...]
    model_type: str
    config_from_hf: Callable[[Mapping], dict]
    config_to_hf: Callable[[ModelConfig], dict]
    names: list[Rename]
    ignore: tuple[str, ...] = ()
    optional_prefix: str = ""  # original GPT-2/BLOOM checkpoints omit this prefix
    extra_to_hf: Callable[[ModelConfig], dict[str, torch.Tensor]] | None = None
    defaults: Mapping = field(default_factory=dict)  # the transformers config class's defaults for absent keys
    rewrite: tuple[tuple[str, str], ...] = ()  # (prefix, replacement): a multimodal checkpoint's text decoder
    joins: tuple[Join, ...] = ()
    extra_layers: bool = False
    _compiled: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        self._compiled = [(_pattern(r.hf), r) for r in self.names]

    def build_config(self, hf: Mapping) -> ModelConfig:
        fields = self.config_from_hf({**self.defaults, **hf})
        fields.setdefault("arch", self.architectures[0])
        try:
            return ModelConfig(**fields)
        except ValidationError as e:  # report the first problem on one line
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "config"
            raise CheckpointError(f"config.json gives an invalid model ({where}): {err['msg']}") from None

    def skips(self, hf_name: str, cfg: ModelConfig) -> bool:
        """Tensors that are not loaded: derived buffers (`ignore`) and layers beyond n_layers (`extra_layers`)."""
        if any(re.search(p, hf_name) for p in self.ignore):
            return True
        m = re.match(r"^model\.layers\.(\d+)\.", self._rewritten(hf_name)) if self.extra_layers else None
        return bool(m) and int(m.group(1)) >= cfg.n_layers

    def join_part(self, hf_name: str, tensor: torch.Tensor) -> tuple[Join, str, int] | None:
        """(join, base name, part index) when `hf_name` is one part of a quantized tensor."""
        for join in self.joins:
            found = join.part(hf_name, tensor)
            if found is not None:
                return join, *found
        return None

    def to_native(self, hf_name: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
        """Native (name, tensor) pairs for one HF tensor; [] for ignored buffers; error for unknown names."""
        if self.skips(hf_name, cfg):
            return []
        hf_name = self._rewritten(hf_name)
        if self.optional_prefix and not hf_name.startswith(self.optional_prefix) and not hf_name.startswith("lm_head"):
            hf_name = self.optional_prefix + hf_name
        for pattern, rule in self._compiled:
            m = pattern.match(hf_name)
            if m:
                fill = {k: v for k, v in m.groupdict().items() if v is not None}
                if isinstance(rule.native, tuple):
                    names = _native_names(rule, fill, cfg)
                    return list(zip(names, _split_fused(tensor, rule.transform, cfg, len(names))))
                return [(rule.native.format(**fill), _transpose(tensor) if rule.transform == "T" else tensor)]
        raise CheckpointError(f"checkpoint tensor '{hf_name}' has no mapping for {self.architectures[0]}; "
                              "the checkpoint is a variant lmforge does not support yet")

    def _rewritten(self, hf_name: str) -> str:
        for prefix, replacement in self.rewrite:
            if hf_name.startswith(prefix):
                return replacement + hf_name[len(prefix):]
        return hf_name

    def hf_module_name(self, native_module: str) -> str | None:
        """HF module path of a native linear (e.g. "layers.0.attn.q_proj" → "model.layers.0.self_attn.q_proj");
        None when the checkpoint fuses it with others (GPT-2 c_attn, BLOOM query_key_value)."""
        for rule in self.names:
            templates = rule.native if isinstance(rule.native, tuple) else (rule.native,)
            for t in templates:
                m = _pattern(t).match(f"{native_module}.weight")
                if m:
                    if isinstance(rule.native, tuple):
                        return None
                    fill = {k: v for k, v in m.groupdict().items() if v is not None}
                    return rule.hf.format(**fill).removesuffix(".weight")
        return None

    def native_module_name(self, hf_module: str) -> str | None:
        """Inverse of `hf_module_name` (accepts names with or without the optional prefix)."""
        name = self._rewritten(f"{hf_module}.weight")
        if self.optional_prefix and not name.startswith(self.optional_prefix) and not name.startswith("lm_head"):
            name = self.optional_prefix + name
        for pattern, rule in self._compiled:
            m = pattern.match(name)
            if m and not isinstance(rule.native, tuple):
                fill = {k: v for k, v in m.groupdict().items() if v is not None}
                return rule.native.format(**fill).removesuffix(".weight")
        return None

    def linear_group(self, module: str, hf: bool = False) -> tuple[str, tuple[str, ...], str | None] | None:
        """(HF module, the native linears it holds in order, transform) of a native linear path -- or of an HF module
        path with `hf=True`: one linear for most families, q/k/v or gate/up where the checkpoint fuses them (Phi-3's
        qkv_proj, GPT-2's c_attn); None when no rule names it (stacked experts are not linears here). What a
        quantized checkpoint, which stores linears rather than weights, is mapped with."""
        if hf:
            name = self._rewritten(f"{module}.weight")
            if self.optional_prefix and not name.startswith(self.optional_prefix) and not name.startswith("lm_head"):
                name = self.optional_prefix + name
            candidates = [(pattern, rule, name) for pattern, rule in self._compiled]
        else:
            candidates = [(_pattern(t), rule, f"{module}.weight") for rule in self.names
                          for t in (rule.native if isinstance(rule.native, tuple) else (rule.native,))]
        for pattern, rule, target in candidates:
            m = pattern.match(target)
            if m and not (rule.transform or "").startswith("experts"):
                fill = {k: v for k, v in m.groupdict().items() if v is not None}
                templates = rule.native if isinstance(rule.native, tuple) else (rule.native,)
                return (rule.hf.format(**fill).removesuffix(".weight"),
                        tuple(t.format(**fill).removesuffix(".weight") for t in templates), rule.transform)
        return None

    def to_hf(self, native: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """HF (name, tensor) pairs from a native state dict, fusing/transposing as the checkpoint layout needs."""
        for rule in self.names:
            templates = rule.native if isinstance(rule.native, tuple) else (rule.native,)
            for fill in _fills(rule.hf, cfg):
                parts = [native.get(n) for n in _native_names(rule, fill, cfg)]
                if any(t is None for t in parts):
                    continue
                name = rule.hf.format(**fill)
                if isinstance(rule.native, tuple):
                    yield name, _fuse(parts, rule.transform, cfg)
                else:
                    yield name, (_transpose(parts[0]) if rule.transform == "T" else parts[0]).contiguous()
        if self.extra_to_hf is not None:
            yield from self.extra_to_hf(cfg).items()


def _fills(template: str, cfg: ModelConfig) -> Iterator[dict]:
    """Every placeholder assignment of a name template: layers × experts × weight/bias."""
    ranges = {"i": range(cfg.n_layers), "e": range(cfg.moe_experts), "p": ("weight", "bias")}
    keys = [k for k in ranges if f"{{{k}}}" in template]
    yield from (dict(zip(keys, values)) for values in itertools.product(*(ranges[k] for k in keys)))


def _native_names(rule: Rename, fill: dict, cfg: ModelConfig) -> list[str]:
    """The native names of one HF tensor; a stacked-experts rule repeats its templates for every expert."""
    templates = rule.native if isinstance(rule.native, tuple) else (rule.native,)
    if rule.transform and rule.transform.startswith("experts"):
        return [t.format(**fill, e=e) for e in range(cfg.moe_experts) for t in templates]
    return [t.format(**fill) for t in templates]


def _transpose(t: torch.Tensor) -> torch.Tensor:
    """Conv1D (in, out) ↔ Linear (out, in); biases pass through."""
    return t.T if t.ndim == 2 else t


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    hd = cfg.dim_per_head
    return [cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd]


def _split_fused(t: torch.Tensor, kind: str, cfg: ModelConfig, n: int) -> list[torch.Tensor]:
    """One fused HF tensor -> its `n` native parts (see the transform names above)."""
    if kind.startswith("experts"):  # (E, ...) -> per expert, in the order of `_native_names`
        out = []
        for t_e in t.unbind(0):
            if kind == "experts_T":
                out.append(_transpose(t_e).contiguous())
                continue
            if kind == "experts_interleaved":
                gate, up = t_e[..., 0::2], t_e[..., 1::2]
            else:
                gate, up = t_e.chunk(2, dim=-1)
            out += [_transpose(gate).contiguous(), _transpose(up).contiguous()]
        return out
    if kind == "qkv":  # GPT-2 Conv1D: (in, q|k|v) → three (out, in)
        return [_transpose(p).contiguous() for p in t.split(_qkv_sizes(cfg), dim=-1)]
    if kind == "qkv_cat":  # Linear rows q|k|v (GQA sizes)
        return [p.contiguous() for p in t.split(_qkv_sizes(cfg), dim=0)]
    if kind == "cat":  # Linear rows gate|up
        return [p.contiguous() for p in t.chunk(n, dim=0)]
    # BLOOM: rows are [head, (q, k, v), head_dim]
    h, hd = cfg.n_heads, cfg.dim_per_head
    per_head = t.view(h, 3, hd, *t.shape[1:])
    return [per_head[:, j].reshape(h * hd, *t.shape[1:]).contiguous() for j in range(3)]


def _fuse(parts: list[torch.Tensor], kind: str, cfg: ModelConfig) -> torch.Tensor:
    """Native parts -> the fused HF tensor (inverse of `_split_fused`)."""
    if kind == "experts_T":
        return torch.stack([_transpose(p) for p in parts]).contiguous()
    if kind in ("experts_cat", "experts_interleaved"):
        per_expert = []
        for gate, up in zip(parts[0::2], parts[1::2]):
            gate, up = _transpose(gate), _transpose(up)  # (in, f) or (f,)
            if kind == "experts_cat":
                per_expert.append(torch.cat([gate, up], -1))
            else:
                per_expert.append(torch.stack([gate, up], -1).flatten(-2))
        return torch.stack(per_expert).contiguous()
    if kind == "qkv":
        return torch.cat([_transpose(p) for p in parts], dim=-1).contiguous()
    if kind in ("qkv_cat", "cat"):
        return torch.cat(parts, dim=0).contiguous()
    h, hd = cfg.n_heads, cfg.dim_per_head
    return torch.stack([p.view(h, hd, *p.shape[1:]) for p in parts], dim=1).reshape(3 * h * hd, *parts[0].shape[1:])


# ---------------------------------------------------------------------------------------------------------------
# The families
# ---------------------------------------------------------------------------------------------------------------

_ANY = object()
# Every field a family cannot express must hold this value, or saving would silently drop it.
_PLAIN = dict(norm="rms", norm_weight_offset=0.0, mlp="swiglu", parallel_block=False, scale_embeddings=False,
              pos="rope", rotary_fraction=1.0, rope_interleaved=False, sliding_window=None, sliding_window_layers=None,
              qkv_bias=False, out_bias=False, mlp_bias=False, embed_norm=False, lm_head_bias=False,
              qk_norm="none", norm_placement="pre", attn_scale=None, attn_logit_softcap=None,
              final_logit_softcap=None, nope_layers=(), rope_local_theta=None, rope_local_scaling=None,
              attention="gqa", attn_sinks=False, moe_router="softmax", moe_groups=1, moe_topk_groups=1,
              moe_score_bias=False, moe_routed_scale=1.0, moe_router_bias=False, moe_scale_input=False,
              moe_expert_bias=False, glu_limit=None, attn_chunk=None, attn_chunk_layers=None,
              attn_temperature_tuning=False)


# Where a field's non-default value can be saved (the hint in `_expect`'s error).
_ARCH_HINT = {"mlp": "MixtralForCausalLM or Qwen2MoeForCausalLM (mlp=moe), GPT2LMHeadModel (gelu)",
              "norm_weight_offset": "GemmaForCausalLM", "scale_embeddings": "GemmaForCausalLM",
              "parallel_block": "PhiForCausalLM", "lm_head_bias": "PhiForCausalLM",
              "rope_interleaved": "GlmForCausalLM or ChatGLMModel", "rotary_fraction": "GlmForCausalLM, PhiForCausalLM",
              "sliding_window": "MistralForCausalLM, Qwen2ForCausalLM, Phi3ForCausalLM",
              "sliding_window_layers": "Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM",
              "qkv_bias": "Qwen2ForCausalLM, LlamaForCausalLM",
              "qk_norm": "Qwen3ForCausalLM, Gemma3ForCausalLM (head), Olmo2ForCausalLM (proj)",
              "norm_placement": "Gemma2ForCausalLM, Gemma3ForCausalLM, Glm4ForCausalLM (sandwich), "
                                "Olmo2ForCausalLM (post)",
              "attn_scale": "Gemma2ForCausalLM, Gemma3ForCausalLM", "attn_logit_softcap": "Gemma2ForCausalLM",
              "final_logit_softcap": "Gemma2ForCausalLM, Gemma3ForCausalLM", "nope_layers": "SmolLM3ForCausalLM",
              "rope_local_theta": "Gemma3ForCausalLM", "rope_local_scaling": "Gemma3ForCausalLM",
              "attention": "DeepseekV3ForCausalLM (mla)", "moe_router": "DeepseekV3ForCausalLM or Glm4MoeForCausalLM",
              "attn_sinks": "GptOssForCausalLM", "glu_limit": "GptOssForCausalLM",
              "attn_chunk": "Llama4ForCausalLM", "attn_temperature_tuning": "Llama4ForCausalLM",
              "moe_scale_input": "Llama4ForCausalLM",
              "moe_router_bias": "GptOssForCausalLM", "moe_expert_bias": "GptOssForCausalLM",
              "moe_groups": "DeepseekV3ForCausalLM or Glm4MoeForCausalLM",
              "moe_score_bias": "DeepseekV3ForCausalLM or Glm4MoeForCausalLM",
              "moe_routed_scale": "DeepseekV3ForCausalLM or Glm4MoeForCausalLM"}


def _expect(cfg: ModelConfig, arch: str, **fields) -> None:
    """One-line CheckpointError naming the first field `arch` cannot express (checked before anything is written)."""
    for key, want in {**_PLAIN, **fields}.items():
        if want is not _ANY and getattr(cfg, key) != want:
            hint = _ARCH_HINT.get(key, "the architecture the model was loaded from")
            raise CheckpointError(f"{arch} cannot express {key}={getattr(cfg, key)!r} (it needs {want!r}); "
                                  f"set arch to one that can, e.g. {hint}")


def _llama_from_hf(hf: Mapping, *, qkv_bias: bool | None = None, default_theta: float = 10000.0) -> dict:
    _require(hf, "pretraining_tp", 1, "tensor-parallel-sliced checkpoints")
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
        d_ff=hf["intermediate_size"], norm="rms", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
        act=_activation(hf, "hidden_act"), pos="rope", **_rope_from_hf(hf, default_theta),
        qkv_bias=hf.get("attention_bias", False) if qkv_bias is None else qkv_bias,
        out_bias=hf.get("attention_bias", False) if qkv_bias is None else False,
        mlp_bias=hf.get("mlp_bias", False), tie_embeddings=hf.get("tie_word_embeddings", False),
        max_seq_len=hf.get("max_position_embeddings", 4096), **_tokens(hf),
    )


def _llama_to_hf(cfg: ModelConfig, model_type: str = "llama") -> dict:
    out = dict(
        model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
        intermediate_size=cfg.d_ff, hidden_act=cfg.act if cfg.act != "gelu_tanh" else "gelu_pytorch_tanh",
        rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings, **_rope_to_hf(cfg), **_tokens(cfg.model_dump()),
    )
    if model_type == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    return out


def _llama_to_hf_checked(cfg: ModelConfig) -> dict:
    _expect(cfg, "LlamaForCausalLM", qkv_bias=_ANY, out_bias=_ANY, mlp_bias=_ANY)
    if cfg.qkv_bias != cfg.out_bias:
        raise CheckpointError("LlamaForCausalLM's attention_bias covers q/k/v and o together; qkv_bias must equal out_bias")
    return _llama_to_hf(cfg, "llama")


def _mistral_from_hf(hf: Mapping) -> dict:
    out = _llama_from_hf(hf, qkv_bias=False)
    window = hf.get("sliding_window")
    if window is not None and window < out["max_seq_len"]:
        out["sliding_window"] = window
    return out


def _mistral_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "MistralForCausalLM", sliding_window=_ANY)
    return {**_llama_to_hf(cfg, "mistral"), "sliding_window": cfg.sliding_window}


def _windows_from_hf(hf: Mapping, n_layers: int, default_sliding: Callable[[int], bool]) -> dict:
    """Qwen-style per-layer windows: `use_sliding_window`, then `layer_types` (transformers>=5) or the family's rule
    on `max_window_layers`."""
    window = hf.get("sliding_window")
    if not hf.get("use_sliding_window", False) or not window:
        return {}
    types = hf.get("layer_types") or ["sliding_attention" if default_sliding(i) else "full" for i in range(n_layers)]
    bad = next((i for i, t in enumerate(types) if t not in ("sliding_attention", "full_attention", "full")), None)
    if bad is not None:
        raise CheckpointError(f"config.json layer_types[{bad}]='{types[bad]}' is not supported; supported: "
                              "sliding_attention, full_attention")
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if not layers:
        return {}
    return {"sliding_window": window, "sliding_window_layers": None if len(layers) == n_layers else layers}


def _windows_to_hf(cfg: ModelConfig) -> dict:
    if cfg.sliding_window is None:
        return {"use_sliding_window": False}
    n = cfg.n_layers
    layers = set(range(n) if cfg.sliding_window_layers is None else cfg.sliding_window_layers)
    out = {"use_sliding_window": True, "sliding_window": cfg.sliding_window,
           "layer_types": ["sliding_attention" if i in layers else "full_attention" for i in range(n)]}
    if layers == set(range(min(layers), n)):  # the suffix rule transformers 4.x reads
        out["max_window_layers"] = min(layers)
    return out


def _qwen2_from_hf(hf: Mapping) -> dict:
    out = _llama_from_hf(hf, qkv_bias=True)
    first_windowed = hf.get("max_window_layers", 28)
    return {**out, **_windows_from_hf(hf, out["n_layers"], lambda i: i >= first_windowed)}


def _qwen2_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "Qwen2ForCausalLM", qkv_bias=True, sliding_window=_ANY, sliding_window_layers=_ANY)
    return {**_llama_to_hf(cfg, "qwen2"), **_windows_to_hf(cfg)}


def _gpt2_from_hf(hf: Mapping) -> dict:
    _require(hf, "scale_attn_by_inverse_layer_idx", False, "per-layer attention scaling")
    _require(hf, "scale_attn_weights", True, "unscaled attention")
    d = hf["n_embd"]
    return dict(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d, norm="layer", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu",
        act=_activation(hf, "activation_function"), pos="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), max_seq_len=hf.get("n_positions", 1024), **_tokens(hf),
    )


_NOT_ROPE = dict(rotary_fraction=_ANY, rope_interleaved=_ANY, qkv_bias=_ANY, out_bias=_ANY, mlp_bias=_ANY)


def _gpt2_to_hf(cfg: ModelConfig) -> dict:
    if cfg.pos != "learned" or cfg.norm != "layer" or cfg.mlp != "gelu" or cfg.kv_heads != cfg.n_heads:
        raise CheckpointError("GPT2LMHeadModel needs pos=learned, norm=layer, mlp=gelu and n_kv_heads=n_heads")
    _expect(cfg, "GPT2LMHeadModel", norm="layer", mlp="gelu", pos="learned", **_NOT_ROPE)
    act = {"gelu_tanh": "gelu_new"}.get(cfg.act, cfg.act)
    return dict(model_type="gpt2", vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                n_head=cfg.n_heads, n_inner=cfg.d_ff, activation_function=act, layer_norm_epsilon=cfg.norm_eps,
                n_positions=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings, **_tokens(cfg.model_dump()))


def _bloom_from_hf(hf: Mapping) -> dict:
    _require(hf, "apply_residual_connection_post_layernorm", False, "post-norm residuals")
    d = hf.get("hidden_size", hf.get("n_embed"))
    return dict(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"], d_ff=4 * d,
        norm="layer", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", act="gelu_tanh", pos="alibi",
        qkv_bias=True, out_bias=True, mlp_bias=True, embed_norm=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        max_seq_len=hf.get("seq_length", 2048), **_tokens(hf),
    )


def _bloom_to_hf(cfg: ModelConfig) -> dict:
    if cfg.pos != "alibi" or not cfg.embed_norm or cfg.d_ff != 4 * cfg.d_model or cfg.kv_heads != cfg.n_heads:
        raise CheckpointError("BloomForCausalLM needs pos=alibi, embed_norm=true, d_ff=4*d_model and MHA")
    _expect(cfg, "BloomForCausalLM", norm="layer", mlp="gelu", pos="alibi", embed_norm=True, **_NOT_ROPE)
    return dict(model_type="bloom", vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, n_layer=cfg.n_layers,
                n_head=cfg.n_heads, layer_norm_epsilon=cfg.norm_eps, seq_length=cfg.max_seq_len,
                tie_word_embeddings=cfg.tie_embeddings, apply_residual_connection_post_layernorm=False,
                **_tokens(cfg.model_dump()))


# --- mixture of experts ------------------------------------------------------------------------------------------


def _mixtral_from_hf(hf: Mapping) -> dict:
    return {**_mistral_from_hf(hf), "mlp": "moe", "moe_experts": hf["num_local_experts"],
            "moe_top_k": hf.get("num_experts_per_tok", 2), "moe_norm_topk": True}


def _mixtral_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "MixtralForCausalLM", mlp="moe", sliding_window=_ANY)
    if cfg.moe_shared_d_ff or cfg.moe_dense_layers or not cfg.moe_norm_topk:
        raise CheckpointError("MixtralForCausalLM has no shared expert or dense layers and renormalizes the top-k "
                              "weights (moe_norm_topk=true); save with arch=Qwen2MoeForCausalLM")
    return {**_llama_to_hf(cfg, "mixtral"), "intermediate_size": cfg.expert_d_ff, "sliding_window": cfg.sliding_window,
            "num_local_experts": cfg.moe_experts, "num_experts_per_tok": cfg.moe_top_k, "router_jitter_noise": 0.0}


def _qwen2_moe_from_hf(hf: Mapping) -> dict:
    out = _llama_from_hf(hf, qkv_bias=hf.get("qkv_bias", True))
    n, first_dense = out["n_layers"], hf.get("max_window_layers", 28)
    out.update(_windows_from_hf(hf, n, lambda i: bool((i + 1) % 2) and i < first_dense))
    experts = hf.get("num_experts", 60)
    if not experts:
        return out
    step, only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
    shared = hf.get("shared_expert_intermediate_size", 0)
    return {**out, "mlp": "moe", "moe_experts": experts, "moe_top_k": hf.get("num_experts_per_tok", 4),
            "moe_d_ff": hf["moe_intermediate_size"], "moe_norm_topk": hf.get("norm_topk_prob", False),
            "moe_shared_d_ff": shared, "moe_shared_gate": bool(shared),
            "moe_dense_layers": tuple(i for i in range(n) if i in only or (i + 1) % step)}


def _qwen2_moe_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "Qwen2MoeForCausalLM", mlp="moe", qkv_bias=True, sliding_window=_ANY, sliding_window_layers=_ANY)
    if not cfg.moe_shared_d_ff or not cfg.moe_shared_gate:
        raise CheckpointError("Qwen2MoeForCausalLM always has a gated shared expert (moe_shared_d_ff > 0, "
                              "moe_shared_gate=true); save a model without one as arch=MixtralForCausalLM")
    return {**_llama_to_hf(cfg, "qwen2_moe"), "qkv_bias": True, **_windows_to_hf(cfg),
            "num_experts": cfg.moe_experts, "num_experts_per_tok": cfg.moe_top_k,
            "moe_intermediate_size": cfg.expert_d_ff, "shared_expert_intermediate_size": cfg.moe_shared_d_ff,
            "norm_topk_prob": cfg.moe_norm_topk, "decoder_sparse_step": 1, "mlp_only_layers": list(cfg.moe_dense_layers)}


def _sigmoid_moe_from_hf(hf: Mapping, n_layers: int) -> dict:
    """The DeepSeek-V3-style MoE keys (DeepSeek-V3, Kimi-K2, GLM-4.5): sigmoid router with a selection bias,
    group-limited top-k, routed scaling, shared experts and `first_k_dense_replace` dense layers."""
    _require(hf, "scoring_func", "sigmoid", "DeepSeek-V2's softmax routing")
    _require(hf, "topk_method", "noaux_tc", "other top-k selection methods")
    if hf.get("moe_layer_freq", 1) != 1:
        raise CheckpointError(f"config.json moe_layer_freq={hf['moe_layer_freq']} is not supported; expected 1")
    f = hf["moe_intermediate_size"]
    return dict(mlp="moe", moe_experts=hf["n_routed_experts"], moe_top_k=hf["num_experts_per_tok"], moe_d_ff=f,
                moe_norm_topk=hf.get("norm_topk_prob", True), moe_shared_d_ff=f * hf.get("n_shared_experts", 1),
                moe_router="sigmoid", moe_groups=hf.get("n_group") or 1, moe_topk_groups=hf.get("topk_group") or 1,
                moe_score_bias=True, moe_routed_scale=float(hf.get("routed_scaling_factor", 1.0)),
                moe_dense_layers=tuple(range(min(hf.get("first_k_dense_replace", 0), n_layers))))


def _sigmoid_moe_to_hf(cfg: ModelConfig, arch: str) -> dict:
    k = len(cfg.moe_dense_layers)
    if cfg.moe_dense_layers != tuple(range(k)) or not cfg.moe_shared_d_ff or cfg.moe_shared_d_ff % cfg.expert_d_ff:
        raise CheckpointError(f"{arch} needs moe_dense_layers to be the first layers (first_k_dense_replace) and a "
                              "shared expert whose moe_shared_d_ff is a multiple of moe_d_ff (n_shared_experts)")
    return dict(moe_intermediate_size=cfg.expert_d_ff, n_routed_experts=cfg.moe_experts,
                num_experts_per_tok=cfg.moe_top_k, norm_topk_prob=cfg.moe_norm_topk,
                n_shared_experts=cfg.moe_shared_d_ff // cfg.expert_d_ff, n_group=cfg.moe_groups,
                topk_group=cfg.moe_topk_groups, routed_scaling_factor=cfg.moe_routed_scale, first_k_dense_replace=k,
                num_nextn_predict_layers=0)  # the MTP modules are not loaded, so not saved either


_SIGMOID_MOE = dict(mlp="moe", moe_router="sigmoid", moe_groups=_ANY, moe_topk_groups=_ANY, moe_score_bias=True,
                    moe_routed_scale=_ANY)


def _deepseek_v3_from_hf(hf: Mapping) -> dict:
    _require(hf, "attention_bias", False, "biased MLA projections")
    out = _llama_from_hf({**hf, "num_key_value_heads": None, "head_dim": None}, qkv_bias=False)
    return {**out, "attention": "mla", "mla_q_rank": hf.get("q_lora_rank") or 0, "mla_kv_rank": hf["kv_lora_rank"],
            "mla_rope_dim": hf["qk_rope_head_dim"], "mla_nope_dim": hf["qk_nope_head_dim"],
            "mla_v_dim": hf["v_head_dim"], "rope_interleaved": hf.get("rope_interleave", True),
            **_sigmoid_moe_from_hf(hf, out["n_layers"])}


def _deepseek_v3_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "DeepseekV3ForCausalLM", attention="mla", rope_interleaved=_ANY, **_SIGMOID_MOE)
    out = _llama_to_hf(cfg, "deepseek_v3")
    del out["num_key_value_heads"], out["head_dim"]
    return {**out, "num_key_value_heads": cfg.n_heads, "q_lora_rank": cfg.mla_q_rank or None,
            "kv_lora_rank": cfg.mla_kv_rank, "qk_rope_head_dim": cfg.mla_rope_dim, "qk_nope_head_dim": cfg.mla_nope_dim,
            "v_head_dim": cfg.mla_v_dim, "rope_interleave": cfg.rope_interleaved, "attention_bias": False,
            **_sigmoid_moe_to_hf(cfg, "DeepseekV3ForCausalLM")}


def _layer_types_windows(hf: Mapping, n_layers: int, default_sliding: Callable[[int], bool]) -> dict:
    """Per-layer windows from `layer_types` ("sliding_attention" / "full_attention"), else the family's rule."""
    window = hf.get("sliding_window")
    if not window:
        return {}
    types = hf.get("layer_types") or ["sliding_attention" if default_sliding(i) else "full" for i in range(n_layers)]
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if not layers:
        return {}
    return {"sliding_window": window, "sliding_window_layers": None if len(layers) == n_layers else layers}


def _layer_types_to_hf(cfg: ModelConfig) -> dict:
    windowed = set(range(cfg.n_layers) if cfg.sliding_window_layers is None else cfg.sliding_window_layers)
    if cfg.sliding_window is None:
        windowed = set()
    return {"sliding_window": cfg.sliding_window,
            "layer_types": ["sliding_attention" if i in windowed else "full_attention" for i in range(cfg.n_layers)]}


def _gpt_oss_from_hf(hf: Mapping) -> dict:
    out = _llama_from_hf(hf)  # attention_bias covers q/k/v and o
    return {**out, **_layer_types_windows(hf, out["n_layers"], lambda i: i % 2 == 0), "attn_sinks": True,
            "mlp": "moe", "moe_experts": hf["num_local_experts"],
            "moe_top_k": hf.get("num_experts_per_tok", hf.get("experts_per_token", 4)), "moe_norm_topk": True,
            "moe_router_bias": True, "moe_expert_bias": True, "glu_limit": float(hf.get("swiglu_limit", 7.0)),
            "glu_alpha": float(hf.get("swiglu_alpha", 1.702))}


def _gpt_oss_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "GptOssForCausalLM", mlp="moe", attn_sinks=True, moe_router_bias=True, moe_expert_bias=True,
            glu_limit=_ANY, qkv_bias=cfg.out_bias, out_bias=_ANY, sliding_window=_ANY, sliding_window_layers=_ANY)
    if (cfg.glu_limit is None or not cfg.moe_norm_topk or cfg.moe_shared_d_ff or cfg.moe_dense_layers
            or cfg.d_ff != cfg.expert_d_ff):
        raise CheckpointError("GptOssForCausalLM needs glu_limit, moe_norm_topk=true, no shared expert, no dense "
                              "layers and d_ff equal to the expert size")
    out = _llama_to_hf(cfg, "gpt_oss")
    out.setdefault("rope_scaling", {"rope_type": "default"})  # absent, transformers would assume gpt-oss's yarn
    return {**out, "attention_bias": cfg.qkv_bias, **_layer_types_to_hf(cfg),
            "num_local_experts": cfg.moe_experts, "num_experts_per_tok": cfg.moe_top_k,
            "swiglu_limit": cfg.glu_limit, "swiglu_alpha": cfg.glu_alpha}


def _glm4_moe_from_hf(hf: Mapping) -> dict:
    """GLM-4.5 / GLM-4.5-Air: q/k/v bias (no o bias), RoPE on half of each head (half layout), optional per-head
    qk-norm, and DeepSeek-V3's sigmoid router (shared module, `_sigmoid_moe_from_hf`)."""
    out = _llama_from_hf(hf, qkv_bias=hf.get("attention_bias", False))
    return {"rotary_fraction": 0.5, **out, "qk_norm": "head" if hf.get("use_qk_norm") else "none",
            **_sigmoid_moe_from_hf(hf, out["n_layers"])}


def _glm4_moe_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "Glm4MoeForCausalLM", rotary_fraction=_ANY, qkv_bias=_ANY, qk_norm=_ANY, **_SIGMOID_MOE)
    if cfg.qk_norm == "proj":
        raise CheckpointError("Glm4MoeForCausalLM's qk-norm is per head; qk_norm must be 'head' or 'none'")
    return {**_llama_to_hf(cfg, "glm4_moe"), "attention_bias": cfg.qkv_bias,
            "partial_rotary_factor": cfg.rotary_fraction, "use_qk_norm": cfg.qk_norm == "head",
            **_sigmoid_moe_to_hf(cfg, "Glm4MoeForCausalLM")}


def _qwen3_moe_from_hf(hf: Mapping) -> dict:
    """Qwen3-MoE: Qwen3's attention (per-head qk-norm) with softmax-routed experts and no shared expert; dense layers
    from `decoder_sparse_step` and `mlp_only_layers`, a window on every layer only with use_sliding_window."""
    out = {**_llama_from_hf(hf), "qk_norm": "head"}  # attention_bias covers q/k/v/o
    if hf.get("use_sliding_window") and hf.get("sliding_window"):
        out["sliding_window"] = hf["sliding_window"]
    n, experts = out["n_layers"], hf.get("num_experts", hf.get("num_local_experts", 128))
    if not experts:
        return out
    step, only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
    return {**out, "mlp": "moe", "moe_experts": experts, "moe_top_k": hf.get("num_experts_per_tok", 8),
            "moe_d_ff": hf["moe_intermediate_size"], "moe_norm_topk": hf.get("norm_topk_prob", False),
            "moe_dense_layers": tuple(i for i in range(n) if i in only or (i + 1) % step)}


def _qwen3_moe_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "Qwen3MoeForCausalLM", mlp="moe", qk_norm="head", qkv_bias=cfg.out_bias, out_bias=_ANY,
            sliding_window=_ANY)
    if cfg.moe_shared_d_ff:
        raise CheckpointError("Qwen3MoeForCausalLM has no shared expert; save a model with one as Qwen2MoeForCausalLM")
    return {**_llama_to_hf(cfg, "qwen3_moe"), "attention_bias": cfg.qkv_bias,
            "use_sliding_window": cfg.sliding_window is not None, "sliding_window": cfg.sliding_window,
            "num_experts": cfg.moe_experts, "num_experts_per_tok": cfg.moe_top_k,
            "moe_intermediate_size": cfg.expert_d_ff, "norm_topk_prob": cfg.moe_norm_topk, "decoder_sparse_step": 1,
            "mlp_only_layers": list(cfg.moe_dense_layers)}


def _llama4_from_hf(hf: Mapping) -> dict:
    """Llama 4 text decoder: NoPE every `no_rope_layer_interval`-th layer (no_rope_layers: 1 = RoPE, 0 = NoPE), chunked
    attention on the RoPE layers, global attention with temperature tuning on the NoPE ones, L2 qk-norm on the RoPE
    layers, interleaved (complex-pair) RoPE, and MoE layers every `interleave_moe_layer_step` with a top-k sigmoid
    router whose score scales the expert's input, plus a shared expert."""
    n = hf["num_hidden_layers"]
    out = _llama_from_hf({**hf, "intermediate_size": hf.get("intermediate_size_mlp", 16384)})
    interval = hf.get("no_rope_layer_interval", 4)
    uses_rope = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    nope = tuple(i for i, use in enumerate(uses_rope) if not use)
    chunk = hf.get("attention_chunk_size")
    types = hf.get("layer_types") or ["chunked_attention" if use and chunk else "full_attention" for use in uses_rope]
    unknown = sorted(set(types) - {"chunked_attention", "full_attention"})
    if unknown:
        raise CheckpointError(f"config.json layer_types entry '{unknown[0]}' is not supported for Llama 4")
    chunked = tuple(i for i, t in enumerate(types) if t == "chunked_attention")
    step = hf.get("interleave_moe_layer_step", 1)
    moe_layers = set(hf.get("moe_layers") or range(step - 1, n, step))
    f = hf.get("intermediate_size", 8192)
    out.update(rope_interleaved=True, nope_layers=nope, qk_norm="l2" if hf.get("use_qk_norm", True) else "none",
               attn_chunk=chunk if chunked else None, attn_chunk_layers=None if len(chunked) == n else chunked or None,
               attn_temperature_tuning=bool(hf.get("attn_temperature_tuning", True)) and bool(nope),
               attn_temperature_floor=int(hf.get("floor_scale", 8192)),
               attn_temperature_scale=float(hf.get("attn_scale", 0.1)))
    if not moe_layers:
        return out
    return {**out, "mlp": "moe", "moe_experts": hf.get("num_local_experts", 16),
            "moe_top_k": hf.get("num_experts_per_tok", 1), "moe_d_ff": f, "moe_shared_d_ff": f,
            "moe_router": "sigmoid", "moe_norm_topk": False, "moe_scale_input": True,
            "moe_dense_layers": tuple(i for i in range(n) if i not in moe_layers)}


def _llama4_multimodal_from_hf(hf: Mapping) -> dict:
    """Llama4ForConditionalGeneration (Scout, Maverick): its text decoder only; saves as Llama4ForCausalLM."""
    return {**_llama4_from_hf(_text_config(hf, {})), "arch": "Llama4ForCausalLM"}


def _llama4_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "Llama4ForCausalLM", mlp="moe", rope_interleaved=True, qk_norm=_ANY, nope_layers=_ANY,
            attn_chunk=_ANY, attn_chunk_layers=_ANY, attn_temperature_tuning=_ANY, moe_router="sigmoid",
            moe_scale_input=True, qkv_bias=cfg.out_bias, out_bias=_ANY)
    n = cfg.n_layers
    if (cfg.qk_norm not in ("l2", "none") or cfg.moe_norm_topk or cfg.moe_shared_d_ff != cfg.expert_d_ff
            or cfg.moe_shared_gate):
        raise CheckpointError("Llama4ForCausalLM needs qk_norm l2 or none, moe_norm_topk=false and an ungated shared "
                              "expert of the experts' size (moe_shared_d_ff = moe_d_ff)")
    chunked = {i for i in range(n) if cfg.layer_chunk(i) is not None}
    return {**_llama_to_hf(cfg, "llama4_text"), "attention_bias": cfg.qkv_bias, "intermediate_size": cfg.expert_d_ff,
            "intermediate_size_mlp": cfg.d_ff, "num_local_experts": cfg.moe_experts,
            "num_experts_per_tok": cfg.moe_top_k, "moe_layers": [i for i in range(n) if cfg.is_moe_layer(i)],
            "use_qk_norm": cfg.qk_norm == "l2", "no_rope_layers": [int(i not in cfg.nope_layers) for i in range(n)],
            "attention_chunk_size": cfg.attn_chunk,
            "layer_types": ["chunked_attention" if i in chunked else "full_attention" for i in range(n)],
            "attn_temperature_tuning": cfg.attn_temperature_tuning, "floor_scale": cfg.attn_temperature_floor,
            "attn_scale": cfg.attn_temperature_scale}


# --- Gemma, Phi, GLM ---------------------------------------------------------------------------------------------


def _gemma_from_hf(hf: Mapping) -> dict:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    act = "gelu_pytorch_tanh" if act == "gelu" else act  # Gemma's released configs say gelu but mean the tanh form
    out = _llama_from_hf({**hf, "hidden_act": act})
    return {**out, "norm_weight_offset": 1.0, "scale_embeddings": True,
            "tie_embeddings": hf.get("tie_word_embeddings", True)}


def _gemma_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "GemmaForCausalLM", norm_weight_offset=1.0, scale_embeddings=True, qkv_bias=cfg.out_bias,
            out_bias=_ANY)
    out = _llama_to_hf(cfg, "gemma")
    return {**out, "hidden_activation": out["hidden_act"], "attention_bias": cfg.qkv_bias}


def _phi_from_hf(hf: Mapping) -> dict:
    _require(hf, "qk_layernorm", False, "layer norms on q and k")
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"), d_ff=hf["intermediate_size"],
        norm="layer", norm_eps=hf.get("layer_norm_eps", 1e-5), mlp="gelu", act=_activation(hf, "hidden_act"),
        pos="rope", **{"rotary_fraction": 0.5, **_rope_from_hf(hf)}, parallel_block=True, qkv_bias=True,
        out_bias=True, mlp_bias=True, lm_head_bias=True, tie_embeddings=hf.get("tie_word_embeddings", False),
        max_seq_len=hf.get("max_position_embeddings", 2048), **_tokens(hf),
    )


def _phi_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "PhiForCausalLM", norm="layer", mlp="gelu", parallel_block=True, rotary_fraction=_ANY,
            qkv_bias=True, out_bias=True, mlp_bias=True, lm_head_bias=True)
    return dict(model_type="phi", vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.d_ff,
                hidden_act={"gelu_tanh": "gelu_new"}.get(cfg.act, cfg.act), layer_norm_eps=cfg.norm_eps,
                max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings, qk_layernorm=False,
                resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **_rope_to_hf(cfg),
                partial_rotary_factor=cfg.rotary_fraction, **_tokens(cfg.model_dump()))


def _phi3_from_hf(hf: Mapping) -> dict:
    """Phi-3/3.5/4: the Llama layout (fused on disk) with an optional sliding window and partial rotary; Phi-3's
    128k variants use longrope (legacy names 'su' and 'yarn' mean longrope here, as transformers reads them)."""
    scaling = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if scaling.get("rope_type", scaling.get("type")) in ("su", "yarn"):
        scaling = {k: v for k, v in scaling.items() if k != "type"} | {"rope_type": "longrope"}
        hf = {**hf, "rope_scaling": scaling}
    return _mistral_from_hf(hf)


def _phi3_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "Phi3ForCausalLM", rotary_fraction=_ANY, sliding_window=_ANY)
    s = cfg.rope_scaling  # transformers reads a top-level original_max_position_embeddings first (default 4096)
    original = s.original_max_seq_len if s is not None and s.type in ("llama3", "yarn", "longrope") else cfg.max_seq_len
    return {**_llama_to_hf(cfg, "phi3"), "sliding_window": cfg.sliding_window, "partial_rotary_factor":
            cfg.rotary_fraction, "original_max_position_embeddings": original, "resid_pdrop": 0.0,
            "embd_pdrop": 0.0}


def _glm_from_hf(hf: Mapping) -> dict:
    out = _llama_from_hf(hf, qkv_bias=hf.get("attention_bias", True))
    return {"rotary_fraction": 0.5, **out, "rope_interleaved": True}


def _glm_to_hf(cfg: ModelConfig, arch: str = "GlmForCausalLM", model_type: str = "glm", **fields) -> dict:
    _expect(cfg, arch, rotary_fraction=_ANY, rope_interleaved=True, qkv_bias=_ANY, **fields)
    return {**_llama_to_hf(cfg, model_type), "attention_bias": cfg.qkv_bias,
            "partial_rotary_factor": cfg.rotary_fraction}


def _glm4_from_hf(hf: Mapping) -> dict:
    """GLM-4-0414 / GLM-Z1 (`Glm4ForCausalLM`): GLM-4's block with sandwich norms (each sublayer's output normalized
    before the residual add, as Gemma 2 does)."""
    return {**_glm_from_hf(hf), "norm_placement": "sandwich"}


def _glm4_to_hf(cfg: ModelConfig) -> dict:
    return _glm_to_hf(cfg, "Glm4ForCausalLM", "glm4", norm_placement="sandwich")


def _chatglm_from_hf(hf: Mapping) -> dict:
    """ChatGLM2/3 and the custom-code GLM-4 (`ChatGLMModel`): the config keys of their configuration_chatglm.py."""
    _require(hf, "rmsnorm", True, "LayerNorm ChatGLM variants")
    _require(hf, "apply_residual_connection_post_layernorm", False, "post-norm residuals")
    _require(hf, "post_layer_norm", True, "no final norm")
    _require(hf, "original_rope", True, "the non-interleaved rotary variant")
    heads = hf["num_attention_heads"]
    bias = hf.get("add_bias_linear", False)
    return dict(
        vocab_size=hf["padded_vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_layers"], n_heads=heads,
        n_kv_heads=hf["multi_query_group_num"] if hf.get("multi_query_attention", False) else heads,
        head_dim=hf.get("kv_channels"), d_ff=hf["ffn_hidden_size"], norm="rms", norm_eps=hf.get("layernorm_epsilon", 1e-5),
        mlp="swiglu", act="silu", pos="rope", rope_theta=10000.0 * hf.get("rope_ratio", 1), rotary_fraction=0.5,
        rope_interleaved=True, qkv_bias=hf.get("add_qkv_bias", False) or bias, out_bias=bias, mlp_bias=bias,
        tie_embeddings=False, max_seq_len=hf.get("seq_length", 2048), **_tokens(hf),
    )


def _chatglm_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "ChatGLMModel", rotary_fraction=0.5, rope_interleaved=True, qkv_bias=_ANY, out_bias=cfg.mlp_bias,
            mlp_bias=_ANY)
    if cfg.rope_scaling is not None or cfg.tie_embeddings or cfg.act != "silu":
        raise CheckpointError("ChatGLMModel has no rope scaling, no tied embeddings and only SwiGLU (act=silu)")
    code = "modeling_chatglm.ChatGLMForConditionalGeneration"
    return dict(
        model_type="chatglm", auto_map={"AutoConfig": "configuration_chatglm.ChatGLMConfig", "AutoModel": code,
                                        "AutoModelForCausalLM": code, "AutoModelForSeq2SeqLM": code},
        padded_vocab_size=cfg.vocab_size, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, kv_channels=cfg.dim_per_head, multi_query_attention=cfg.kv_heads != cfg.n_heads,
        multi_query_group_num=cfg.kv_heads, ffn_hidden_size=cfg.d_ff, layernorm_epsilon=cfg.norm_eps, rmsnorm=True,
        add_bias_linear=cfg.out_bias, add_qkv_bias=cfg.qkv_bias, apply_residual_connection_post_layernorm=False,
        post_layer_norm=True, original_rope=True, rope_ratio=cfg.rope_theta / 10000.0, seq_length=cfg.max_seq_len,
        apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True, fp32_residual_connection=False,
        hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False, **_tokens(cfg.model_dump()),
    )


def _chatglm_buffers(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from .positions import rope_inv_freq

    return {"transformer.rotary_pos_emb.inv_freq": rope_inv_freq(cfg)}  # stored by the original checkpoints


# --- 2024-25 families: Qwen3, Gemma 2/3, OLMo 2, SmolLM3, multimodal checkpoints' text decoders -------------------

_LAYER_TYPES = ("sliding_attention", "full_attention")


def _layer_windows(hf: Mapping, n_layers: int, default_sliding: Callable[[int], bool]) -> dict:
    """sliding_window + sliding_window_layers from `layer_types` (transformers>=5 writes it; older configs: the
    family's pattern). An entry other than sliding/full attention (chunked, ...) is refused, naming it."""
    types = hf.get("layer_types") or ["sliding_attention" if default_sliding(i) else "full_attention"
                                      for i in range(n_layers)]
    if len(types) != n_layers:
        raise CheckpointError(f"config.json layer_types has {len(types)} entries for {n_layers} layers")
    for i, t in enumerate(types):
        if t not in _LAYER_TYPES:
            raise CheckpointError(f"config.json layer_types[{i}]='{t}' is not supported; supported: "
                                  f"{', '.join(_LAYER_TYPES)}")
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if not layers or hf.get("sliding_window") is None:
        return {}
    return {"sliding_window": hf["sliding_window"], "sliding_window_layers": None if len(layers) == n_layers else layers}


def _layer_types_to_hf(cfg: ModelConfig) -> dict:
    return {"sliding_window": cfg.sliding_window,
            "layer_types": ["sliding_attention" if cfg.layer_window(i) is not None else "full_attention"
                            for i in range(cfg.n_layers)]}


def _text_config(hf: Mapping, defaults: Mapping) -> dict:
    """The text decoder's config of a multimodal checkpoint (`text_config`, over the text model's defaults); tied
    embeddings and special tokens fall back to the top level, where these checkpoints often keep them."""
    if "text_config" not in hf:
        raise CheckpointError(f"config.json of {architecture_of(hf)} has no text_config")
    text = {**defaults, **hf["text_config"]}
    for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        if key not in hf["text_config"] and hf.get(key) is not None:
            text[key] = hf[key]
    return text


def architecture_of(hf: Mapping) -> str | None:
    archs = hf.get("architectures") or []
    return archs[0] if archs else None


def _qwen3_from_hf(hf: Mapping) -> dict:
    out = _llama_from_hf(hf)  # attention_bias covers q/k/v/o
    first_windowed = hf.get("max_window_layers", 28)
    return {**out, "qk_norm": "head", **_windows_from_hf(hf, out["n_layers"], lambda i: i >= first_windowed)}


def _qwen3_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "Qwen3ForCausalLM", qk_norm="head", qkv_bias=_ANY, out_bias=_ANY, sliding_window=_ANY,
            sliding_window_layers=_ANY)
    if cfg.qkv_bias != cfg.out_bias:
        raise CheckpointError("Qwen3ForCausalLM's attention_bias covers q/k/v and o together; qkv_bias must equal out_bias")
    return {**_llama_to_hf(cfg, "qwen3"), "attention_bias": cfg.qkv_bias, **_windows_to_hf(cfg)}


def _gemma2_from_hf(hf: Mapping) -> dict:
    """Gemma 2: Gemma's (1 + w) RMSNorm, scaled embeddings and tied head, plus sandwich norms, query_pre_attn_scalar,
    tanh soft-capping of attention scores and logits, and sliding-window attention on alternate layers."""
    if hf.get("use_bidirectional_attention"):
        raise CheckpointError("config.json use_bidirectional_attention=true (an embedding model) is not supported; "
                              "lmforge loads causal decoders")
    out = _llama_from_hf({**hf, "hidden_act": hf.get("hidden_activation") or hf.get("hidden_act")})
    n = out["n_layers"]
    return {**out, "norm_weight_offset": 1.0, "scale_embeddings": True, "norm_placement": "sandwich",
            "tie_embeddings": hf.get("tie_word_embeddings", True), "attn_scale": hf["query_pre_attn_scalar"] ** -0.5,
            "attn_logit_softcap": hf.get("attn_logit_softcapping"),
            "final_logit_softcap": hf.get("final_logit_softcapping"),
            **_layer_windows(hf, n, lambda i: bool((i + 1) % 2))}


def _query_pre_attn_scalar(cfg: ModelConfig) -> float:
    """attn_scale back as transformers' query_pre_attn_scalar (scale = scalar**-0.5), an int when it is one."""
    value = (cfg.attn_scale or cfg.dim_per_head ** -0.5) ** -2
    return round(value) if abs(value - round(value)) < 1e-6 else value


def _gemma2_to_hf(cfg: ModelConfig, arch: str = "Gemma2ForCausalLM", model_type: str = "gemma2", **fields) -> dict:
    _expect(cfg, arch, norm_weight_offset=1.0, scale_embeddings=True, norm_placement="sandwich", qkv_bias=cfg.out_bias,
            out_bias=_ANY, attn_scale=_ANY, attn_logit_softcap=_ANY, final_logit_softcap=_ANY, sliding_window=_ANY,
            sliding_window_layers=_ANY, **fields)
    out = _llama_to_hf(cfg, model_type)
    return {**out, "hidden_activation": out["hidden_act"], "attention_bias": cfg.qkv_bias,
            "query_pre_attn_scalar": _query_pre_attn_scalar(cfg), "attn_logit_softcapping": cfg.attn_logit_softcap,
            "final_logit_softcapping": cfg.final_logit_softcap, **_layer_types_to_hf(cfg)}


def _gemma3_from_hf(hf: Mapping) -> dict:
    """Gemma 3's text decoder: Gemma 2's block with per-head qk-norm, 5:1 sliding/global layers, and separate RoPE
    per layer kind: local (sliding) layers rope_local_base_freq (10k), global layers rope_theta (1M) + rope_scaling."""
    if hf.get("attn_logit_softcapping") is not None:
        raise CheckpointError(f"config.json attn_logit_softcapping={hf['attn_logit_softcapping']!r} is not supported "
                              "for Gemma 3 (transformers' Gemma 3 does not apply it); set it to null")
    pattern = hf.get("sliding_window_pattern", 6)
    out = _gemma2_from_hf({**hf, "rope_parameters": None, "rope_scaling": None, "layer_types": hf.get("layer_types")
                           or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                               for i in range(hf["num_hidden_layers"])]})
    params = hf.get("rope_parameters") or {}
    if isinstance(params.get("full_attention"), Mapping) or isinstance(params.get("sliding_attention"), Mapping):
        unknown = sorted(set(params) - set(_LAYER_TYPES))
        if unknown:
            raise CheckpointError(f"config.json rope_parameters.{unknown[0]} is not a layer type; expected "
                                  f"{', '.join(_LAYER_TYPES)}")
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        full_theta, local_theta = full.get("rope_theta", 1e6), local.get("rope_theta", 1e4)
        where = "rope_parameters.full_attention", "rope_parameters.sliding_attention"
    else:  # transformers 4.x keys: rope_theta + rope_scaling for the global layers, rope_local_base_freq
        full, local = dict(hf.get("rope_scaling") or {}), {}
        full_theta, local_theta = hf.get("rope_theta", 1e6), hf.get("rope_local_base_freq", 1e4)
        where = "rope_scaling", "rope_parameters"
    scalings = [_rope_scaling_from_hf({k: v for k, v in d.items() if k != "rope_theta"}, hf, w)
                for d, w in zip((full, local), where)]
    out.update(rope_theta=float(full_theta), rope_scaling=scalings[0], qk_norm="head")
    if out.get("sliding_window") is not None:
        out.update(rope_local_theta=float(local_theta), rope_local_scaling=scalings[1])
    return out


def _gemma3_to_hf(cfg: ModelConfig) -> dict:
    out = _gemma2_to_hf(cfg, "Gemma3ForCausalLM", "gemma3_text", qk_norm="head", rope_local_theta=_ANY,
                        rope_local_scaling=_ANY)
    if cfg.attn_logit_softcap is not None:
        raise CheckpointError("Gemma3ForCausalLM does not apply attn_logit_softcap (transformers ignores it); "
                              "save with arch=Gemma2ForCausalLM or drop the soft-cap")
    local_theta = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
    local = {"rope_type": "default"} if cfg.rope_local_scaling is None else _rope_scaling_to_hf(cfg.rope_local_scaling)
    full = {"rope_type": "default"} if cfg.rope_scaling is None else _rope_scaling_to_hf(cfg.rope_scaling)
    out["rope_parameters"] = {"full_attention": {**full, "rope_theta": cfg.rope_theta},
                              "sliding_attention": {**local, "rope_theta": local_theta}}
    out["rope_local_base_freq"] = local_theta  # the transformers 4.x key (rope_theta/rope_scaling: the global layers)
    return out


def _gemma3_multimodal_from_hf(hf: Mapping) -> dict:
    """Gemma3ForConditionalGeneration: its language model only (text_config; vision tensors are skipped); it saves as
    Gemma3ForCausalLM."""
    text = _text_config(hf, GEMMA3_TEXT_DEFAULTS)
    if text.get("final_logit_softcapping") is not None:
        raise CheckpointError(f"config.json text_config.final_logit_softcapping={text['final_logit_softcapping']!r} is "
                              "not supported for Gemma3ForConditionalGeneration (transformers' multimodal Gemma 3 "
                              "does not apply it); set it to null")
    return {**_gemma3_from_hf(text), "arch": "Gemma3ForCausalLM"}


def _olmo2_from_hf(hf: Mapping) -> dict:
    """OLMo 2: norms after attention and the MLP (not before), RMSNorm on the whole q and k projections."""
    return {**_llama_from_hf(hf), "norm_placement": "post", "qk_norm": "proj"}


def _olmo2_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "Olmo2ForCausalLM", norm_placement="post", qk_norm="proj", qkv_bias=cfg.out_bias, out_bias=_ANY)
    return {**_llama_to_hf(cfg, "olmo2"), "attention_bias": cfg.qkv_bias}


def _smollm3_from_hf(hf: Mapping) -> dict:
    """SmolLM3: Llama with no positional encoding on every 4th layer (`no_rope_layers`: 1 = RoPE, 0 = NoPE)."""
    # SmolLM3-3B's config says pretraining_tp=2, which its modeling code never reads (it only ever sliced the same
    # matmuls, in old Llama code)
    out = _llama_from_hf({**hf, "pretraining_tp": 1}, default_theta=2e6)
    n = out["n_layers"]
    interval = hf.get("no_rope_layer_interval", 4)
    use_rope = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    if len(use_rope) < n or any(u not in (0, 1) for u in use_rope):
        raise CheckpointError(f"config.json no_rope_layers must hold a 0 or 1 for each of the {n} layers")
    nope = tuple(i for i in range(n) if not use_rope[i])
    return {**out, "nope_layers": nope, **_windows_from_hf(hf, n, lambda i: i in nope)}


def _smollm3_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "SmolLM3ForCausalLM", nope_layers=_ANY, qkv_bias=cfg.out_bias, out_bias=_ANY, mlp_bias=_ANY,
            sliding_window=_ANY, sliding_window_layers=_ANY)
    return {**_llama_to_hf(cfg, "smollm3"), "attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias,
            "no_rope_layers": [int(i not in cfg.nope_layers) for i in range(cfg.n_layers)], **_windows_to_hf(cfg)}


def _mistral3_from_hf(hf: Mapping) -> dict:
    """Mistral3ForConditionalGeneration (Mistral Small 3.1/3.2): its Mistral text decoder; saves as MistralForCausalLM."""
    return {**_mistral_from_hf(_text_config(hf, MISTRAL_DEFAULTS)), "arch": "MistralForCausalLM"}


# transformers' config-class defaults for keys a checkpoint may leave out (multimodal text_configs list only a few)
QWEN3_DEFAULTS = dict(head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=32768, sliding_window=4096)
GEMMA2_DEFAULTS = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                       max_position_embeddings=8192, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                       tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                            hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
                            pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
                            query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=None,
                            attn_logit_softcapping=None)
OLMO2_DEFAULTS = dict(rms_norm_eps=1e-5, max_position_embeddings=2048)
SMOLLM3_DEFAULTS = dict(rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True)
MISTRAL_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                        rms_norm_eps=1e-6, sliding_window=4096, bos_token_id=1, eos_token_id=2,
                        tie_word_embeddings=False)
PHI3_DEFAULTS = dict(original_max_position_embeddings=4096, max_position_embeddings=4096, rms_norm_eps=1e-5)


# --- name tables of the newer families ---------------------------------------------------------------------------

_GATE_UP = ("layers.{i}.mlp.gate_proj.{p}", "layers.{i}.mlp.up_proj.{p}")
_LLAMA_MLP = {"model.layers.{i}.mlp.gate_proj.{p}", "model.layers.{i}.mlp.up_proj.{p}", "model.layers.{i}.mlp.down_proj.{p}"}
_LLAMA_ATTN_NAMES = [r for r in LLAMA_NAMES if r.hf not in _LLAMA_MLP]

MIXTRAL_NAMES = [
    *_LLAMA_ATTN_NAMES,
    Rename("model.layers.{i}.block_sparse_moe.gate.weight", "layers.{i}.mlp.router.weight"),
    *(Rename(f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.{w}.weight", f"layers.{{i}}.mlp.experts.{{e}}.{n}.weight")
      for w, n in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))),
]

QWEN2_MOE_NAMES = [
    *LLAMA_NAMES,  # attention, and the dense MLP of moe_dense_layers
    Rename("model.layers.{i}.mlp.gate.weight", "layers.{i}.mlp.router.weight"),
    *(Rename(f"model.layers.{{i}}.mlp.{part}.{n}.weight", f"layers.{{i}}.mlp.{part}.{n}.weight")
      for part in ("experts.{e}", "shared_expert") for n in ("gate_proj", "up_proj", "down_proj")),
    Rename("model.layers.{i}.mlp.shared_expert_gate.weight", "layers.{i}.mlp.shared_expert_gate.weight"),
]

_ROUTED_EXPERTS = [Rename(f"model.layers.{{i}}.mlp.{part}.{n}.weight", f"layers.{{i}}.mlp.{native}.{n}.weight")
                   for part, native in (("experts.{e}", "experts.{e}"), ("shared_experts", "shared_expert"))
                   for n in ("gate_proj", "up_proj", "down_proj")]
_SIGMOID_ROUTER = [Rename("model.layers.{i}.mlp.gate.weight", "layers.{i}.mlp.router.weight"),
                   Rename("model.layers.{i}.mlp.gate.e_score_correction_bias", "layers.{i}.mlp.router.score_bias")]

DEEPSEEK_V3_NAMES = [
    *(r for r in LLAMA_NAMES if ".self_attn." not in r.hf),  # embeddings, norms, the dense MLP of the first layers
    *(Rename(f"model.layers.{{i}}.self_attn.{n}.weight", f"layers.{{i}}.attn.{n}.weight")
      for n in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")),
    Rename("model.layers.{i}.self_attn.q_a_layernorm.weight", "layers.{i}.attn.q_a_norm.weight"),
    Rename("model.layers.{i}.self_attn.kv_a_layernorm.weight", "layers.{i}.attn.kv_a_norm.weight"),
    *_SIGMOID_ROUTER,
    *_ROUTED_EXPERTS,
]

_EXPERT_GATE_UP = ("layers.{i}.mlp.experts.{e}.gate_proj.{p}", "layers.{i}.mlp.experts.{e}.up_proj.{p}")

GPT_OSS_NAMES = [
    *_LLAMA_ATTN_NAMES,
    Rename("model.layers.{i}.self_attn.sinks", "layers.{i}.attn.sinks"),
    Rename("model.layers.{i}.mlp.router.{p}", "layers.{i}.mlp.router.{p}"),
    # stacked experts, x @ W layout (E, in, out); gate and up alternate along the 2 * d_ff outputs
    Rename("model.layers.{i}.mlp.experts.gate_up_proj", tuple(n.replace("{p}", "weight") for n in _EXPERT_GATE_UP),
           "experts_interleaved"),
    Rename("model.layers.{i}.mlp.experts.gate_up_proj_bias", tuple(n.replace("{p}", "bias") for n in _EXPERT_GATE_UP),
           "experts_interleaved"),
    Rename("model.layers.{i}.mlp.experts.down_proj", ("layers.{i}.mlp.experts.{e}.down_proj.weight",), "experts_T"),
    Rename("model.layers.{i}.mlp.experts.down_proj_bias", ("layers.{i}.mlp.experts.{e}.down_proj.bias",), "experts_T"),
]

PHI_NAMES = [
    Rename("model.embed_tokens.weight", "embed.weight"),
    Rename("model.layers.{i}.input_layernorm.{p}", "layers.{i}.attn_norm.{p}"),
    *(Rename(f"model.layers.{{i}}.self_attn.{n}.{{p}}", f"layers.{{i}}.attn.{n}.{{p}}") for n in ("q_proj", "k_proj", "v_proj")),
    Rename("model.layers.{i}.self_attn.dense.{p}", "layers.{i}.attn.o_proj.{p}"),
    Rename("model.layers.{i}.mlp.fc1.{p}", "layers.{i}.mlp.up_proj.{p}"),
    Rename("model.layers.{i}.mlp.fc2.{p}", "layers.{i}.mlp.down_proj.{p}"),
    Rename("model.final_layernorm.{p}", "norm.{p}"),
    Rename("lm_head.{p}", "lm_head.{p}"),
]

PHI3_NAMES = [
    *(r for r in _LLAMA_ATTN_NAMES if ".self_attn." not in r.hf or ".o_proj." in r.hf),
    Rename("model.layers.{i}.self_attn.qkv_proj.{p}", _QKV, "qkv_cat"),
    Rename("model.layers.{i}.mlp.gate_up_proj.{p}", _GATE_UP, "cat"),
    Rename("model.layers.{i}.mlp.down_proj.{p}", "layers.{i}.mlp.down_proj.{p}"),
]

_GLM_MLP = [Rename("model.layers.{i}.mlp.gate_up_proj.{p}", _GATE_UP, "cat"),
            Rename("model.layers.{i}.mlp.down_proj.{p}", "layers.{i}.mlp.down_proj.{p}")]
GLM_NAMES = [*_LLAMA_ATTN_NAMES, *_GLM_MLP]

CHATGLM_NAMES = [
    Rename("transformer.embedding.word_embeddings.weight", "embed.weight"),
    Rename("transformer.encoder.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    Rename("transformer.encoder.layers.{i}.self_attention.query_key_value.{p}", _QKV, "qkv_cat"),
    Rename("transformer.encoder.layers.{i}.self_attention.dense.{p}", "layers.{i}.attn.o_proj.{p}"),
    Rename("transformer.encoder.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    Rename("transformer.encoder.layers.{i}.mlp.dense_h_to_4h.{p}", _GATE_UP, "cat"),
    Rename("transformer.encoder.layers.{i}.mlp.dense_4h_to_h.{p}", "layers.{i}.mlp.down_proj.{p}"),
    Rename("transformer.encoder.final_layernorm.weight", "norm.weight"),
    Rename("transformer.output_layer.weight", "lm_head.weight"),
]

_EMBED = Rename("model.embed_tokens.weight", "embed.weight")
_FINAL = [Rename("model.norm.weight", "norm.weight"), Rename("lm_head.weight", "lm_head.weight")]
_ATTN = [r for r in _LLAMA_ATTN_NAMES if ".self_attn." in r.hf]
_MLP = [r for r in LLAMA_NAMES if r.hf in _LLAMA_MLP]
_QK_NORM = [Rename(f"model.layers.{{i}}.self_attn.{n}.weight", f"layers.{{i}}.attn.{n}.weight") for n in ("q_norm", "k_norm")]


def _norm(hf: str, native: str) -> Rename:
    return Rename(f"model.layers.{{i}}.{hf}.weight", f"layers.{{i}}.{native}.weight")


QWEN3_NAMES = [*LLAMA_NAMES, *_QK_NORM]
QWEN3_MOE_NAMES = [*QWEN3_NAMES, Rename("model.layers.{i}.mlp.gate.weight", "layers.{i}.mlp.router.weight"),
                   *(r for r in _ROUTED_EXPERTS if "shared" not in r.hf)]
GLM4_MOE_NAMES = [*QWEN3_NAMES, *_SIGMOID_ROUTER, *_ROUTED_EXPERTS]
_FF = "model.layers.{i}.feed_forward"
LLAMA4_NAMES = [
    *_LLAMA_ATTN_NAMES,
    *(Rename(f"{_FF}.{n}.weight", f"layers.{{i}}.mlp.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")),
    Rename(f"{_FF}.router.weight", "layers.{i}.mlp.router.weight"),
    *(Rename(f"{_FF}.shared_expert.{n}.weight", f"layers.{{i}}.mlp.shared_expert.{n}.weight")
      for n in ("gate_proj", "up_proj", "down_proj")),
    # stacked experts, x @ W layout (E, in, out); gate | up halves along the 2 * d_ff outputs
    Rename(f"{_FF}.experts.gate_up_proj", tuple(n.replace("{p}", "weight") for n in _EXPERT_GATE_UP), "experts_cat"),
    Rename(f"{_FF}.experts.down_proj", ("layers.{i}.mlp.experts.{e}.down_proj.weight",), "experts_T"),
]
GEMMA2_NAMES = [_EMBED, _norm("input_layernorm", "attn_norm"), *_ATTN, _norm("post_attention_layernorm", "attn_post_norm"),
                _norm("pre_feedforward_layernorm", "mlp_norm"), *_MLP, _norm("post_feedforward_layernorm", "mlp_post_norm"),
                *_FINAL]
GEMMA3_NAMES = [*GEMMA2_NAMES, *_QK_NORM]
# GLM-4-0414: post_attention_layernorm is the pre-MLP norm (as in Llama); the sandwich norms are post_self_attn_layernorm
# and post_mlp_layernorm
GLM4_NAMES = [_EMBED, _norm("input_layernorm", "attn_norm"), *_ATTN, _norm("post_self_attn_layernorm", "attn_post_norm"),
              _norm("post_attention_layernorm", "mlp_norm"), *_GLM_MLP, _norm("post_mlp_layernorm", "mlp_post_norm"),
              *_FINAL]
OLMO2_NAMES = [_EMBED, *_ATTN, *_QK_NORM, _norm("post_attention_layernorm", "attn_post_norm"), *_MLP,
               _norm("post_feedforward_layernorm", "mlp_post_norm"), *_FINAL]

_ROTARY_BUFFERS = (r"rotary_emb\.inv_freq$",)
# a multimodal checkpoint's text decoder: the Hub's original layout (language_model.model.*) and transformers>=4.52's
# (model.language_model.*); its vision tower and projector are skipped
_TEXT_DECODER = (("model.language_model.", "model."), ("language_model.model.", "model."),
                 ("language_model.lm_head.", "lm_head."))
_VISION = (r"^(model\.)?(vision_tower|vision_model|multi_modal_projector)\.",)

REGISTRY: dict[str, Converter] = {}


def register(conv: Converter) -> Converter:
    for arch in conv.architectures:
        REGISTRY[arch] = conv
    return conv


register(Converter(("LlamaForCausalLM",), "llama", _llama_from_hf, _llama_to_hf_checked, LLAMA_NAMES, _ROTARY_BUFFERS))
register(Converter(("MistralForCausalLM",), "mistral", _mistral_from_hf, _mistral_to_hf, LLAMA_NAMES, _ROTARY_BUFFERS))
register(Converter(("Qwen2ForCausalLM",), "qwen2", _qwen2_from_hf, _qwen2_to_hf, LLAMA_NAMES, _ROTARY_BUFFERS))
register(Converter(("GPT2LMHeadModel",), "gpt2", _gpt2_from_hf, _gpt2_to_hf, GPT2_NAMES,
                   (r"\.attn\.(masked_)?bias$",), optional_prefix="transformer."))
register(Converter(("BloomForCausalLM",), "bloom", _bloom_from_hf, _bloom_to_hf, BLOOM_NAMES, optional_prefix="transformer."))
register(Converter(("MixtralForCausalLM",), "mixtral", _mixtral_from_hf, _mixtral_to_hf, MIXTRAL_NAMES, _ROTARY_BUFFERS))
register(Converter(("Qwen2MoeForCausalLM",), "qwen2_moe", _qwen2_moe_from_hf, _qwen2_moe_to_hf, QWEN2_MOE_NAMES,
                   _ROTARY_BUFFERS))
register(Converter(("DeepseekV3ForCausalLM",), "deepseek_v3", _deepseek_v3_from_hf, _deepseek_v3_to_hf,
                   DEEPSEEK_V3_NAMES, _ROTARY_BUFFERS, joins=(FP8_BLOCKS,), extra_layers=True))
register(Converter(("Glm4MoeForCausalLM",), "glm4_moe", _glm4_moe_from_hf, _glm4_moe_to_hf, GLM4_MOE_NAMES,
                   _ROTARY_BUFFERS, joins=(FP8_BLOCKS,), extra_layers=True))
register(Converter(("Qwen3MoeForCausalLM",), "qwen3_moe", _qwen3_moe_from_hf, _qwen3_moe_to_hf, QWEN3_MOE_NAMES,
                   _ROTARY_BUFFERS, joins=(FP8_BLOCKS,)))
register(Converter(("Llama4ForCausalLM",), "llama4_text", _llama4_from_hf, _llama4_to_hf, LLAMA4_NAMES,
                   _ROTARY_BUFFERS))
register(Converter(("Llama4ForConditionalGeneration",), "llama4", _llama4_multimodal_from_hf, _llama4_to_hf,
                   LLAMA4_NAMES, _ROTARY_BUFFERS + _VISION, rewrite=_TEXT_DECODER))
register(Converter(("GptOssForCausalLM",), "gpt_oss", _gpt_oss_from_hf, _gpt_oss_to_hf, GPT_OSS_NAMES,
                   _ROTARY_BUFFERS, joins=(MXFP4,)))
register(Converter(("GemmaForCausalLM",), "gemma", _gemma_from_hf, _gemma_to_hf, LLAMA_NAMES, _ROTARY_BUFFERS))
register(Converter(("PhiForCausalLM",), "phi", _phi_from_hf, _phi_to_hf, PHI_NAMES, _ROTARY_BUFFERS))
register(Converter(("Phi3ForCausalLM",), "phi3", _phi3_from_hf, _phi3_to_hf, PHI3_NAMES, _ROTARY_BUFFERS,
                   defaults=PHI3_DEFAULTS))
register(Converter(("GlmForCausalLM",), "glm", _glm_from_hf, _glm_to_hf, GLM_NAMES, _ROTARY_BUFFERS))
register(Converter(("Glm4ForCausalLM",), "glm4", _glm4_from_hf, _glm4_to_hf, GLM4_NAMES, _ROTARY_BUFFERS))
register(Converter(("Qwen3ForCausalLM",), "qwen3", _qwen3_from_hf, _qwen3_to_hf, QWEN3_NAMES, _ROTARY_BUFFERS,
                   defaults=QWEN3_DEFAULTS))
register(Converter(("Gemma2ForCausalLM",), "gemma2", _gemma2_from_hf, _gemma2_to_hf, GEMMA2_NAMES, _ROTARY_BUFFERS,
                   defaults=GEMMA2_DEFAULTS))
register(Converter(("Gemma3ForCausalLM",), "gemma3_text", _gemma3_from_hf, _gemma3_to_hf, GEMMA3_NAMES, _ROTARY_BUFFERS,
                   defaults=GEMMA3_TEXT_DEFAULTS))
register(Converter(("Gemma3ForConditionalGeneration",), "gemma3", _gemma3_multimodal_from_hf, _gemma3_to_hf,
                   GEMMA3_NAMES, _ROTARY_BUFFERS + _VISION, rewrite=_TEXT_DECODER))
register(Converter(("Olmo2ForCausalLM",), "olmo2", _olmo2_from_hf, _olmo2_to_hf, OLMO2_NAMES, _ROTARY_BUFFERS,
                   defaults=OLMO2_DEFAULTS))
register(Converter(("SmolLM3ForCausalLM",), "smollm3", _smollm3_from_hf, _smollm3_to_hf, LLAMA_NAMES, _ROTARY_BUFFERS,
                   defaults=SMOLLM3_DEFAULTS))
register(Converter(("Mistral3ForConditionalGeneration",), "mistral3", _mistral3_from_hf, _mistral_to_hf, LLAMA_NAMES,
                   _ROTARY_BUFFERS + _VISION, rewrite=_TEXT_DECODER))
register(Converter(("ChatGLMModel", "ChatGLMForConditionalGeneration"), "chatglm", _chatglm_from_hf, _chatglm_to_hf,
                   CHATGLM_NAMES, (r"^transformer\.rotary_pos_emb\.inv_freq$",), extra_to_hf=_chatglm_buffers))


def converter_of(hf: Mapping) -> Converter:
    """The converter for an HF config dict: encoder-decoder and vision-only checkpoints are refused by what they are
    (one line), any other unknown architecture by name."""
    arch = architecture_of(hf)
    if arch not in REGISTRY:
        if hf.get("is_encoder_decoder"):
            raise CheckpointError(f"'{arch}' is an encoder-decoder checkpoint (is_encoder_decoder); lmforge loads "
                                  "decoder-only language models")
        if "vision_config" in hf and "text_config" not in hf or "vision" in str(hf.get("model_type", "")):
            raise CheckpointError(f"'{arch}' is a vision-only checkpoint (no text decoder); lmforge loads language "
                                  "models")
    return converter_for(arch)


def converter_for(arch: str | None) -> Converter:
    """The converter for an HF `architectures` value; unknown → one line listing what is supported."""
    if arch not in REGISTRY:
        raise CheckpointError(f"unknown architecture '{arch}'; supported: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[arch]
