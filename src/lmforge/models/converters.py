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
# entries list their native names in order.
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
    derived buffers, not weights; `extra_to_hf(cfg)` buffers a checkpoint format stores although they are derived
    (ChatGLM's rotary inv_freq), written on save.
    """

    architectures: tuple[str, ...]
    model_type: str
    config_from_hf: Callable[[Mapping], dict]
    config_to_hf: Callable[[ModelConfig], dict]
    names: list[Rename]
    ignore: tuple[str, ...] = ()
    optional_prefix: str = ""  # original GPT-2/BLOOM checkpoints omit this prefix
    extra_to_hf: Callable[[ModelConfig], dict[str, torch.Tensor]] | None = None
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
                    return list(zip(names, _split_fused(tensor, rule.transform, cfg, len(names))))
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
            for fill in _fills(rule.hf, cfg):
                parts = [native.get(t.format(**fill)) for t in templates]
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


def _transpose(t: torch.Tensor) -> torch.Tensor:
    """Conv1D (in, out) ↔ Linear (out, in); biases pass through."""
    return t.T if t.ndim == 2 else t


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    hd = cfg.dim_per_head
    return [cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd]


def _split_fused(t: torch.Tensor, kind: str, cfg: ModelConfig, n: int) -> list[torch.Tensor]:
    """One fused HF tensor -> its `n` native parts (see the transform names above)."""
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
              qkv_bias=False, out_bias=False, mlp_bias=False, embed_norm=False, lm_head_bias=False)


# Where a field's non-default value can be saved (the hint in `_expect`'s error).
_ARCH_HINT = {"mlp": "MixtralForCausalLM or Qwen2MoeForCausalLM (mlp=moe), GPT2LMHeadModel (gelu)",
              "norm_weight_offset": "GemmaForCausalLM", "scale_embeddings": "GemmaForCausalLM",
              "parallel_block": "PhiForCausalLM", "lm_head_bias": "PhiForCausalLM",
              "rope_interleaved": "GlmForCausalLM or ChatGLMModel", "rotary_fraction": "GlmForCausalLM, PhiForCausalLM",
              "sliding_window": "MistralForCausalLM, Qwen2ForCausalLM, Phi3ForCausalLM",
              "sliding_window_layers": "Qwen2ForCausalLM", "qkv_bias": "Qwen2ForCausalLM, LlamaForCausalLM"}


def _expect(cfg: ModelConfig, arch: str, **fields) -> None:
    """One-line CheckpointError naming the first field `arch` cannot express (checked before anything is written)."""
    for key, want in {**_PLAIN, **fields}.items():
        if want is not _ANY and getattr(cfg, key) != want:
            hint = _ARCH_HINT.get(key, "the architecture the model was loaded from")
            raise CheckpointError(f"{arch} cannot express {key}={getattr(cfg, key)!r} (it needs {want!r}); "
                                  f"set arch to one that can, e.g. {hint}")


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
    return _mistral_from_hf(hf)  # Llama layout (fused on disk) with an optional sliding window


def _phi3_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "Phi3ForCausalLM", rotary_fraction=_ANY, sliding_window=_ANY)
    return {**_llama_to_hf(cfg, "phi3"), "sliding_window": cfg.sliding_window, "partial_rotary_factor":
            cfg.rotary_fraction, "original_max_position_embeddings": cfg.max_seq_len, "resid_pdrop": 0.0,
            "embd_pdrop": 0.0}


def _glm_from_hf(hf: Mapping) -> dict:
    out = _llama_from_hf(hf, qkv_bias=hf.get("attention_bias", True))
    return {"rotary_fraction": 0.5, **out, "rope_interleaved": True}


def _glm_to_hf(cfg: ModelConfig) -> dict:
    _expect(cfg, "GlmForCausalLM", rotary_fraction=_ANY, rope_interleaved=True, qkv_bias=_ANY)
    return {**_llama_to_hf(cfg, "glm"), "attention_bias": cfg.qkv_bias, "partial_rotary_factor": cfg.rotary_fraction}


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

GLM_NAMES = [
    *_LLAMA_ATTN_NAMES,
    Rename("model.layers.{i}.mlp.gate_up_proj.{p}", _GATE_UP, "cat"),
    Rename("model.layers.{i}.mlp.down_proj.{p}", "layers.{i}.mlp.down_proj.{p}"),
]

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
register(Converter(("MixtralForCausalLM",), "mixtral", _mixtral_from_hf, _mixtral_to_hf, MIXTRAL_NAMES, _ROTARY_BUFFERS))
register(Converter(("Qwen2MoeForCausalLM",), "qwen2_moe", _qwen2_moe_from_hf, _qwen2_moe_to_hf, QWEN2_MOE_NAMES,
                   _ROTARY_BUFFERS))
register(Converter(("GemmaForCausalLM",), "gemma", _gemma_from_hf, _gemma_to_hf, LLAMA_NAMES, _ROTARY_BUFFERS))
register(Converter(("PhiForCausalLM",), "phi", _phi_from_hf, _phi_to_hf, PHI_NAMES, _ROTARY_BUFFERS))
register(Converter(("Phi3ForCausalLM",), "phi3", _phi3_from_hf, _phi3_to_hf, PHI3_NAMES, _ROTARY_BUFFERS))
register(Converter(("GlmForCausalLM",), "glm", _glm_from_hf, _glm_to_hf, GLM_NAMES, _ROTARY_BUFFERS))
register(Converter(("ChatGLMModel", "ChatGLMForConditionalGeneration"), "chatglm", _chatglm_from_hf, _chatglm_to_hf,
                   CHATGLM_NAMES, (r"^transformer\.rotary_pos_emb\.inv_freq$",), extra_to_hf=_chatglm_buffers))


def converter_for(arch: str | None) -> Converter:
    """The converter for an HF `architectures` value; unknown → one line listing what is supported."""
    if arch not in REGISTRY:
        raise CheckpointError(f"unknown architecture '{arch}'; supported: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[arch]
