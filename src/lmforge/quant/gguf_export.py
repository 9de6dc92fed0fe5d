"""GGUF export for llama.cpp: every family lmforge loads whose architecture llama.cpp has, F32 to the K-quants.

``export_gguf(model_or_checkpoint, "m.gguf", qtype="q4_k_m")`` writes one file llama.cpp (and Ollama, LM Studio ...)
runs. What it holds:

- ``general.architecture`` chosen from the model's HF architecture (``ARCHS``: Llama and Mistral -> ``llama``,
  Qwen 2/3 (MoE) -> ``qwen2``/``qwen3``/``qwen3moe``/``qwen2moe``, Gemma 1/2/3, OLMo 2, Phi-2/3, GPT-2, BLOOM,
  SmolLM3, GLM-4/ChatGLM -> ``chatglm``, GLM-4-0414 -> ``glm4``, GLM-4.5 -> ``glm4moe``, Llama 4 -> ``llama4``, DeepSeek-V3 ->
  ``deepseek2``, gpt-oss), after checking that llama.cpp's graph for that architecture computes this model: every
  ModelConfig field its graph hard-codes (norm kind and placement, activation, biases, qk-norm, soft-caps, the
  sliding-window layer pattern, the attention scale ...) must match, else one error names the fields;
- ``{arch}.*`` hyper-parameters: widths, heads, head dims, context, RoPE dims/base/scaling (linear, yarn, Llama 3's as
  a ``rope_freqs`` tensor), norm epsilon, sliding window, soft-caps, expert counts;
- the vocabulary (see ``gguf_vocab``): tokens, merges, special ids, the detected ``tokenizer.ggml.pre`` and the chat
  template;
- the weights under llama.cpp's tensor names (checked against ``gguf.MODEL_TENSORS`` for the architecture), with the
  layout changes llama.cpp expects: q/k rows permuted to adjacent-pair RoPE for the ``llama``/``smollm3`` graphs,
  Gemma's RMSNorm weights stored as 1 + w, q/k/v fused for GPT-2/BLOOM/Phi-3 (and Phi-3's and GLM's gate|up), MoE
  experts stacked into one 3-D tensor per projection (GLM-4.5's and DeepSeek-V3's selection bias as
  ``exp_probs_b``, gpt-oss's 2-D expert biases beside them, kept f32), DeepSeek's kv_b_proj split per head into
  ``attn_k_b`` / ``attn_v_b`` (llama.cpp's absorbed MLA).

Types (``GGUF_TYPES``): f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (quantized by ``gguf.quants``) and q4_k_s,
q4_k_m, q5_k_s, q5_k_m, q6_k (``kquants``). Norms, biases and routers stay f32. As llama.cpp's quantizer does, the
output layer (the tied embedding when there is none) is Q6_K in every quantized type but Q8_0, and the _M mixes put
attn_v and ffn_down in Q6_K on the first and last eighth of the layers and every third between, the rest in the base
type. A row that does not fill whole K-quant blocks of 256 falls back as llama.cpp's quantizer does (Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0; rows not a multiple of 32 stay f16). A model quantized with lmforge is exported from its
dequantized weights.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..models.gguf import permute_rope_rows, unpermute_rope_rows  # noqa: F401  (re-exported)
from ..models.positions import rope_inv_freq
from ..models.transformer import Transformer

log = logging.getLogger("lmforge.quant")

__all__ = ["export_gguf", "GGUF_TYPES", "ARCHS", "gguf_arch", "permute_rope_rows", "unpermute_rope_rows"]

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m",
              "q6_k")

_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
               "q4_k_s": "MOSTLY_Q4_K_S", "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_s": "MOSTLY_Q5_K_S",
               "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the 'gguf' package: pip install gguf") from None
    return gguf


# ---------------------------------------------------------------------------------------------------------------
# Architectures: what llama.cpp's graph for each one hard-codes, as ModelConfig values
# ---------------------------------------------------------------------------------------------------------------

_ANY = object()

# A plain pre-norm RoPE decoder with SwiGLU: what every llama.cpp graph below assumes unless it says otherwise.
_BASE = dict(norm="rms", norm_weight_offset=0.0, mlp="swiglu", act="silu", parallel_block=False,
             scale_embeddings=False, glu_limit=None, attention="gqa", attn_sinks=False, attn_chunk=None,
             attn_temperature_tuning=False, pos="rope", rotary_fraction=1.0, rope_interleaved=False, qk_norm="none",
             norm_placement="pre", attn_scale=None, attn_logit_softcap=None, final_logit_softcap=None,
             nope_layers=(), rope_local_theta=None, qkv_bias=False, out_bias=False, mlp_bias=False, embed_norm=False,
             lm_head_bias=False, sliding_window=None)
_GELU_LN = dict(norm="layer", mlp="gelu", act="gelu_tanh", qkv_bias=True, out_bias=True, mlp_bias=True)
_GEMMA = dict(norm_weight_offset=1.0, scale_embeddings=True, act="gelu_tanh", tie_embeddings=True)


@dataclass(frozen=True)
class Arch:
    """One llama.cpp architecture as lmforge writes it.

    `fixed`: ModelConfig fields and the value the graph computes with (`_ANY`: any value, written as metadata).
    `permute_qk`: llama.cpp rotates adjacent pairs here (its "normal" RoPE), so q/k rows are permuted per head.
    `norm_offset`: norms are stored as offset + w (Gemma). `fused_qkv` / `fused_gate_up`: one attn_qkv tensor / one
    ffn_up of [gate; up]. `moe`: the MoE shape the graph has (None: none), `window`: sliding-window metadata kept.
    """

    name: str
    fixed: dict = field(default_factory=dict)
    permute_qk: bool = False
    norm_offset: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    # "plain" (Mixtral/Qwen3-MoE: top-k renormalized), "shared" (Qwen2-MoE), "sigmoid" (GLM-4.5), or the family's own
    # ("llama4", "gpt-oss", "deepseek": checked by `check`)
    moe: str | None = None
    ffn_norm: str = "ffn_norm"  # the pre-MLP norm's name (glm4moe: post_attention_norm)
    window: bool = False
    rope_scalings: tuple[str, ...] = ("linear", "yarn")
    check: Callable | None = None  # cfg -> problems, for what the family's graph hard-codes beyond `fixed`


def _arch(name: str, **kw) -> Arch:
    fixed = {**_BASE, **kw.pop("fixed", {})}
    return Arch(name, fixed, **kw)


_LLAMA = _arch("llama", permute_qk=True, fixed=dict(sliding_window=_ANY), rope_scalings=("linear", "llama3", "yarn"))
_MIXTRAL = _arch("llama", permute_qk=True, moe="plain", fixed=dict(mlp="moe", sliding_window=_ANY),
                 rope_scalings=("linear", "llama3", "yarn"))
_QWEN2 = _arch("qwen2", fixed=dict(qkv_bias=_ANY))
_GEMMA2_FIXED = dict(**_GEMMA, norm_placement="sandwich", attn_scale=_ANY, attn_logit_softcap=_ANY,
                     final_logit_softcap=_ANY, sliding_window=_ANY)


def _mismatches(cfg, want: dict) -> list[str]:
    """`field=value (needs wanted)` for every ModelConfig field in `want` that differs (`_ANY`: anything goes)."""
    return [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in want.items()
            if v is not _ANY and getattr(cfg, k) != v]


def _dense_and_shared_problems(cfg, arch_name: str) -> list[str]:
    """DeepSeek-style MoE as llama.cpp's glm4moe / deepseek2 lay it out: dense layers only first
    (leading_dense_block_count) and shared experts of the experts' width (expert_shared_count)."""
    out = []
    if cfg.moe_dense_layers != tuple(range(len(cfg.moe_dense_layers))):
        out.append(f"moe_dense_layers={cfg.moe_dense_layers} (llama.cpp's {arch_name}: the first layers only)")
    if cfg.moe_shared_d_ff <= 0 or cfg.moe_shared_d_ff % cfg.expert_d_ff:
        out.append(f"moe_shared_d_ff={cfg.moe_shared_d_ff} (needs a multiple of the expert width {cfg.expert_d_ff})")
    return out


# --- Llama 4 (llama.cpp's llama4) --------------------------------------------------------------------------------
# Its graph hard-codes what Llama 4 Scout and Maverick do: no RoPE on every 4th layer, attention in 8192-position
# chunks on the others, the NoPE layers' query temperature (floor 8192, scale 0.1), the L2 qk-norm on RoPE layers
# unless there are 128 experts (Maverick), top-k sigmoid routing whose weight scales the expert's input, an ungated
# shared expert as wide as the experts, and experts on every k-th layer (interleave_moe_layer_step).
_LLAMA4_CHUNK, _LLAMA4_NOPE_STEP, _LLAMA4_TEMPERATURE = 8192, 4, (8192, 0.1)
_LLAMA4_MOE = dict(moe_router="sigmoid", moe_groups=1, moe_score_bias=False, moe_routed_scale=1.0,
                   moe_router_bias=False, moe_scale_input=True, moe_expert_bias=False, moe_norm_topk=False,
                   moe_shared_gate=False)


def _llama4_moe_step(cfg) -> int | None:
    """k when the MoE layers are k-1, 2k-1, ... (llama.cpp's interleave_moe_layer_step), else None."""
    moe = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    step = moe[0] + 1 if moe else 0
    return step if moe and moe == list(range(step - 1, cfg.n_layers, step)) else None


def _llama4_problems(cfg) -> list[str]:
    n = cfg.n_layers
    nope = tuple(i for i in range(n) if (i + 1) % _LLAMA4_NOPE_STEP == 0)
    out = _mismatches(cfg, _LLAMA4_MOE)
    if cfg.nope_layers != nope:
        out.append(f"nope_layers={cfg.nope_layers} (llama.cpp's llama4 skips RoPE on {nope})")
    rope_layers = tuple(i for i in range(n) if i not in nope)
    if any(cfg.layer_chunk(i) != (None if i in nope else _LLAMA4_CHUNK) for i in range(n)):
        out.append(f"attn_chunk={cfg.attn_chunk} attn_chunk_layers={cfg.attn_chunk_layers} (llama.cpp's llama4 "
                   f"attends in chunks of {_LLAMA4_CHUNK} on layers {rope_layers})")
    if nope and (not cfg.attn_temperature_tuning
                 or (cfg.attn_temperature_floor, cfg.attn_temperature_scale) != _LLAMA4_TEMPERATURE):
        out.append(f"attn_temperature_tuning={cfg.attn_temperature_tuning} floor={cfg.attn_temperature_floor} "
                   f"scale={cfg.attn_temperature_scale} (llama.cpp's llama4 tunes NoPE queries with floor 8192, "
                   "scale 0.1)")
    qk = "none" if cfg.moe_experts == 128 else "l2"
    if cfg.qk_norm != qk:
        out.append(f"qk_norm={cfg.qk_norm!r} (llama.cpp's llama4 with {cfg.moe_experts} experts uses {qk!r})")
    if cfg.moe_shared_d_ff != cfg.expert_d_ff:
        out.append(f"moe_shared_d_ff={cfg.moe_shared_d_ff} (llama.cpp's llama4: one shared expert of the experts' "
                   f"width {cfg.expert_d_ff})")
    if _llama4_moe_step(cfg) is None:
        out.append(f"moe_dense_layers={cfg.moe_dense_layers} (llama.cpp's llama4 has experts on layers k-1, 2k-1, "
                   "... for one k)")
    return out


_LLAMA4 = _arch("llama4", moe="llama4", check=_llama4_problems, rope_scalings=("linear", "llama3", "yarn"),
                fixed=dict(mlp="moe", rope_interleaved=True, qk_norm=_ANY, nope_layers=_ANY, attn_chunk=_ANY,
                           attn_temperature_tuning=_ANY))


# --- DeepSeek-V3 (llama.cpp's deepseek2) --------------------------------------------------------------------------
# MLA (the latent cached, kv_b split into attn_k_b / attn_v_b for the absorbed query; `_mla_tensors`) and DeepSeek's
# sigmoid MoE: group-limited top-k with a selection bias, routed scale, shared experts, leading dense layers.


def _deepseek2_problems(cfg) -> list[str]:
    """What llama.cpp's deepseek2 graph hard-codes beyond `fixed`: one RMSNorm epsilon for every norm (lmforge's MLA
    latent norms use DeepSeek's 1e-6), a sigmoid router whose group score is the best two experts, shared experts in
    every MoE layer, dense layers only first, and a YaRN whose cos/sin factor is 1 (mscale == mscale_all_dim)."""
    from ..models.transformer import MLA_NORM_EPS

    out = _mismatches(cfg, dict(moe_router="sigmoid", moe_router_bias=False, moe_scale_input=False,
                                moe_expert_bias=False, moe_shared_gate=False))
    if cfg.norm_eps != MLA_NORM_EPS:
        out.append(f"norm_eps={cfg.norm_eps!r} (llama.cpp's deepseek2 uses one epsilon, also for the MLA latent norms "
                   f"at {MLA_NORM_EPS})")
    if cfg.mla_nope_dim < 1:
        out.append("mla_nope_dim=0 (llama.cpp's deepseek2 needs position-free query/key dims)")
    out += _dense_and_shared_problems(cfg, "deepseek2")
    s = cfg.rope_scaling
    if s is not None and s.type == "yarn":
        if s.attention_factor is not None or not s.mscale_all_dim or s.mscale != s.mscale_all_dim:
            out.append(f"rope_scaling yarn mscale={s.mscale} mscale_all_dim={s.mscale_all_dim} attention_factor="
                       f"{s.attention_factor} (llama.cpp's deepseek2 scales q.k by mscale(factor, mscale_all_dim)^2 "
                       "and leaves cos/sin as they are: needs mscale == mscale_all_dim)")
        if not s.truncate or (s.beta_fast, s.beta_slow) != (32.0, 1.0):
            out.append(f"rope_scaling yarn beta_fast={s.beta_fast} beta_slow={s.beta_slow} truncate={s.truncate} "
                       "(llama.cpp's deepseek2 uses 32, 1, truncated)")
    return out


# --- gpt-oss (llama.cpp's gpt-oss) -------------------------------------------------------------------------------
# Its graph hard-codes gpt-oss's layout: attention sinks, q/k/v/o biases, the window on even layers (its
# sliding_window_pattern 2), a biased router whose top-k logits are softmaxed, biased experts with the clamped SwiGLU
# at alpha 1.702 and limit 7, no shared expert and no dense layers; its pre-MLP norm is `post_attention_norm`.
_GPT_OSS_MOE = dict(moe_router="softmax", moe_groups=1, moe_score_bias=False, moe_routed_scale=1.0,
                    moe_router_bias=True, moe_scale_input=False, moe_expert_bias=True, moe_norm_topk=True,
                    moe_shared_d_ff=0, moe_shared_gate=False, moe_dense_layers=())


def _gpt_oss_problems(cfg) -> list[str]:
    out = _mismatches(cfg, _GPT_OSS_MOE)
    even = tuple(range(0, cfg.n_layers, 2))
    if cfg.sliding_window is None or _windowed(cfg) != even:
        out.append(f"sliding_window={cfg.sliding_window} on layers {_windowed(cfg)} (llama.cpp's gpt-oss slides on "
                   f"{even})")
    return out


_GPT_OSS = _arch("gpt-oss", moe="gpt-oss", check=_gpt_oss_problems, ffn_norm="post_attention_norm", window=True,
                 fixed=dict(mlp="moe", attn_sinks=True, glu_limit=7.0, glu_alpha=1.702, qkv_bias=True, out_bias=True,
                            sliding_window=_ANY, tie_embeddings=False))


ARCHS: dict[str, Arch] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "MixtralForCausalLM": _MIXTRAL,
    "Qwen2ForCausalLM": _QWEN2,
    "Qwen2MoeForCausalLM": _arch("qwen2moe", moe="shared", fixed=dict(mlp="moe", qkv_bias=_ANY)),
    "Qwen3ForCausalLM": _arch("qwen3", fixed=dict(qk_norm="head")),
    "Qwen3MoeForCausalLM": _arch("qwen3moe", moe="plain", fixed=dict(mlp="moe", qk_norm="head")),
    "GemmaForCausalLM": _arch("gemma", norm_offset=True, fixed=_GEMMA),
    "Gemma2ForCausalLM": _arch("gemma2", norm_offset=True, window=True, fixed=_GEMMA2_FIXED),
    "Gemma3ForCausalLM": _arch("gemma3", norm_offset=True, window=True,
                               fixed={**_GEMMA2_FIXED, "qk_norm": "head", "attn_logit_softcap": None,
                                      "final_logit_softcap": None, "rope_local_theta": _ANY, "tie_embeddings": _ANY}),
    "Olmo2ForCausalLM": _arch("olmo2", fixed=dict(norm_placement="post", qk_norm="proj")),
    "Phi3ForCausalLM": _arch("phi3", fused_qkv=True, fused_gate_up=True, window=True,
                             fixed=dict(rotary_fraction=_ANY, sliding_window=_ANY)),
    "PhiForCausalLM": _arch("phi2", fixed=dict(**_GELU_LN, parallel_block=True, rotary_fraction=_ANY,
                                               lm_head_bias=True)),
    "GPT2LMHeadModel": _arch("gpt2", fused_qkv=True, fixed=dict(**_GELU_LN, pos="learned", rotary_fraction=_ANY,
                                                                rope_interleaved=_ANY)),
    "BloomForCausalLM": _arch("bloom", fused_qkv=True, fixed=dict(**_GELU_LN, pos="alibi", embed_norm=True,
                                                                  rotary_fraction=_ANY, rope_interleaved=_ANY)),
    "GlmForCausalLM": _arch("chatglm", fused_gate_up=True,
                            fixed=dict(rotary_fraction=_ANY, rope_interleaved=True, qkv_bias=_ANY)),
    # GLM-4-0414 / GLM-Z1: the chatglm layout plus sandwich norms (post_attention_norm, post_ffw_norm)
    "Glm4ForCausalLM": _arch("glm4", fused_gate_up=True, fixed=dict(rotary_fraction=_ANY, rope_interleaved=True,
                                                                    qkv_bias=_ANY, norm_placement="sandwich")),
    "Glm4MoeForCausalLM": _arch("glm4moe", moe="sigmoid", ffn_norm="post_attention_norm",
                                fixed=dict(mlp="moe", rotary_fraction=_ANY, qkv_bias=_ANY, qk_norm=_ANY)),
    "SmolLM3ForCausalLM": _arch("smollm3", permute_qk=True, fixed=dict(nope_layers=_ANY),
                                rope_scalings=("linear", "llama3", "yarn")),
    "Llama4ForCausalLM": _LLAMA4,
    # DeepSeek-V3 / R1 / Kimi-K2: MLA attention, sigmoid-routed MoE with groups (see _deepseek2_problems)
    "DeepseekV3ForCausalLM": _arch("deepseek2", moe="deepseek", check=_deepseek2_problems, rope_scalings=("yarn",),
                                   fixed=dict(attention="mla", mlp="moe", rope_interleaved=_ANY)),
    "GptOssForCausalLM": _GPT_OSS,
}
ARCHS["Gemma3ForConditionalGeneration"] = ARCHS["Gemma3ForCausalLM"]
ARCHS["ChatGLMModel"] = ARCHS["ChatGLMForConditionalGeneration"] = ARCHS["GlmForCausalLM"]
ARCHS["Llama4ForConditionalGeneration"] = _LLAMA4  # its text decoder (lmforge loads it as Llama4ForCausalLM)


def _problems(cfg, arch: Arch) -> list[str]:
    """Every way `cfg` differs from what llama.cpp's `arch.name` graph computes (empty: it runs this model)."""
    out = _mismatches(cfg, arch.fixed)
    s = cfg.rope_scaling
    if s is not None and s.type not in arch.rope_scalings:
        out.append(f"rope_scaling.type={s.type!r} (needs one of {', '.join(arch.rope_scalings)})")
    if s is not None and s.type == "yarn" and arch.name != "deepseek2" and (
            s.attention_factor is not None or s.mscale is not None or (s.beta_fast, s.beta_slow) != (32.0, 1.0)):
        out.append("rope_scaling yarn with a custom attention_factor/mscale/betas (llama.cpp uses the defaults)")
    if cfg.rope_local_scaling is not None:
        out.append("rope_local_scaling (llama.cpp's local layers have no scaling)")
    n = cfg.n_layers
    if arch.name == "gemma2":
        want = tuple(i for i in range(n) if i % 2 == 0)  # llama.cpp: even layers slide
        if cfg.sliding_window is not None and _windowed(cfg) != want:
            out.append(f"sliding_window_layers={_windowed(cfg)} (llama.cpp's gemma2 slides on {want})")
    if arch.name == "gemma3":
        want = tuple(i for i in range(n) if (i + 1) % 6)  # llama.cpp: five sliding layers, then a global one
        if cfg.sliding_window is None or _windowed(cfg) != want:
            out.append(f"sliding_window_layers={_windowed(cfg)} (llama.cpp's gemma3 slides on {want})")
        if cfg.sliding_window is not None and (cfg.rope_local_theta or cfg.rope_theta) != 10000.0:
            out.append(f"rope_local_theta={cfg.rope_local_theta!r} (llama.cpp's gemma3 uses 10000)")
    if arch.name in ("gemma2", "gemma3"):  # llama.cpp scales q.k by head_dim**-0.5 (27B sizes: (d/heads)**-0.5)
        big = n == (46 if arch.name == "gemma2" else 62)
        want = (cfg.d_model // cfg.n_heads if big else cfg.dim_per_head) ** -0.5
        if abs(cfg.softmax_scale - want) > 1e-6 * want:
            out.append(f"attn_scale={cfg.attn_scale!r} (llama.cpp's {arch.name} uses {want:.6g})")
    if arch.name == "smollm3":
        want = tuple(i for i in range(n) if (i + 1) % 4 == 0)
        if cfg.nope_layers != want:
            out.append(f"nope_layers={cfg.nope_layers} (llama.cpp's smollm3 skips RoPE on {want})")
    if arch.name in ("llama", "qwen2", "qwen2moe", "smollm3") and cfg.sliding_window_layers is not None:
        out.append("sliding_window_layers (llama.cpp's graph has no per-layer windows here)")
    if arch.check is not None:
        out += arch.check(cfg)
    elif arch.moe is not None:
        out += _moe_problems(cfg, arch)
    return out


def _windowed(cfg) -> tuple[int, ...]:
    return tuple(i for i in range(cfg.n_layers) if cfg.layer_window(i) is not None)


def _moe_problems(cfg, arch: Arch) -> list[str]:
    if arch.moe == "sigmoid":  # llama.cpp's glm4moe: sigmoid scores + selection bias, leading dense layers
        out = _mismatches(cfg, dict(moe_router="sigmoid", moe_groups=1, moe_score_bias=True, moe_router_bias=False,
                                    moe_scale_input=False, moe_expert_bias=False, moe_shared_gate=False))
        out += _dense_and_shared_problems(cfg, "glm4moe")
        if cfg.qk_norm == "proj":
            out.append("qk_norm='proj' (llama.cpp's glm4moe normalizes per head)")
        return out
    want = dict(moe_router="softmax", moe_groups=1, moe_score_bias=False, moe_routed_scale=1.0, moe_router_bias=False,
                moe_scale_input=False, moe_expert_bias=False, moe_dense_layers=(),
                moe_norm_topk=arch.moe == "plain", moe_shared_gate=arch.moe == "shared")
    out = _mismatches(cfg, want)
    if (cfg.moe_shared_d_ff > 0) != (arch.moe == "shared"):
        out.append(f"moe_shared_d_ff={cfg.moe_shared_d_ff} ({'needs' if arch.moe == 'shared' else 'no'} "
                   "shared expert)")
    return out


def gguf_arch(cfg) -> Arch:
    """The llama.cpp architecture that computes this model; ConfigError naming every mismatch otherwise."""
    arch = ARCHS.get(cfg.arch)
    if arch is None:
        names = sorted({a.name for a in ARCHS.values()})
        raise ConfigError(f"GGUF export has no llama.cpp architecture for {cfg.arch}; it writes "
                          f"{', '.join(names)} (from {', '.join(sorted(ARCHS))})")
    problems = _problems(cfg, arch)
    if problems:
        raise ConfigError(f"GGUF export writes llama.cpp's '{arch.name}' architecture for {cfg.arch}; this model has "
                          f"{', '.join(problems)}")
    return arch


# ---------------------------------------------------------------------------------------------------------------
# Tensors: native modules -> llama.cpp names and layouts
# ---------------------------------------------------------------------------------------------------------------


def _wb(prefix: str, module) -> Iterator[tuple[str, torch.Tensor]]:
    """(gguf name, tensor) for a module's weight and bias (a quantized linear gives its dequantized weight)."""
    if module is None:
        return
    for p in ("weight", "bias"):
        t = getattr(module, p, None)
        if isinstance(t, torch.Tensor):
            yield f"{prefix}.{p}", t.detach()


def _cat(*mods) -> Iterator[tuple[str, torch.Tensor]]:
    """Weights (and biases) of several linears concatenated along the outputs (fused tensors)."""
    for p in ("weight", "bias"):
        parts = [getattr(m, p, None) for m in mods]
        if all(isinstance(t, torch.Tensor) for t in parts):
            yield p, torch.cat([t.detach() for t in parts])


def _tensors(model: Transformer, arch: Arch) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight under its llama.cpp name, in llama.cpp's layout (before the type conversion)."""
    cfg = model.cfg
    yield from _wb("token_embd", model.embed)
    if model.pos_embed is not None:
        yield from _wb("position_embd", model.pos_embed)
    yield from _wb("token_embd_norm", model.embed_norm)
    for i, block in enumerate(model.layers):
        blk, a, m = f"blk.{i}", block.attn, block.mlp
        yield from _wb(f"{blk}.attn_norm", block.attn_norm)
        if cfg.attention == "mla":
            yield from _mla_tensors(blk, a, cfg)
        elif arch.fused_qkv:
            for p, t in _cat(a.q_proj, a.k_proj, a.v_proj):
                yield f"{blk}.attn_qkv.{p}", t
        else:
            for name, proj, heads in (("attn_q", a.q_proj, cfg.n_heads), ("attn_k", a.k_proj, cfg.kv_heads),
                                      ("attn_v", a.v_proj, None)):
                for gname, t in _wb(f"{blk}.{name}", proj):
                    yield gname, permute_rope_rows(t, heads) if arch.permute_qk and heads else t
        yield from _wb(f"{blk}.attn_output", a.o_proj)
        yield from _wb(f"{blk}.attn_q_norm", getattr(a, "q_norm", None))
        yield from _wb(f"{blk}.attn_k_norm", getattr(a, "k_norm", None))
        yield from _wb(f"{blk}.post_attention_norm", block.attn_post_norm)
        yield from _wb(f"{blk}.{arch.ffn_norm}", block.mlp_norm)
        if getattr(a, "sinks", None) is not None:  # gpt-oss: one logit per head
            yield f"{blk}.attn_sinks.weight", a.sinks.detach()
        if cfg.is_moe_layer(i):
            yield from _wb(f"{blk}.ffn_gate_inp", m.router)
            if getattr(m.router, "score_bias", None) is not None:  # the selection-only bias
                yield f"{blk}.exp_probs_b.bias", m.router.score_bias.detach()
            for proj in ("gate", "up", "down"):  # (n_experts, out, in); biases (n_experts, out): gpt-oss
                for p in ("weight", "bias"):
                    parts = [getattr(getattr(e, f"{proj}_proj"), p, None) for e in m.experts]
                    if isinstance(parts[0], torch.Tensor):
                        yield f"{blk}.ffn_{proj}_exps.{p}", torch.stack([t.detach() for t in parts])
            if m.shared_expert is not None:
                for proj in ("gate", "up", "down"):
                    yield from _wb(f"{blk}.ffn_{proj}_shexp", getattr(m.shared_expert, f"{proj}_proj"))
            if m.shared_expert_gate is not None:
                yield f"{blk}.ffn_gate_inp_shexp.weight", m.shared_expert_gate.weight.detach().reshape(-1)
        elif arch.fused_gate_up:
            for p, t in _cat(m.gate_proj, m.up_proj):
                yield f"{blk}.ffn_up.{p}", t
            yield from _wb(f"{blk}.ffn_down", m.down_proj)
        else:
            yield from _wb(f"{blk}.ffn_gate", getattr(m, "gate_proj", None))
            yield from _wb(f"{blk}.ffn_up", m.up_proj)
            yield from _wb(f"{blk}.ffn_down", m.down_proj)
        yield from _wb(f"{blk}.post_ffw_norm", block.mlp_post_norm)
    yield from _wb("output_norm", model.norm)
    yield from _wb("output", model.lm_head)


def _mla_tensors(blk: str, a, cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """DeepSeek's latent attention as llama.cpp's deepseek2 loads it: q (or q_a, its norm, q_b), kv_a_mqa and its norm,
    and kv_b split per head into attn_k_b (H, kv_rank, nope), transposed for the absorbed query, and attn_v_b
    (H, v, kv_rank). llama.cpp rotates adjacent pairs; a half-split model has its rotated rows permuted to match."""
    H, nope, rd, r = cfg.n_heads, cfg.mla_nope_dim, cfg.mla_rope_dim, cfg.mla_kv_rank

    def pairs(w: torch.Tensor, groups: int, width: int) -> torch.Tensor:
        """The last `rd` of every `width` rows in adjacent-pair order (a no-op when the model already is)."""
        if cfg.rope_interleaved:
            return w
        w = w.reshape(groups, width, -1).clone()
        w[:, width - rd:] = torch.stack([permute_rope_rows(g[width - rd:], 1) for g in w])
        return w.reshape(groups * width, -1)

    if cfg.mla_q_rank:
        yield f"{blk}.attn_q_a.weight", a.q_a_proj.weight.detach()
        yield f"{blk}.attn_q_a_norm.weight", a.q_a_norm.weight.detach()
        yield f"{blk}.attn_q_b.weight", pairs(a.q_b_proj.weight.detach(), H, nope + rd)
    else:
        yield f"{blk}.attn_q.weight", pairs(a.q_proj.weight.detach(), H, nope + rd)
    yield f"{blk}.attn_kv_a_mqa.weight", pairs(a.kv_a_proj_with_mqa.weight.detach(), 1, r + rd)
    yield f"{blk}.attn_kv_a_norm.weight", a.kv_a_norm.weight.detach()
    kv_b = a.kv_b_proj.weight.detach().reshape(H, nope + cfg.mla_v_dim, r)
    yield f"{blk}.attn_k_b.weight", kv_b[:, :nope].transpose(1, 2).contiguous()
    yield f"{blk}.attn_v_b.weight", kv_b[:, nope:].contiguous()


def _check_names(names: list[str], arch: Arch) -> None:
    """Every tensor name must be one llama.cpp's `arch` loads (gguf.MODEL_TENSORS), else the file would not load."""
    import re

    gguf = _gguf()
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[next(a for a, n in gguf.MODEL_ARCH_NAMES.items()
                                                                   if n == arch.name)]}
    for name in names:
        base = re.sub(r"^blk\.\d+\.", "blk.{bid}.", name.rsplit(".", 1)[0])
        if base not in known:
            raise ConfigError(f"GGUF export: tensor '{name}' is not one llama.cpp's '{arch.name}' architecture "
                              "loads; this model variant cannot be exported")


# ---------------------------------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------------------------------

_F32_ALWAYS = ("ffn_gate_inp", "position_embd", "token_embd_norm")  # kept f32 as llama.cpp's converter does
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's _M recipe: the first and last eighth of the layers, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _type_for(name: str, shape: tuple[int, ...], qtype: str, n_layers: int, has_output: bool) -> str:
    """The GGML type name of one tensor in a file of `qtype`, as llama.cpp's quantizer picks it."""
    kind = name.rsplit(".", 1)[0].split(".")[-1]
    if len(shape) == 1 or kind in _F32_ALWAYS or qtype == "f32" or name.endswith(".bias"):  # (gpt-oss: 2-D biases)
        return "F32"
    if qtype in ("f16", "bf16"):
        return qtype.upper()
    if kind == "output" or (kind == "token_embd" and not has_output):
        t = "Q8_0" if qtype == "q8_0" else "Q6_K"  # the output layer keeps more bits in every quantized type
    elif qtype.startswith(("q4_k", "q5_k", "q6_k")):
        base = {"q4": "Q4_K", "q5": "Q5_K", "q6": "Q6_K"}[qtype[:2]]
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        if qtype.endswith("_m") and kind in ("attn_v", "ffn_down", "ffn_down_exps") and \
                _use_more_bits(layer, n_layers):
            t = "Q6_K"
        elif qtype == "q4_k_m" and kind == "attn_qkv":
            t = "Q5_K"
        else:
            t = base
    else:
        t = qtype.upper()
    if t in _K_FALLBACK and shape[-1] % 256:
        t = _K_FALLBACK[t]
    return t if shape[-1] % 32 == 0 else "F16"  # rows that do not fill whole blocks stay f16, as llama.cpp does


def _layout(shape: tuple[int, ...], type_name: str) -> tuple[tuple[int, ...], np.dtype, int, object]:
    """(shape as the writer takes it, numpy dtype, bytes, raw GGML type or None) of a tensor stored as `type_name`."""
    gguf = _gguf()
    if type_name in ("F32", "F16"):
        dtype = np.dtype(np.float32 if type_name == "F32" else np.float16)
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize, None
    kind = gguf.GGMLQuantizationType[type_name]
    byte_shape = tuple(gguf.quant_shape_to_byte_shape(shape, kind))
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), kind


def _encode(arr: np.ndarray, type_name: str):
    """(data, raw_dtype or None) for the gguf writer."""
    gguf = _gguf()
    from . import kquants

    if type_name == "F32":
        return arr.astype(np.float32), None
    if type_name == "F16":
        return arr.astype(np.float16), None
    kind = gguf.GGMLQuantizationType[type_name]
    quantize = {"Q4_K": kquants.quantize_q4_k, "Q5_K": kquants.quantize_q5_k, "Q6_K": kquants.quantize_q6_k}.get(
        type_name, lambda a: gguf.quants.quantize(a, kind))
    return quantize(np.ascontiguousarray(arr, dtype=np.float32)), kind


# ---------------------------------------------------------------------------------------------------------------
# Metadata and the file
# ---------------------------------------------------------------------------------------------------------------


def _hparams(w, cfg, arch: Arch) -> None:
    gguf = _gguf()
    if arch.name == "deepseek2":
        return _deepseek2_hparams(w, cfg)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_key_length(cfg.dim_per_head)
    w.add_value_length(cfg.dim_per_head)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.norm == "rms":
        w.add_layer_norm_rms_eps(cfg.norm_eps)
    else:
        w.add_layer_norm_eps(cfg.norm_eps)
    if cfg.pos == "rope":
        w.add_rope_dimension_count(cfg.rotary_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        s = cfg.rope_scaling
        if s is not None and s.type == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(s.factor)
        elif s is not None and s.type == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(s.factor or cfg.max_seq_len / s.original_max_seq_len)
            w.add_rope_scaling_orig_ctx_len(s.original_max_seq_len)
    if arch.window and cfg.sliding_window is not None:
        w.add_sliding_window(cfg.sliding_window)
    if cfg.attn_logit_softcap is not None:
        w.add_attn_logit_softcapping(cfg.attn_logit_softcap)
    if cfg.final_logit_softcap is not None:
        w.add_final_logit_softcapping(cfg.final_logit_softcap)
    if arch.moe is not None:
        w.add_expert_count(cfg.moe_experts)
        w.add_expert_used_count(cfg.moe_top_k)
        if arch.name != "llama":
            w.add_expert_feed_forward_length(cfg.expert_d_ff)
        if cfg.moe_shared_d_ff and arch.moe != "sigmoid":
            w.add_expert_shared_feed_forward_length(cfg.moe_shared_d_ff)
        if arch.moe == "sigmoid":
            _sigmoid_moe_hparams(w, cfg)
            w.add_nextn_predict_layers(0)
    if arch.name == "llama4":
        w.add_interleave_moe_layer_step(_llama4_moe_step(cfg))


def _sigmoid_moe_hparams(w, cfg) -> None:
    """The keys of llama.cpp's DeepSeek-style MoE (glm4moe, deepseek2): leading dense layers, shared experts,
    routed scale, top-k renormalization and the sigmoid gate."""
    w.add_leading_dense_block_count(len(cfg.moe_dense_layers))
    w.add_expert_shared_count(cfg.moe_shared_d_ff // cfg.expert_d_ff)
    w.add_expert_weights_scale(cfg.moe_routed_scale)
    w.add_expert_weights_norm(cfg.moe_norm_topk)
    w.add_expert_gating_func(_gguf().ExpertGatingFuncType.SIGMOID)


def _deepseek2_hparams(w, cfg) -> None:
    """llama.cpp's deepseek2 keys: MLA runs as one shared key/value head of the latent (key_length kv_rank + rope,
    value_length kv_rank), the per-head sizes are key/value_length_mla; q_lora_rank 0 selects a plain attn_q."""
    gguf = _gguf()
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(1)
    w.add_key_length(cfg.mla_kv_rank + cfg.mla_rope_dim)
    w.add_value_length(cfg.mla_kv_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.mla_v_dim)
    w.add_q_lora_rank(cfg.mla_q_rank)
    w.add_kv_lora_rank(cfg.mla_kv_rank)
    w.add_vocab_size(cfg.vocab_size)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.mla_rope_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    s = cfg.rope_scaling
    if s is not None:  # yarn (checked): q.k times mscale(factor, mscale_all_dim)^2, written as 0.1 * mscale_all_dim
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(s.factor or cfg.max_seq_len / s.original_max_seq_len)
        w.add_rope_scaling_orig_ctx_len(s.original_max_seq_len)
        w.add_rope_scaling_yarn_log_mul(0.1 * s.mscale_all_dim)
    w.add_expert_count(cfg.moe_experts)
    w.add_expert_used_count(cfg.moe_top_k)
    w.add_expert_feed_forward_length(cfg.expert_d_ff)
    _sigmoid_moe_hparams(w, cfg)
    if 1 < cfg.moe_groups and cfg.moe_topk_groups < cfg.moe_groups:  # all groups kept: no grouping at all
        w.add_expert_group_count(cfg.moe_groups)
        w.add_expert_group_used_count(cfg.moe_topk_groups)


def _load(src: Path):
    """The model of a checkpoint in its own dtype; a quantized one (lmforge, GPTQ, AWQ) keeps its quantized layers,
    whose `weight` is the dequantized matrix the export reads."""
    from ..models.hf import load_hf

    return load_hf(src, progress=False)


@torch.no_grad()
def export_gguf(model: Transformer | str | Path, out_file: str | Path, tokenizer_dir: str | Path | None = None,
                qtype: str = "q8_0", name: str | None = None, *, tokenizer=None,
                pre_tokenizer: str | None = None) -> Path:
    """Write `model` (a Transformer, or an HF / .gguf / quantized checkpoint) to a GGUF file llama.cpp runs.

    The vocabulary comes from `tokenizer` (an lmforge Tokenizer), else `tokenizer_dir` (a checkpoint directory or
    .gguf file; default: the checkpoint itself); without one the file has no vocabulary and llama.cpp cannot run it.
    `pre_tokenizer` overrides the detected ``tokenizer.ggml.pre`` name. The file appears complete or not at all."""
    gguf = _gguf()
    qtype = qtype.lower()
    if qtype not in GGUF_TYPES:
        raise ConfigError(f"gguf type '{qtype}' is not supported; use one of {', '.join(GGUF_TYPES)}")
    if not isinstance(model, Transformer):
        src = Path(model)
        tokenizer_dir = tokenizer_dir or src
        model = _load(src)
        name = name or src.stem
    cfg = model.cfg
    arch = gguf_arch(cfg)
    s = cfg.rope_scaling
    if s is not None and s.type == "yarn" and not s.truncate:  # transformers' truncate=false (gpt-oss as released)
        log.warning("rope_scaling.truncate=False: llama.cpp rounds YaRN's correction range to whole dims, so a few "
                    "rotary frequencies differ from this model's (gpt-oss-20b: 9 of 32, by up to 43%%); llama.cpp's "
                    "own gpt-oss files run the same way. Written anyway; logits will not match lmforge's exactly")
    if tokenizer is None and tokenizer_dir is not None:
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(tokenizer_dir)

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        if cfg.pos == "rope" and cfg.rope_scaling is not None and cfg.rope_scaling.type == "llama3":
            base = rope_inv_freq(cfg.model_copy(update={"rope_scaling": None}))
            yield "rope_freqs.weight", base / rope_inv_freq(cfg)  # per-frequency divisors
        yield from _tensors(model, arch)

    # pass 1, before a byte is written: names checked, each tensor's type and size (a one-tensor-at-a-time pass 2
    # then quantizes and writes, so the file is never held in memory whole)
    plan = [(n, tuple(t.shape)) for n, t in weights()]
    _check_names([n for n, _ in plan], arch)
    has_output = any(n == "output.weight" for n, _ in plan)
    types = {n: _type_for(n, shape, qtype, cfg.n_layers, has_output) for n, shape in plan}

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    try:  # written to a temporary name, renamed when complete: a failure or a kill leaves no half-written file
        w = gguf.GGUFWriter(str(tmp), arch.name)
        w.add_name(name or "lmforge-model")
        w.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[qtype]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hparams(w, cfg, arch)
        if tokenizer is not None:
            from .gguf_vocab import write_vocab

            write_vocab(w, tokenizer, cfg.vocab_size, pre_tokenizer)
        for tname, shape in plan:
            w.add_tensor_info(tname, *_layout(shape, types[tname]))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for tname, t in weights():
            arr = t.float().cpu().numpy()
            if arch.norm_offset and tname.endswith("norm.weight"):
                arr = arr + cfg.norm_weight_offset  # llama.cpp multiplies by the stored weight: store offset + w
            if not np.isfinite(arr).all():
                raise ConfigError(f"GGUF export: tensor '{tname}' has non-finite values; the model is broken, not "
                                  "saved")
            w.write_tensor_data(_encode(arr, types[tname])[0])
        w.close()
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file
