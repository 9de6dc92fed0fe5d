"""One converter per Hugging Face architecture: config mapping and tensor-name mapping, both directions.

A converter is data (a rename table) plus, where a checkpoint fuses or transposes tensors, a small transform.
`REGISTRY` maps every `architectures` value we read to its converter; adding a family means adding an entry here.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from pydantic import ValidationError

from ..errors import CheckpointError
from .config import ModelConfig, RopeScaling

# ---------------------------------------------------------------------------------------------------------------
# Tensor-name tables. "{i}" is a layer index, "{p}" a parameter kind (weight|bias). A transform names how a tensor
# differs between the two layouts: "T" transposed (GPT-2's Conv1D), "qkv" q|k|v concatenated along the output dim
# (GPT-2), "qkv_heads" fused per head as [head, q|k|v, head_dim] (BLOOM). Fused entries list three native names.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rename:
    hf: str
    native: str | tuple[str, str, str]
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
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
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


def _rope_from_hf(hf: Mapping) -> dict:
    """rope_theta + scaling from either transformers<5 keys (rope_theta, rope_scaling) or >=5 (rope_parameters)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {}) or params
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    out: dict = {"rope_theta": float(theta)}
    fraction = hf.get("partial_rotary_factor", params.get("partial_rotary_factor"))
    if fraction is not None:
        out["rotary_fraction"] = float(fraction)
    if kind == "default":
        return out
    if kind == "linear":
        out["rope_scaling"] = RopeScaling(type="linear", factor=scaling["factor"])
    elif kind == "llama3":
        out["rope_scaling"] = RopeScaling(
            type="llama3", factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_seq_len=scaling["original_max_position_embeddings"])
    else:
        raise CheckpointError(f"config.json rope scaling type '{kind}' is not supported yet; supported: default, linear, llama3")
    return out


def _rope_to_hf(cfg: ModelConfig) -> dict:
    """Write the transformers<5 keys, which both transformers 4.x and 5.x (and llama.cpp's converter) read."""
    out: dict = {"rope_theta": cfg.rope_theta}
    s = cfg.rope_scaling
    if s is not None and s.type == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": s.factor}
    elif s is not None:
        out["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_max_seq_len}
    return out


def _tokens(hf: Mapping) -> dict:
    return {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _require(hf: Mapping, key: str, expected, why: str) -> None:
    if hf.get(key, expected) != expected:
        raise CheckpointError(f"config.json {key}={hf[key]!r} is not supported ({why}); expected {expected!r}")


# ---------------------------------------------------------------------------------------------------------------
# Converter
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Converter:
    """Maps one HF architecture to the native model and back.

    `config_from_hf(hf_dict) -> dict of ModelConfig fields`; `config_to_hf(cfg) -> dict` (arch-specific keys; the
    caller adds `architectures`, `torch_dtype`); `names` the tensor rename table; `ignore` HF keys that are
    derived buffers, not weights.
    """

    architectures: tuple[str, ...]
    model_type: str
    config_from_hf: Callable[[Mapping], dict]
    config_to_hf: Callable[[ModelConfig], dict]
    names: list[Rename]
    ignore: tuple[str, ...] = ()
    optional_prefix: str = ""  # original GPT-2/BLOOM checkpoints omit this prefix
    _compiled: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        self._compiled = [(_pattern(r.hf), r) for r in self.names]

    def build_config(self, hf: Mapping) -> ModelConfig:
        fields = self.config_from_hf(hf)
        fields.setdefault("arch", self.architectures[0])
        try:
            return ModelConfig(**fields)
        except ValidationError as e:  # report the first problem on one line
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "config"
            raise CheckpointError(f"config.json gives an invalid model ({where}): {err['msg']}") from None

    def to_native(self, hf_name: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
        """Native (name, tensor) pairs for one HF tensor; [] for ignored buffers; error for unknown names."""
        if self.optional_prefix and not hf_name.startswith(self.optional_prefix) and not hf_name.startswith("lm_head"):
            hf_name = self.optional_prefix + hf_name
        if any(re.search(p, hf_name) for p in self.ignore):
            return []
        for pattern, rule in self._compiled:
            m = pattern.match(hf_name)
            if m:
                fill = {k: v for k, v in m.groupdict().items() if v is not None}
                if isinstance(rule.native, tuple):
                    names = [n.format(**fill) for n in rule.native]
                    return list(zip(names, _split_qkv(tensor, rule.transform, cfg)))
                return [(rule.native.format(**fill), _transpose(tensor) if rule.transform == "T" else tensor)]
        raise CheckpointError(f"checkpoint tensor '{hf_name}' has no mapping for {self.architectures[0]}; "
                              "the checkpoint is a variant lmforge does not support yet")

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
        name = f"{hf_module}.weight"
        if self.optional_prefix and not name.startswith(self.optional_prefix) and not name.startswith("lm_head"):
            name = self.optional_prefix + name
        for pattern, rule in self._compiled:
            m = pattern.match(name)
            if m and not isinstance(rule.native, tuple):
                fill = {k: v for k, v in m.groupdict().items() if v is not None}
                return rule.native.format(**fill).removesuffix(".weight")
        return None

    def to_hf(self, native: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """HF (name, tensor) pairs from a native state dict, fusing/transposing as the checkpoint layout needs."""
        for rule in self.names:
            templates = rule.native if isinstance(rule.native, tuple) else (rule.native,)
            for i in range(cfg.n_layers) if "{i}" in rule.hf else [None]:
                for p in ("weight", "bias") if "{p}" in rule.hf else [None]:
                    fill = {k: v for k, v in (("i", i), ("p", p)) if v is not None}
                    parts = [native.get(t.format(**fill)) for t in templates]
                    if any(t is None for t in parts):
                        continue
                    name = rule.hf.format(**fill)
                    if rule.transform in ("qkv", "qkv_heads"):
                        yield name, _fuse_qkv(parts, rule.transform, cfg)
                    else:
                        yield name, (_transpose(parts[0]) if rule.transform == "T" else parts[0]).contiguous()


def _transpose(t: torch.Tensor) -> torch.Tensor:
    """Conv1D (in, out) ↔ Linear (out, in); biases pass through."""
    return t.T if t.ndim == 2 else t


def _split_qkv(t: torch.Tensor, kind: str, cfg: ModelConfig) -> list[torch.Tensor]:
    hd, h, kv = cfg.dim_per_head, cfg.n_heads, cfg.kv_heads
    if kind == "qkv":  # GPT-2 Conv1D: (in, q|k|v) → three (out, in)
        return [_transpose(p).contiguous() for p in t.split([h * hd, kv * hd, kv * hd], dim=-1)]
    # BLOOM: rows are [head, (q, k, v), head_dim]
    per_head = t.view(h, 3, hd, *t.shape[1:])
    return [per_head[:, j].reshape(h * hd, *t.shape[1:]).contiguous() for j in range(3)]


def _fuse_qkv(parts: list[torch.Tensor], kind: str, cfg: ModelConfig) -> torch.Tensor:
    if kind == "qkv":
        return torch.cat([_transpose(p) for p in parts], dim=-1).contiguous()
    h, hd = cfg.n_heads, cfg.dim_per_head
    return torch.stack([p.view(h, hd, *p.shape[1:]) for p in parts], dim=1).reshape(3 * h * hd, *parts[0].shape[1:])


# ---------------------------------------------------------------------------------------------------------------
# The families
# ---------------------------------------------------------------------------------------------------------------


def _llama_from_hf(hf: Mapping, *, qkv_bias: bool | None = None) -> dict:
    _require(hf, "pretraining_tp", 1, "tensor-parallel-sliced checkpoints")
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
        d_ff=hf["intermediate_size"], norm="rms", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
        act=_activation(hf, "hidden_act"), pos="rope", **_rope_from_hf(hf),
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


def _check_llama_like(cfg: ModelConfig, name: str, qkv_bias: bool) -> None:
    if cfg.norm != "rms" or cfg.mlp != "swiglu" or cfg.pos != "rope" or cfg.embed_norm or cfg.rope_interleaved:
        raise CheckpointError(f"this model (norm={cfg.norm}, mlp={cfg.mlp}, pos={cfg.pos}) cannot be saved as {name}")
    if cfg.qkv_bias != qkv_bias and name != "LlamaForCausalLM":
        raise CheckpointError(f"{name} requires qkv_bias={qkv_bias}; save as LlamaForCausalLM (attention_bias) instead")
    if cfg.rotary_fraction != 1.0:
        raise CheckpointError(f"{name} has no partial rotary; rotary_fraction must be 1.0")


def _llama_to_hf_checked(cfg: ModelConfig) -> dict:
    _check_llama_like(cfg, "LlamaForCausalLM", cfg.qkv_bias)
    if cfg.qkv_bias != cfg.out_bias:
        raise CheckpointError("LlamaForCausalLM's attention_bias covers q/k/v and o together; qkv_bias must equal out_bias")
    if cfg.sliding_window is not None:
        raise CheckpointError("LlamaForCausalLM has no sliding window; save with arch=MistralForCausalLM")
    return _llama_to_hf(cfg, "llama")


def _mistral_from_hf(hf: Mapping) -> dict:
    out = _llama_from_hf(hf, qkv_bias=False)
    window = hf.get("sliding_window")
    if window is not None and window < out["max_seq_len"]:
        out["sliding_window"] = window
    return out


def _mistral_to_hf(cfg: ModelConfig) -> dict:
    _check_llama_like(cfg, "MistralForCausalLM", False)
    return {**_llama_to_hf(cfg, "mistral"), "sliding_window": cfg.sliding_window}


def _qwen2_from_hf(hf: Mapping) -> dict:
    out = _llama_from_hf(hf, qkv_bias=True)
    if hf.get("use_sliding_window", False):
        raise CheckpointError("config.json use_sliding_window=true (Qwen2 per-layer windows) is not supported yet")
    return out


def _qwen2_to_hf(cfg: ModelConfig) -> dict:
    _check_llama_like(cfg, "Qwen2ForCausalLM", True)
    return {**_llama_to_hf(cfg, "qwen2"), "use_sliding_window": False}


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


def _gpt2_to_hf(cfg: ModelConfig) -> dict:
    if cfg.pos != "learned" or cfg.norm != "layer" or cfg.mlp != "gelu" or cfg.kv_heads != cfg.n_heads:
        raise CheckpointError("GPT2LMHeadModel needs pos=learned, norm=layer, mlp=gelu and n_kv_heads=n_heads")
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
    return dict(model_type="bloom", vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, n_layer=cfg.n_layers,
                n_head=cfg.n_heads, layer_norm_epsilon=cfg.norm_eps, seq_length=cfg.max_seq_len,
                tie_word_embeddings=cfg.tie_embeddings, apply_residual_connection_post_layernorm=False,
                **_tokens(cfg.model_dump()))


_ROTARY_BUFFERS = (r"rotary_emb\.inv_freq$",)

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


def converter_for(arch: str | None) -> Converter:
    """The converter for an HF `architectures` value; unknown → one line listing what is supported."""
    if arch not in REGISTRY:
        raise CheckpointError(f"unknown architecture '{arch}'; supported: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[arch]
