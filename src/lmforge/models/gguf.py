"""Read llama.cpp GGUF files as Hugging Face checkpoints: an HF config dict from the metadata, HF-named tensors.

A GGUF file holds the hyper-parameters as ``{arch}.*`` metadata keys and the weights under llama.cpp names
(``token_embd``, ``blk.N.attn_q`` ...), quantized or not. Rather than a second loader, this module translates both
into what the HF converter registry already reads: ``hf_config(path)`` builds the ``config.json`` dict of the
equivalent transformers architecture, and ``hf_tensors(path, hf)`` yields ``(hf_name, tensor)`` pairs, each tensor
dequantized (``gguf.quants.dequantize``: F32/F16/BF16, Q8_0, Q4_0/Q4_1/Q5_x, the K-quants, the IQ types) on its own,
so a model never sits in memory twice. ``load_hf`` then builds the model through the family's converter as for a
safetensors checkpoint.

What llama.cpp's converter changed on the way in is undone here: Llama's (and SmolLM3's) q/k rows are permuted to
the adjacent-pair RoPE layout (unpermuted per head), Gemma's (1/2/3) RMSNorm weights are stored as 1 + w (1 is
subtracted; Gemma 2/3's ``ffn_norm`` is HF's pre-feed-forward norm), MoE experts are stacked into one 3-D tensor
per projection (split per expert, or gate|up fused as Llama 4's HF checkpoints stack them), GPT-2's Conv1D weights
are stored as Linears (transposed back), BLOOM's per-head q|k|v is stored as q|k|v (regrouped per head), ChatGLM's fused q|k|v is one ``attn_qkv`` (split
by the head counts), DeepSeek's
kv_b_proj is split per head into attn_k_b (transposed) / attn_v_b (merged back), and
Llama-3 RoPE scaling is a ``rope_freqs`` tensor of per-frequency divisors (turned back into the ``llama3``
rope_scaling parameters that reproduce it).
"""
from __future__ import annotations

import functools
import math
import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

__all__ = ["GGUF_ARCHS", "is_gguf", "hf_config", "hf_tensors", "read_metadata", "permute_rope_rows",
           "unpermute_rope_rows"]


def is_gguf(path: str | Path) -> bool:
    """True for an existing file named *.gguf (what every command that takes a checkpoint directory also takes)."""
    p = Path(path)
    return p.suffix.lower() == ".gguf" and p.is_file()


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_heads * d, ...) rows in half-split order -> adjacent-pair order, per head (what llama.cpp rotates)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_rope_rows`: llama.cpp's adjacent-pair rows back to the half-split order HF stores."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------------------
# The mapping table: llama.cpp tensor names -> HF names ("{i}" block, "{e}" expert, "{p}" weight|bias). Families
# share the Llama layout and override what differs; "{e}" entries are stacked expert tensors split on the way.
# ---------------------------------------------------------------------------------------------------------------

LLAMA_CPP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.{p}": "model.layers.{i}.self_attn.q_proj.{p}",
    "blk.{i}.attn_k.{p}": "model.layers.{i}.self_attn.k_proj.{p}",
    "blk.{i}.attn_v.{p}": "model.layers.{i}.self_attn.v_proj.{p}",
    "blk.{i}.attn_output.{p}": "model.layers.{i}.self_attn.o_proj.{p}",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.{p}": "model.layers.{i}.mlp.gate_proj.{p}",
    "blk.{i}.ffn_up.{p}": "model.layers.{i}.mlp.up_proj.{p}",
    "blk.{i}.ffn_down.{p}": "model.layers.{i}.mlp.down_proj.{p}",
}

_MIXTRAL_NAMES = {
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
    "blk.{i}.ffn_gate_exps.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
    "blk.{i}.ffn_down_exps.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
    "blk.{i}.ffn_up_exps.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
}

_QWEN_MOE_NAMES = {
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.mlp.gate.weight",
    **{f"blk.{{i}}.ffn_{n}_exps.weight": f"model.layers.{{i}}.mlp.experts.{{e}}.{n}_proj.weight"
       for n in ("gate", "up", "down")},
    **{f"blk.{{i}}.ffn_{n}_shexp.weight": f"model.layers.{{i}}.mlp.shared_expert.{n}_proj.weight"
       for n in ("gate", "up", "down")},
    "blk.{i}.ffn_gate_inp_shexp.weight": "model.layers.{i}.mlp.shared_expert_gate.weight",
}

_QWEN3_MOE_NAMES = {
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.mlp.gate.weight",
    **{f"blk.{{i}}.ffn_{n}_exps.weight": f"model.layers.{{i}}.mlp.experts.{{e}}.{n}_proj.weight"
       for n in ("gate", "up", "down")},
}

# GLM-4.5 (llama.cpp's glm4moe): post_attention_norm is the pre-MLP norm; sigmoid router with a selection bias
_GLM4_MOE_NAMES = {
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.mlp.gate.weight",
    "blk.{i}.exp_probs_b.bias": "model.layers.{i}.mlp.gate.e_score_correction_bias",
    **{f"blk.{{i}}.ffn_{n}_exps.weight": f"model.layers.{{i}}.mlp.experts.{{e}}.{n}_proj.weight"
       for n in ("gate", "up", "down")},
    **{f"blk.{{i}}.ffn_{n}_shexp.weight": f"model.layers.{{i}}.mlp.shared_experts.{n}_proj.weight"
       for n in ("gate", "up", "down")},
}

# DeepSeek-V3 (llama.cpp's deepseek2): MLA projections and latent norms, the GLM-4.5-style sigmoid MoE; newer files
# hold kv_b_proj split per head as attn_k_b / attn_v_b (merged back by `_merge_kv_b`), older ones whole as attn_kv_b
_DEEPSEEK2_NAMES = {
    **{f"blk.{{i}}.attn_{g}.weight": f"model.layers.{{i}}.self_attn.{h}.weight"
       for g, h in (("q_a", "q_a_proj"), ("q_b", "q_b_proj"), ("kv_a_mqa", "kv_a_proj_with_mqa"), ("kv_b", "kv_b_proj"),
                    ("q_a_norm", "q_a_layernorm"), ("kv_a_norm", "kv_a_layernorm"))},
    **{k: v for k, v in _GLM4_MOE_NAMES.items() if "post_attention_norm" not in k},
}

# sandwich norms (Gemma 2/3): llama.cpp's ffn_norm is HF's pre-feed-forward norm there
_GEMMA2_NAMES = {
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}

# one fused attn_qkv split into HF's q/k/v_proj ({part}: q, k, v) by `GgufArch.split_qkv`
_QKV_SPLIT = {"blk.{i}.attn_qkv.{p}": "model.layers.{i}.self_attn.{part}_proj.{p}"}

# GLM-4-0414 (llama.cpp's glm4): sandwich norms; ffn_norm stays HF's post_attention_layernorm (the pre-MLP norm)
_GLM4_NAMES = {
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_self_attn_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_mlp_layernorm.weight",
    "blk.{i}.ffn_up.{p}": "model.layers.{i}.mlp.gate_up_proj.{p}",
}

# OLMo 2 normalizes after attention and the MLP only (no attn_norm / ffn_norm)
_OLMO2_NAMES = {
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}

# Phi-2: LayerNorms with biases, a parallel block (one norm), gelu MLP fc1/fc2, a biased head
_PHI2_NAMES = {
    "blk.{i}.attn_norm.{p}": "model.layers.{i}.input_layernorm.{p}",
    "blk.{i}.attn_output.{p}": "model.layers.{i}.self_attn.dense.{p}",
    "blk.{i}.ffn_up.{p}": "model.layers.{i}.mlp.fc1.{p}",
    "blk.{i}.ffn_down.{p}": "model.layers.{i}.mlp.fc2.{p}",
    "output_norm.{p}": "model.final_layernorm.{p}",
    "output.{p}": "lm_head.{p}",
}

# GPT-2: learned positions, biased LayerNorms, fused qkv; its HF linears are Conv1D (stored transposed)
_GPT2_NAMES = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "blk.{i}.attn_norm.{p}": "transformer.h.{i}.ln_1.{p}",
    "blk.{i}.attn_qkv.{p}": "transformer.h.{i}.attn.c_attn.{p}",
    "blk.{i}.attn_output.{p}": "transformer.h.{i}.attn.c_proj.{p}",
    "blk.{i}.ffn_norm.{p}": "transformer.h.{i}.ln_2.{p}",
    "blk.{i}.ffn_up.{p}": "transformer.h.{i}.mlp.c_fc.{p}",
    "blk.{i}.ffn_down.{p}": "transformer.h.{i}.mlp.c_proj.{p}",
    "output_norm.{p}": "transformer.ln_f.{p}",
}

# BLOOM: ALiBi, a LayerNorm on the embeddings, fused qkv (HF groups it per head)
_BLOOM_NAMES = {
    "token_embd.weight": "transformer.word_embeddings.weight",
    "token_embd_norm.{p}": "transformer.word_embeddings_layernorm.{p}",
    "blk.{i}.attn_norm.{p}": "transformer.h.{i}.input_layernorm.{p}",
    "blk.{i}.attn_qkv.{p}": "transformer.h.{i}.self_attention.query_key_value.{p}",
    "blk.{i}.attn_output.{p}": "transformer.h.{i}.self_attention.dense.{p}",
    "blk.{i}.ffn_norm.{p}": "transformer.h.{i}.post_attention_layernorm.{p}",
    "blk.{i}.ffn_up.{p}": "transformer.h.{i}.mlp.dense_h_to_4h.{p}",
    "blk.{i}.ffn_down.{p}": "transformer.h.{i}.mlp.dense_4h_to_h.{p}",
    "output_norm.{p}": "transformer.ln_f.{p}",
}

_PHI3_NAMES = {
    "blk.{i}.attn_qkv.{p}": "model.layers.{i}.self_attn.qkv_proj.{p}",
    "blk.{i}.ffn_up.{p}": "model.layers.{i}.mlp.gate_up_proj.{p}",  # llama.cpp keeps Phi-3's fused gate|up
}

# Llama 4 and gpt-oss stack their experts in HF too: gate|up fused along the outputs of an x @ W tensor (E, d, 2f),
# down as (E, f, d). `GgufArch.fused_experts` says how gate and up combine; both llama.cpp tensors map to one name.
_FF4 = "model.layers.{i}.feed_forward"
_LLAMA4_NAMES = {
    **{f"blk.{{i}}.ffn_{n}.weight": f"{_FF4}.{n}_proj.weight" for n in ("gate", "up", "down")},
    "blk.{i}.ffn_gate_inp.weight": f"{_FF4}.router.weight",
    **{f"blk.{{i}}.ffn_{n}_shexp.weight": f"{_FF4}.shared_expert.{n}_proj.weight" for n in ("gate", "up", "down")},
    "blk.{i}.ffn_gate_exps.weight": f"{_FF4}.experts.gate_up_proj",
    "blk.{i}.ffn_up_exps.weight": f"{_FF4}.experts.gate_up_proj",
    "blk.{i}.ffn_down_exps.weight": f"{_FF4}.experts.down_proj",
}

_MOE_OSS = "model.layers.{i}.mlp"
_GPT_OSS_NAMES = {
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_sinks.weight": "model.layers.{i}.self_attn.sinks",
    "blk.{i}.ffn_gate_inp.{p}": f"{_MOE_OSS}.router.{{p}}",
    **{f"blk.{{i}}.ffn_{n}_exps.weight": f"{_MOE_OSS}.experts.{h}" for n, h in
       (("gate", "gate_up_proj"), ("up", "gate_up_proj"), ("down", "down_proj"))},
    **{f"blk.{{i}}.ffn_{n}_exps.bias": f"{_MOE_OSS}.experts.{h}_bias" for n, h in
       (("gate", "gate_up_proj"), ("up", "gate_up_proj"), ("down", "down_proj"))},
}


@dataclass(frozen=True)
class GgufArch:
    """How one llama.cpp `general.architecture` maps onto a transformers architecture (and so onto a converter).

    `permute_qk`: llama.cpp's converter permuted q/k rows to its RoPE layout (Llama); `norm_offset`: it stored RMSNorm
    weights as offset + w (Gemma); `moe`: the HF architecture and name overrides used when the file has experts;
    `extra`: family-specific config keys from the metadata.
    """

    hf_arch: str
    model_type: str
    names: dict = field(default_factory=dict)
    permute_qk: bool = False
    norm_offset: float = 0.0
    moe: tuple[str, str, dict] | None = None  # (hf_arch, model_type, names) when {arch}.expert_count > 0
    extra: dict = field(default_factory=dict)  # fixed HF config keys
    conv1d: bool = False  # HF stores the block's linears as Conv1D (in, out): GPT-2
    qkv_heads: bool = False  # llama.cpp's attn_qkv is q|k|v; HF's is grouped per head [head, q|k|v, head_dim]: BLOOM
    split_qkv: bool = False  # llama.cpp's attn_qkv (q|k|v rows) split into HF's q/k/v_proj: ChatGLM / GLM-4 files
    fused_experts: str | None = None  # HF stacks the experts, gate|up fused: "cat" (Llama 4), "interleaved" (gpt-oss)


GGUF_ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch("LlamaForCausalLM", "llama", permute_qk=True,
                      moe=("MixtralForCausalLM", "mixtral", _MIXTRAL_NAMES)),
    "qwen2": GgufArch("Qwen2ForCausalLM", "qwen2"),
    "qwen2moe": GgufArch("Qwen2MoeForCausalLM", "qwen2_moe", moe=("Qwen2MoeForCausalLM", "qwen2_moe", _QWEN_MOE_NAMES)),
    "qwen3": GgufArch("Qwen3ForCausalLM", "qwen3"),
    "gemma": GgufArch("GemmaForCausalLM", "gemma", norm_offset=1.0,
                      extra={"hidden_activation": "gelu_pytorch_tanh"}),
    "qwen3moe": GgufArch("Qwen3MoeForCausalLM", "qwen3_moe",
                         moe=("Qwen3MoeForCausalLM", "qwen3_moe", _QWEN3_MOE_NAMES)),
    "gemma2": GgufArch("Gemma2ForCausalLM", "gemma2", names=_GEMMA2_NAMES, norm_offset=1.0,
                       extra={"hidden_activation": "gelu_pytorch_tanh"}),
    "gemma3": GgufArch("Gemma3ForCausalLM", "gemma3_text", names=_GEMMA2_NAMES, norm_offset=1.0,
                       extra={"hidden_activation": "gelu_pytorch_tanh", "sliding_window_pattern": 6,
                              "rope_local_base_freq": 10000.0}),  # llama.cpp's gemma3: 5 local : 1 global, 10k
    "olmo2": GgufArch("Olmo2ForCausalLM", "olmo2", names=_OLMO2_NAMES),
    "smollm3": GgufArch("SmolLM3ForCausalLM", "smollm3", permute_qk=True,
                        extra={"no_rope_layer_interval": 4}),  # llama.cpp's smollm3: NoPE on every 4th layer
    "phi2": GgufArch("PhiForCausalLM", "phi", names=_PHI2_NAMES, extra={"hidden_act": "gelu_new"}),
    "phi3": GgufArch("Phi3ForCausalLM", "phi3", names=_PHI3_NAMES),
    "gpt2": GgufArch("GPT2LMHeadModel", "gpt2", names=_GPT2_NAMES, conv1d=True,
                     extra={"activation_function": "gelu_new", "scale_attn_weights": True}),
    "bloom": GgufArch("BloomForCausalLM", "bloom", names=_BLOOM_NAMES, qkv_heads=True),
    "glm4moe": GgufArch("Glm4MoeForCausalLM", "glm4_moe", names=_GLM4_MOE_NAMES,
                        moe=("Glm4MoeForCausalLM", "glm4_moe", _GLM4_MOE_NAMES)),
    "deepseek2": GgufArch("DeepseekV3ForCausalLM", "deepseek_v3", names=_DEEPSEEK2_NAMES,
                          moe=("DeepseekV3ForCausalLM", "deepseek_v3", _DEEPSEEK2_NAMES)),
    # GLM-4 and ChatGLM: separate q/k/v (HF's GLM-4, lmforge's export) or one attn_qkv (llama.cpp's converter on
    # ChatGLM2/3 and the custom-code GLM-4-9B), fused gate|up; half the head dims rotate in adjacent pairs
    "chatglm": GgufArch("GlmForCausalLM", "glm", names={**_QKV_SPLIT, "blk.{i}.ffn_up.{p}":
                                                        "model.layers.{i}.mlp.gate_up_proj.{p}"}, split_qkv=True),
    "glm4": GgufArch("Glm4ForCausalLM", "glm4", names={**_QKV_SPLIT, **_GLM4_NAMES}, split_qkv=True),
    "llama4": GgufArch("Llama4ForCausalLM", "llama4_text", names=_LLAMA4_NAMES, fused_experts="cat"),
    "gpt-oss": GgufArch("GptOssForCausalLM", "gpt_oss", names=_GPT_OSS_NAMES, fused_experts="interleaved"),
}


def _pattern(template: str) -> re.Pattern:
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(f"^{body}$")


@functools.lru_cache(maxsize=None)
def _compiled(arch: str, moe: bool) -> list[tuple[re.Pattern, str]]:
    spec = GGUF_ARCHS[arch]
    tables = [spec.moe[2] if moe and spec.moe else {}, spec.names, LLAMA_CPP_NAMES]  # the first match wins
    return [(_pattern(k), v) for names in tables for k, v in names.items()]


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading .gguf files needs the 'gguf' package: pip install gguf") from None
    return gguf


# value type id -> numpy dtype (GGUF spec; 7 bool, 8 string, 9 array are handled apart)
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
            12: "<f8"}
_STRUCT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass(frozen=True)
class GgufTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first (reverse of numpy/torch)
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray  # the raw bytes, (rows..., bytes per row), a view of the memory map


class GgufFile:
    """The metadata and tensor table of a GGUF file (v2/v3, little-endian); tensor bytes stay memory-mapped.

    `gguf.GGUFReader` builds a numpy view per array element, which takes seconds for a 50k-token vocabulary (tens of
    seconds for Llama 3's 128k tokens + 280k merges); this parses the same header with `struct` in well under one.
    """

    def __init__(self, path: str):
        gguf = _gguf()
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        m = self._map
        if m[:4] != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        self._off = 24
        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._str()
            self.fields[key] = self._val(self._u32())
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            (n_dims,) = struct.unpack_from("<I", m, self._off)
            dims = struct.unpack_from(f"<{n_dims}Q", m, self._off + 4)
            kind, offset = struct.unpack_from("<IQ", m, self._off + 4 + 8 * n_dims)
            self._off += 4 + 8 * n_dims + 12
            infos.append((name, dims, kind, offset))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._off // align) * align
        self.tensors: list[GgufTensor] = []
        for name, dims, kind, offset in infos:
            qtype = gguf.GGMLQuantizationType(kind)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            row_bytes = dims[0] // block * type_size
            rows = math.prod(dims[1:])
            data = np.frombuffer(m, dtype=np.uint8, count=rows * row_bytes, offset=start + offset)
            self.tensors.append(GgufTensor(name, tuple(dims), qtype, data.reshape(*reversed(dims[1:]), row_bytes)))

    def _u32(self) -> int:
        (v,) = struct.unpack_from("<I", self._map, self._off)
        self._off += 4
        return v

    def _str(self) -> str:
        (n,) = struct.unpack_from("<Q", self._map, self._off)
        s = self._map[self._off + 8:self._off + 8 + n].decode("utf-8", errors="replace")
        self._off += 8 + n
        return s

    def _val(self, kind: int):
        if kind == 8:
            return self._str()
        if kind == 9:
            item, (count,) = self._u32(), struct.unpack_from("<Q", self._map, self._off)
            self._off += 8
            if item == 8:
                return [self._str() for _ in range(count)]
            if item == 9:
                return [self._val(9) for _ in range(count)]
            dtype = np.dtype(_SCALARS[item])
            values = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._off)
            self._off += count * dtype.itemsize
            return values.astype(bool).tolist() if item == 7 else values.tolist()
        fmt = _STRUCT[kind]
        (v,) = struct.unpack_from(fmt, self._map, self._off)
        self._off += struct.calcsize(fmt)
        return bool(v) if kind == 7 else v


@functools.lru_cache(maxsize=4)
def _open(path: str, mtime_ns: int, size: int) -> GgufFile:
    """One parsed (memory-mapped) file per process: the config, the weights and the tokenizer all read it."""
    try:
        return GgufFile(path)
    except (ValueError, OSError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def reader(path: str | Path) -> GgufFile:
    p = Path(path).resolve()
    st = p.stat()
    return _open(str(p), st.st_mtime_ns, st.st_size)


def read_metadata(path: str | Path, prefix: str = "") -> dict:
    """The file's metadata keys starting with `prefix`, as plain values (token lists included: they are large)."""
    return {k: v for k, v in reader(path).fields.items() if k.startswith(prefix)}


_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                     "tokenizer.ggml.merges", "tokenizer.ggml.precompiled_charsmap")


def _meta(path: str | Path) -> dict:
    """Every metadata key except the (large) tokenizer arrays."""
    return {k: v for k, v in reader(path).fields.items() if k not in _TOKENIZER_ARRAYS}


def architecture(path: str | Path) -> str:
    from .converters import REGISTRY

    arch = _meta(path).get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise CheckpointError(f"{Path(path).name}: GGUF general.architecture '{arch}' is not supported; "
                              f"supported: {', '.join(a for a in GGUF_ARCHS if GGUF_ARCHS[a].hf_arch in REGISTRY)}")
    if GGUF_ARCHS[arch].hf_arch not in REGISTRY:
        raise CheckpointError(f"{Path(path).name}: GGUF general.architecture '{arch}' loads as "
                              f"{GGUF_ARCHS[arch].hf_arch}, which this lmforge has no converter for yet")
    return arch


def _scalar(meta: dict, key: str, default=None):
    v = meta.get(key, default)
    if isinstance(v, list):  # per-layer values (some files): fine while they agree
        if len(set(v)) != 1:
            raise CheckpointError(f"GGUF {key} differs per layer ({sorted(set(v))}); lmforge needs one value")
        v = v[0]
    return v


def hf_config(path: str | Path) -> dict:
    """The transformers ``config.json`` dict of the model in a GGUF file (``architectures`` set), from metadata."""
    arch = architecture(path)
    spec, meta = GGUF_ARCHS[arch], _meta(path)
    r = reader(path)
    tensors = {t.name: t for t in r.tensors}

    def get(key, default=None):
        return _scalar(meta, f"{arch}.{key}", default)

    has_attention = any(f"blk.0.attn_{n}.weight" in tensors for n in ("q", "qkv", "q_a"))
    if not has_attention or "token_embd.weight" not in tensors:
        raise CheckpointError(f"{Path(path).name}: GGUF file has no token_embd/attention tensors; is it a "
                              "vision/adapter file?")
    vocab = get("vocab_size") or int(tensors["token_embd.weight"].shape[-1])  # GGUF dims: (d_model, vocab)
    d, heads = get("embedding_length"), get("attention.head_count")
    missing = [k for k, v in (("block_count", get("block_count")), ("embedding_length", d),
                              ("attention.head_count", heads), ("feed_forward_length", get("feed_forward_length")))
               if v is None]
    if missing:
        raise CheckpointError(f"{Path(path).name}: GGUF metadata lacks {arch}.{missing[0]}")
    if arch == "glm4" and meta.get("glm4.rope.dimension_sections"):  # llama.cpp's converter permuted q/k for M-RoPE
        raise CheckpointError(f"{Path(path).name}: glm4 with rope.dimension_sections (M-RoPE, the text decoder of "
                              "GLM-4.1V / GLM-4.5V) is not supported; text-only GLM-4-0414 / GLM-Z1 files are")
    head_dim = get("attention.key_length") or d // heads
    experts = get("expert_count", 0) or 0
    hf_arch, model_type = (spec.moe[0], spec.moe[1]) if experts and spec.moe else (spec.hf_arch, spec.model_type)
    hf = dict(
        architectures=[hf_arch], model_type=model_type, vocab_size=int(vocab), hidden_size=d,
        num_hidden_layers=get("block_count"), num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
        intermediate_size=get("feed_forward_length"), rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
        max_position_embeddings=get("context_length", 4096), rope_theta=float(get("rope.freq_base", 10000.0)),
        hidden_act="silu", tie_word_embeddings="output.weight" not in tensors, torch_dtype=_dtype_name(r.tensors),
    )
    hf.update(spec.extra)
    if get("attention.layer_norm_epsilon") is not None:  # LayerNorm families (Phi-2, GPT-2, BLOOM)
        hf["layer_norm_eps"] = hf["layer_norm_epsilon"] = get("attention.layer_norm_epsilon")
    rot = get("rope.dimension_count")
    if rot and rot != head_dim:
        hf["partial_rotary_factor"] = rot / head_dim
    window = get("attention.sliding_window")
    if window:
        hf["sliding_window"] = window
        hf["use_sliding_window"] = True
    hf.update(_rope_scaling(path, arch, meta, hf, tensors))
    if experts:
        hf.update(num_local_experts=experts, num_experts=experts, num_experts_per_tok=get("expert_used_count", 2))
        if model_type == "qwen2_moe":
            hf.update(moe_intermediate_size=get("expert_feed_forward_length"), norm_topk_prob=False,
                      shared_expert_intermediate_size=get("expert_shared_feed_forward_length", 0),
                      decoder_sparse_step=1)
        elif model_type == "qwen3_moe":  # llama.cpp's qwen3moe: every layer sparse, top-k renormalized
            hf.update(moe_intermediate_size=get("expert_feed_forward_length"), norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[])
        elif model_type == "glm4_moe":  # every routed layer after the leading dense ones; sigmoid scores
            if get("expert_gating_func", 2) != 2:
                raise CheckpointError(f"{Path(path).name}: glm4moe.expert_gating_func={get('expert_gating_func')} "
                                      "is not supported (2 = sigmoid is)")
            hf.update(n_routed_experts=experts, moe_intermediate_size=get("expert_feed_forward_length"),
                      n_shared_experts=get("expert_shared_count", 1),
                      first_k_dense_replace=get("leading_dense_block_count", 0),
                      routed_scaling_factor=get("expert_weights_scale", 1.0),
                      norm_topk_prob=get("expert_weights_norm", True),
                      n_group=1, topk_group=1, scoring_func="sigmoid", topk_method="noaux_tc",
                      use_qk_norm="blk.0.attn_q_norm.weight" in tensors, attention_bias="blk.0.attn_q.bias" in tensors)
        elif model_type == "mixtral":
            hf["intermediate_size"] = get("expert_feed_forward_length") or hf["intermediate_size"]
    if arch == "deepseek2":  # key_length is the latent's (kv_rank + rope): no partial rotary factor
        hf.pop("partial_rotary_factor", None)
        hf.update(_deepseek2_config(Path(path).name, get, hf))
    if arch in ("gpt2", "bloom"):  # their HF configs' own key names
        hf.update(n_embd=d, n_layer=hf["num_hidden_layers"], n_head=heads, n_inner=hf["intermediate_size"],
                  n_positions=hf["max_position_embeddings"], seq_length=hf["max_position_embeddings"])
    if arch in ("chatglm", "glm4"):
        hf["attention_bias"] = "blk.0.attn_q.bias" in tensors or "blk.0.attn_qkv.bias" in tensors
    if arch in ("gemma2", "gemma3"):
        # llama.cpp scales q.k by head_dim**-0.5, (d_model / heads)**-0.5 for the 27B sizes (46 / 62 layers)
        big = hf["num_hidden_layers"] == (46 if arch == "gemma2" else 62)
        hf["query_pre_attn_scalar"] = d // heads if big else head_dim
        hf["attn_logit_softcapping"] = get("attn_logit_softcapping")
        hf["final_logit_softcapping"] = get("final_logit_softcapping")
        hf.pop("use_sliding_window", None)
    if arch == "llama4":
        hf.update(_llama4_config(path, get, hf))
    if arch == "gpt-oss":  # llama.cpp's gpt-oss: even layers slide (sliding_window_pattern 2), swiglu_oai 1.702 / 7
        n, period = hf["num_hidden_layers"], get("attention.sliding_window_pattern", 2)
        hf.pop("use_sliding_window", None)
        hf.update(intermediate_size=get("expert_feed_forward_length"), attention_bias="blk.0.attn_q.bias" in tensors,
                  swiglu_limit=7.0, swiglu_alpha=1.702,
                  layer_types=["sliding_attention" if i % period < period - 1 else "full_attention" for i in range(n)])
    for name, key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            hf[name] = meta[f"tokenizer.ggml.{key}"]
    stops = stop_token_ids(meta)
    if stops:
        hf["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    return hf


def _llama4_config(path, get, hf: dict) -> dict:
    """Llama 4 as llama.cpp's llama4 graph computes it: no RoPE on every 4th layer, 8192-position chunks on the
    others (its sliding_window_pattern, 4 by default: 3 chunked, 1 full), the NoPE layers' query temperature (floor
    8192, scale 0.1), L2 qk-norm unless 128 experts, MoE on every interleave_moe_layer_step-th layer."""
    if get("attention.sliding_window") == 0:
        raise CheckpointError(f"{Path(path).name}: llama4 with attention.sliding_window=0 (MobileLLM's all-RoPE "
                              "layout) is not supported")
    n, period, experts = hf["num_hidden_layers"], get("attention.sliding_window_pattern", 4), get("expert_count", 0)
    hf.pop("sliding_window", None), hf.pop("use_sliding_window", None)
    return dict(intermediate_size=get("expert_feed_forward_length"), intermediate_size_mlp=hf["intermediate_size"],
                num_local_experts=experts, num_experts_per_tok=get("expert_used_count", 1),
                interleave_moe_layer_step=get("interleave_moe_layer_step", 1), no_rope_layer_interval=4,
                attention_chunk_size=8192, use_qk_norm=experts != 128, attn_temperature_tuning=True,
                floor_scale=8192, attn_scale=0.1,
                layer_types=["chunked_attention" if i % period < period - 1 else "full_attention" for i in range(n)])


def _deepseek2_config(name: str, get, hf: dict) -> dict:
    """DeepSeek-V3's config.json keys from llama.cpp's deepseek2 metadata: MLA sizes (key/value_length_mla per head;
    older files give them as key/value_length), the sigmoid router, and YaRN as llama.cpp computes it: q.k scaled by
    mscale(factor, M)^2 with M = yarn_log_multiplier / 0.1, cos/sin left alone (mscale = mscale_all_dim = M); without
    the multiplier both get mscale(factor, 1)."""
    if get("expert_gating_func", 1) != 2:
        raise CheckpointError(f"{name}: deepseek2.expert_gating_func={get('expert_gating_func', 1)} (DeepSeek-V2's "
                              "softmax routing) is not supported; 2 = sigmoid (DeepSeek-V3, Kimi-K2) is")
    rope = get("rope.dimension_count")
    k_mla = get("attention.key_length_mla") or get("attention.key_length")
    v_mla = get("attention.value_length_mla") or get("attention.value_length")
    out = dict(q_lora_rank=get("attention.q_lora_rank") or None, kv_lora_rank=get("attention.kv_lora_rank"),
               qk_rope_head_dim=rope, qk_nope_head_dim=k_mla - rope, v_head_dim=v_mla, rope_interleave=True,
               attention_bias=False, n_routed_experts=get("expert_count"),
               moe_intermediate_size=get("expert_feed_forward_length"), n_shared_experts=get("expert_shared_count", 1),
               first_k_dense_replace=get("leading_dense_block_count", 0),
               routed_scaling_factor=get("expert_weights_scale", 1.0), norm_topk_prob=get("expert_weights_norm", False),
               n_group=get("expert_group_count", 0) or 1, topk_group=get("expert_group_used_count", 0) or 1,
               scoring_func="sigmoid", topk_method="noaux_tc")
    scaling = hf.get("rope_scaling")
    if scaling and scaling["rope_type"] == "yarn":
        m = round((get("rope.scaling.yarn_log_multiplier") or 0.0) / 0.1, 6)  # stored as float32
        factor = scaling["factor"]
        extra = dict(mscale=m, mscale_all_dim=m) if m else dict(
            mscale_all_dim=1.0, attention_factor=0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        out["rope_scaling"] = {**scaling, **extra}
    return out


def stop_token_ids(meta: dict) -> list[int]:
    """eos, then end-of-turn / end-of-message ids llama.cpp also stops on (Llama 3's <|eot_id|>, <|eom_id|>)."""
    ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _dtype_name(tensors) -> str:
    """The dtype a GGUF's weights load in by default: F16/BF16 files keep theirs, quantized ones dequantize to fp32."""
    kinds = {t.tensor_type.name for t in tensors if len(t.shape) >= 2}
    return {frozenset({"F16"}): "float16", frozenset({"BF16"}): "bfloat16"}.get(frozenset(kinds), "float32")


def _rope_scaling(path, arch: str, meta: dict, hf: dict, tensors: dict) -> dict:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if "rope_factors_long.weight" in tensors or "rope_factors_short.weight" in tensors:
        kind = "longrope"
    if kind == "linear":
        return {"rope_scaling": {"rope_type": "linear", "factor": factor}}
    if kind not in ("none", ""):
        # the converter names what it supports in its own one-line error
        return {"rope_scaling": {"rope_type": kind, "factor": factor, "original_max_position_embeddings": original}}
    if "rope_freqs.weight" in tensors:
        divisors = torch.from_numpy(_dequantize(tensors["rope_freqs.weight"]).astype(np.float64)).flatten()
        rot = int(hf["head_dim"] * hf.get("partial_rotary_factor", 1.0))
        scaling = _llama3_from_divisors(divisors, hf["rope_theta"], rot, original)
        if scaling is None:
            raise CheckpointError(f"{Path(path).name}: its rope_freqs tensor is not a Llama-3 RoPE scaling lmforge "
                                  "can express")
        return {"rope_scaling": scaling} if scaling else {}
    return {}


def _llama3_divisors(theta: float, dim: int, factor: float, low: float, high: float, original: float) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    wavelen = 2 * math.pi / inv
    smooth = (original / wavelen - low) / (high - low)
    scaled = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > original / low, inv / factor, inv)
    out = torch.where((wavelen >= original / high) & (wavelen <= original / low), scaled, out)
    return inv / out


def _llama3_from_divisors(div: torch.Tensor, theta: float, dim: int, original: int | None) -> dict | None:
    """The ``llama3`` rope_scaling dict whose per-frequency divisors equal `div` ({} for none, None if impossible).

    Only the ratios original/low and original/high shape the curve, so low_freq_factor is taken as 1 (as every
    Llama 3.x release has it); high_freq_factor and the original context come from a least-squares fit of the
    blended frequencies (or the Llama 3 defaults when too few frequencies fall in the blend), then checked.
    """
    if torch.allclose(div, torch.ones_like(div)):
        return {}
    factor = float(div.max())
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    inv_wavelen = inv / (2 * math.pi)
    blend = (div > 1 + 1e-4) & (div < factor * (1 - 1e-4))
    smooth = (factor / div - 1) / (factor - 1)  # 1 - smooth of the blend, per frequency
    candidates = []
    if int(blend.sum()) >= 2:  # smooth = original * (1/wavelen) / (high - 1) - 1 / (high - 1)
        a, b = np.polyfit(inv_wavelen[blend].numpy(), smooth[blend].numpy(), 1)
        if b < 0:
            high = 1 - 1 / b
            candidates.append((high, a * (high - 1)))
    if int(blend.sum()) == 1:
        s, w = float(smooth[blend]), float(inv_wavelen[blend])
        candidates += [(4.0, (1 + 3 * s) / w)]
    slow = div >= factor * (1 - 1e-4)  # wavelen > original: pick original just below the shortest such wavelength
    if not candidates and bool(slow.any()):
        candidates.append((4.0, float(1 / inv_wavelen[slow].max()) * 0.999))
    if original:
        candidates.append((4.0, float(original)))
    for high, orig in candidates:
        for whole in (int(round(orig)), int(math.floor(orig))):  # a context length is a whole number of tokens
            if whole > 0 and high > 1:
                high = round(float(high), 4)
                got = _llama3_divisors(theta, dim, factor, 1.0, high, whole)
                if torch.allclose(got, div, rtol=1e-3, atol=1e-5):
                    return {"rope_type": "llama3", "factor": round(factor, 4), "low_freq_factor": 1.0,
                            "high_freq_factor": high, "original_max_position_embeddings": whole}
    return None


def _dequantize(t) -> np.ndarray:
    """One tensor as float32, numpy row-major shape (reversed GGUF dims)."""
    arr = np.asarray(_gguf().quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    if not arr.flags.writeable:  # F32 tensors come straight from the read-only memory map
        arr = arr.copy()
    return arr.reshape(tuple(reversed(t.shape)))


def hf_tensors(path: str | Path, hf: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, fp32 tensor) for every weight of the file, one tensor dequantized at a time."""
    arch = architecture(path)
    spec = GGUF_ARCHS[arch]
    moe = bool(hf.get("num_local_experts") or hf.get("num_experts"))
    table = _compiled(arch, moe)
    heads, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    pending: dict[str, torch.Tensor] = {}  # a gate (or up) expert stack waiting for its partner (fused_experts)
    split_kv_b: dict[str, dict[str, torch.Tensor]] = {}  # deepseek2's attn_k_b / attn_v_b, per layer until both came
    for t in reader(path).tensors:
        m = re.match(r"^blk\.(\d+)\.attn_([kv])_b\.weight$", t.name) if arch == "deepseek2" else None
        if m:
            parts = split_kv_b.setdefault(m.group(1), {})
            parts[m.group(2)] = torch.from_numpy(_dequantize(t))
            if len(parts) == 2:
                yield f"model.layers.{m.group(1)}.self_attn.kv_b_proj.weight", _merge_kv_b(parts["k"], parts["v"])
            continue
        if t.name == "rope_freqs.weight":  # folded into rope_scaling by hf_config
            continue
        for pattern, hf_name in table:
            m = pattern.match(t.name)
            if m:
                break
        else:
            raise CheckpointError(f"{Path(path).name}: GGUF tensor '{t.name}' has no mapping for architecture "
                                  f"'{arch}'; the file is a variant lmforge does not read yet")
        fill = {k: v for k, v in m.groupdict().items() if v is not None}
        w = torch.from_numpy(_dequantize(t))
        if spec.permute_qk and ".attn_q." in t.name:
            w = unpermute_rope_rows(w, heads)
        elif spec.permute_qk and ".attn_k." in t.name:
            w = unpermute_rope_rows(w, kv)
        if spec.norm_offset and t.name.endswith("norm.weight"):
            w = w - spec.norm_offset
        if spec.conv1d and t.name.startswith("blk.") and w.ndim == 2:
            w = w.T.contiguous()  # Linear (out, in) -> Conv1D (in, out)
        if spec.qkv_heads and ".attn_qkv." in t.name:  # (3 * heads * hd, ...) -> (heads * 3 * hd, ...)
            w = w.reshape(3, heads, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)
        if spec.split_qkv and ".attn_qkv." in t.name:  # q | k | v rows: heads, kv heads, kv heads of head_dim
            sizes = [heads * hf["head_dim"], kv * hf["head_dim"], kv * hf["head_dim"]]
            if w.shape[0] != sum(sizes):
                raise CheckpointError(f"{Path(path).name}: GGUF tensor '{t.name}' has {w.shape[0]} rows; the metadata's "
                                      f"{heads} heads, {kv} kv heads of {hf['head_dim']} dims need {sum(sizes)}")
            for part, rows in zip("qkv", w.split(sizes)):
                yield hf_name.format(part=part, **fill), rows
            continue
        if "_shexp" in t.name and "gate_inp" in t.name:
            w = w.reshape(1, -1)  # shared_expert_gate is a (1, d) Linear
        if spec.fused_experts and "_exps." in t.name:
            fused = _fuse_experts(t.name, w, spec.fused_experts, pending)
            if fused is not None:
                yield hf_name.format(**fill), fused
            continue
        if "{e}" in hf_name:  # stacked experts (n_experts, out, in) -> one tensor per expert
            for e in range(w.shape[0]):
                yield hf_name.format(e=e, **fill), w[e]
        else:
            yield hf_name.format(**fill), w
    if pending:
        raise CheckpointError(f"{Path(path).name}: GGUF tensor '{next(iter(pending))}' has no gate/up partner")


def _fuse_experts(name: str, w: torch.Tensor, kind: str, pending: dict) -> torch.Tensor | None:
    """llama.cpp's per-projection expert stacks -> HF's (Llama 4, gpt-oss): down (E, d, f) -> (E, f, d); gate and up
    (E, f, d) -> one (E, d, 2f) of gate|up halves ("cat") or alternating columns ("interleaved"), returned once both
    are read (None until then). Biases (E, out) are fused the same way."""
    w = w.transpose(1, 2) if w.ndim == 3 else w  # HF's x @ W layout (E, in, out)
    if "_down_exps." in name:
        return w.contiguous()
    gate = "_gate_exps." in name
    partner = name.replace("_gate_exps.", "_up_exps.") if gate else name.replace("_up_exps.", "_gate_exps.")
    other = pending.pop(partner, None)
    if other is None:
        pending[name] = w
        return None
    g, u = (w, other) if gate else (other, w)
    return torch.cat([g, u], -1) if kind == "cat" else torch.stack([g, u], -1).flatten(-2)


def _merge_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """DeepSeek's kv_b_proj (H * (nope + v), kv_rank) from llama.cpp's attn_k_b (H, kv_rank, nope), stored transposed
    for the absorbed query, and attn_v_b (H, v, kv_rank)."""
    return torch.cat([k_b.transpose(1, 2), v_b], 1).reshape(-1, k_b.shape[1])
