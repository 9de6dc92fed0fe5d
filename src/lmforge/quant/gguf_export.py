"""GGUF export for llama.cpp (Llama-family models), written with the `gguf` package.

What llama.cpp's ``llama`` architecture expects, and what this writes:

- metadata: ``general.*``, ``llama.*`` hyper-parameters (context, widths, heads, RoPE base and dims, RMS eps, vocab
  size, Llama-3 or linear RoPE scaling), ``general.file_type``;
- the tokenizer from ``tokenizer.json`` as a ``gpt2`` (byte-level BPE) vocabulary: tokens in id order, token types
  (control for special tokens, unused for padding rows the model has beyond the tokenizer), merges, bos/eos/pad ids,
  and the chat template;
- tensors under llama.cpp names (``token_embd``, ``blk.N.attn_q`` ... ``output``). Q and K rows are permuted from
  the half-split RoPE layout Hugging Face (and lmforge) store to the adjacent-pair layout llama.cpp rotates:
  per head, rows (i, i + d/2) become rows (2i, 2i + 1). Llama-3 RoPE scaling becomes ``rope_freqs`` (the per-
  frequency divisors) as llama.cpp reads it.

Types: ``f32``, ``f16``, ``bf16``, ``q8_0`` (blocks of 32: one f16 scale, 32 int8) and ``q4_0`` (blocks of 32: one
f16 scale, 32 4-bit codes with offset 8), quantized by ``gguf.quants``; 2-D weights take the type, norms stay f32.
A model quantized with lmforge is exported from its dequantized weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..models.gguf import permute_rope_rows, unpermute_rope_rows  # noqa: F401  (re-exported)
from ..models.positions import rope_inv_freq
from ..models.transformer import Transformer

__all__ = ["export_gguf", "GGUF_TYPES", "permute_rope_rows", "unpermute_rope_rows"]

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the 'gguf' package: pip install gguf") from None
    return gguf


def _check_llama(cfg) -> None:
    problems = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in
                (("pos", "rope"), ("norm", "rms"), ("mlp", "swiglu"), ("act", "silu"), ("qkv_bias", False),
                 ("out_bias", False), ("mlp_bias", False), ("embed_norm", False), ("rotary_fraction", 1.0),
                 ("rope_interleaved", False), ("parallel_block", False), ("norm_weight_offset", 0.0),
                 ("scale_embeddings", False), ("qk_norm", "none"), ("norm_placement", "pre"), ("attn_scale", None),
                 ("attn_logit_softcap", None), ("final_logit_softcap", None), ("nope_layers", ()),
                 ("rope_local_theta", None), ("sliding_window", None),
                 ("attention", "gqa"), ("attn_sinks", False), ("attn_chunk", None))
                if getattr(cfg, k) != v]
    if cfg.rope_scaling is not None and cfg.rope_scaling.type not in ("linear", "llama3"):
        problems.append(f"rope_scaling.type={cfg.rope_scaling.type!r} (needs linear or llama3)")
    if problems:
        raise ConfigError(f"GGUF export writes llama.cpp's 'llama' architecture; this model has "
                          f"{', '.join(problems)}")


def _tokenizer_metadata(writer, tokenizer_dir: Path, vocab_size: int) -> None:
    """gpt2-style BPE vocabulary, merges, special ids and chat template from a tokenizer directory."""
    gguf = _gguf()
    from ..tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir)
    data = json.loads(tok.backend.to_str())
    if data["model"]["type"] != "BPE":
        raise ConfigError(f"GGUF export supports byte-level BPE tokenizers; {tokenizer_dir}/tokenizer.json is "
                          f"{data['model']['type']}")
    vocab = tok.backend.get_vocab(with_added_tokens=True)  # {token: id}
    if len(vocab) > vocab_size:
        raise ConfigError(f"tokenizer has {len(vocab)} tokens but the model's vocab_size is {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    special = {a["content"] for a in data.get("added_tokens", []) if a.get("special")}
    added = {a["content"] for a in data.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if t in special else
                         gguf.TokenType.USER_DEFINED if t in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, tid in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        if tid is not None:
            getattr(writer, f"add_{name}_token_id")(tid)
    writer.add_add_bos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _tensor(writer, name: str, t: torch.Tensor, qtype: str) -> None:
    gguf = _gguf()
    arr = t.detach().float().cpu().numpy()
    if arr.ndim == 1 or qtype == "f32":
        writer.add_tensor(name, arr.astype(np.float32))
    elif qtype == "f16":
        writer.add_tensor(name, arr.astype(np.float16))
    else:
        kind = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
                "q4_0": gguf.GGMLQuantizationType.Q4_0}[qtype]
        block = gguf.GGML_QUANT_SIZES[kind][0]
        if arr.shape[-1] % block:  # rows that do not fill whole blocks stay f16, as llama.cpp's converter does
            writer.add_tensor(name, arr.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(arr, kind), raw_dtype=kind)


@torch.no_grad()
def export_gguf(model: Transformer | str | Path, out_file: str | Path, tokenizer_dir: str | Path | None = None,
                qtype: str = "q8_0", name: str | None = None) -> Path:
    """Write `model` (a Transformer, or an HF / lmforge-quantized checkpoint directory) to a GGUF file.

    `tokenizer_dir` (default: the checkpoint directory) must hold tokenizer.json; without one the file has no
    vocabulary and llama.cpp cannot run it."""
    gguf = _gguf()
    qtype = qtype.lower()
    if qtype not in GGUF_TYPES:
        raise ConfigError(f"gguf type '{qtype}' is not supported; use one of {', '.join(GGUF_TYPES)}")
    if not isinstance(model, Transformer):
        src = Path(model)
        tokenizer_dir = tokenizer_dir or src
        from ..models.hf import load_hf, read_hf_config
        from .model import load_quantized

        lmforge_quantized = (read_hf_config(src).get("quantization_config") or {}).get("quant_method") == "lmforge"
        model = load_quantized(src) if lmforge_quantized else load_hf(src, progress=False)
        name = name or src.name
    cfg = model.cfg
    _check_llama(cfg)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)

    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    w = gguf.GGUFWriter(str(out_file), arch)
    w.add_name(name or "lmforge-model")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_key_length(cfg.dim_per_head)
    w.add_value_length(cfg.dim_per_head)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                 "q4_0": "MOSTLY_Q4_0"}[qtype]
    w.add_file_type(getattr(gguf.LlamaFileType, file_type))
    if cfg.rope_scaling is not None and cfg.rope_scaling.type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling.factor)
    if tokenizer_dir is not None:
        _tokenizer_metadata(w, Path(tokenizer_dir), cfg.vocab_size)

    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    if cfg.rope_scaling is not None and cfg.rope_scaling.type == "llama3":
        base = rope_inv_freq(cfg.model_copy(update={"rope_scaling": None}))
        _tensor(w, names[T.ROPE_FREQS] + ".weight", base / rope_inv_freq(cfg), "f32")
    _tensor(w, names[T.TOKEN_EMBD] + ".weight", model.embed.weight, qtype)
    permute = not cfg.rope_interleaved
    for i, block in enumerate(model.layers):
        a, m = block.attn, block.mlp
        q, k = a.q_proj.weight, a.k_proj.weight
        if permute:
            q, k = permute_rope_rows(q, cfg.n_heads), permute_rope_rows(k, cfg.kv_heads)
        for kind, t in ((T.ATTN_NORM, block.attn_norm.weight), (T.ATTN_Q, q), (T.ATTN_K, k),
                        (T.ATTN_V, a.v_proj.weight), (T.ATTN_OUT, a.o_proj.weight), (T.FFN_NORM, block.mlp_norm.weight),
                        (T.FFN_GATE, m.gate_proj.weight), (T.FFN_UP, m.up_proj.weight),
                        (T.FFN_DOWN, m.down_proj.weight)):
            _tensor(w, names[kind].format(bid=i) + ".weight", t, qtype)
    _tensor(w, names[T.OUTPUT_NORM] + ".weight", model.norm.weight, qtype)
    if model.lm_head is not None:
        _tensor(w, names[T.OUTPUT] + ".weight", model.lm_head.weight, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_file
