"""GGUF export read back with gguf.GGUFReader (metadata, names, shapes, types, values), the RoPE row permutation
checked by running the exported tensors with llama.cpp's adjacent-pair rotation, and the `quantize` run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lmforge.config import load_config  # noqa: E402
from lmforge.errors import ConfigError  # noqa: E402
from lmforge.models import Transformer, load_hf  # noqa: E402
from lmforge.models.config import ModelConfig  # noqa: E402
from lmforge.quant import Int4Linear, Int8Linear, load_quantized  # noqa: E402
from lmforge.quant.gguf_export import export_gguf  # noqa: E402
from lmforge.quant.run import QuantizeConfig, run_quantize  # noqa: E402
from lmforge.testing import TINY_CORPUS, make_tiny_checkpoint  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Tiny Llama (GQA 4/2, Llama-3 RoPE scaling, untied head) with a byte-level BPE tokenizer and chat template."""
    torch.manual_seed(0)
    return make_tiny_checkpoint(tmp_path_factory.mktemp("gguf") / "tiny")


def _field(reader, key):
    return reader.fields[key].contents()


def _tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def _dequant(t) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


def test_f32_export_runs_identically_with_llama_cpp_rope_convention(ckpt, tmp_path):
    """Load the GGUF tensors into a model that rotates adjacent pairs (llama.cpp's 'normal' RoPE): same logits."""
    model = load_hf(ckpt)
    reader = gguf.GGUFReader(export_gguf(ckpt, tmp_path / "m.gguf", qtype="f32"))
    ts = _tensors(reader)
    cfg = model.cfg.model_copy(update={"rope_interleaved": True})
    other = Transformer(cfg).eval()
    names = {"attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
             "attn_output": "attn.o_proj", "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    state = {"embed.weight": _dequant(ts["token_embd.weight"]), "norm.weight": _dequant(ts["output_norm.weight"]),
             "lm_head.weight": _dequant(ts["output.weight"])}
    for i in range(cfg.n_layers):
        for g, native in names.items():
            state[f"layers.{i}.{native}.weight"] = _dequant(ts[f"blk.{i}.{g}.weight"])
    other.load_state_dict(state)
    # Llama-3 scaling travels as rope_freqs: base frequencies divided by these factors = the scaled frequencies
    base = 1 / cfg.rope_theta ** (torch.arange(0, cfg.rotary_dim, 2).float() / cfg.rotary_dim)
    assert torch.allclose(base / _dequant(ts["rope_freqs.weight"]), model.rope_inv_freq, rtol=1e-6)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.allclose(other(tokens), model(tokens), atol=1e-5)
        # without the permutation the two pair conventions disagree
        assert not torch.allclose(_run_interleaved_without_permutation(model, tokens), model(tokens), atol=1e-3)


def _run_interleaved_without_permutation(model, tokens):
    other = Transformer(model.cfg.model_copy(update={"rope_interleaved": True})).eval()
    other.load_state_dict(model.state_dict())
    return other(tokens)


@pytest.mark.parametrize("qtype,rel_rms_bound", [("q8_0", 0.01), ("q4_0", 0.12), ("f16", 1e-3)])
def test_quantized_export_metadata_and_values(ckpt, tmp_path, qtype, rel_rms_bound):
    model = load_hf(ckpt)
    cfg = model.cfg
    reader = gguf.GGUFReader(export_gguf(ckpt, tmp_path / f"m-{qtype}.gguf", qtype=qtype))
    assert _field(reader, "general.architecture") == "llama"
    for key, value in (("llama.block_count", cfg.n_layers), ("llama.embedding_length", cfg.d_model),
                       ("llama.feed_forward_length", cfg.d_ff), ("llama.attention.head_count", cfg.n_heads),
                       ("llama.attention.head_count_kv", cfg.kv_heads), ("llama.rope.dimension_count", 16),
                       ("llama.context_length", cfg.max_seq_len), ("llama.vocab_size", cfg.vocab_size)):
        assert _field(reader, key) == value, key
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    # tokenizer: the HF tokenizer.json vocabulary in id order, merges, special ids and the chat template
    tok = Tokenizer.from_dir(ckpt)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    assert len(tokens) == cfg.vocab_size and all(tokens[i] == t for t, i in vocab.items())
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    merges = json.loads((ckpt / "tokenizer.json").read_text())["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges")[:3] == [m if isinstance(m, str) else " ".join(m) for m in merges[:3]]
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_id
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_id
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tok.eos_id] == gguf.TokenType.CONTROL and types[vocab["a"]] == gguf.TokenType.NORMAL
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template

    ts = _tensors(reader)
    assert len(ts) == 1 + 1 + 9 * cfg.n_layers + 2  # rope_freqs, embeddings, blocks, final norm, head
    want = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
            "f16": gguf.GGMLQuantizationType.F16}[qtype]
    down = ts["blk.1.ffn_down.weight"]
    assert down.tensor_type == want and down.shape.tolist() == [cfg.d_ff, cfg.d_model]  # ggml order: (in, out)
    assert ts["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    from lmforge.quant.gguf_export import unpermute_rope_rows

    for name, src, heads in (("blk.1.ffn_down.weight", model.layers[1].mlp.down_proj.weight, None),
                             ("blk.0.attn_k.weight", model.layers[0].attn.k_proj.weight, cfg.kv_heads),
                             ("token_embd.weight", model.embed.weight, None)):
        back = _dequant(ts[name])
        if heads:
            back = unpermute_rope_rows(back, heads)
        src = src.detach()
        rel = ((back - src).pow(2).mean().sqrt() / src.pow(2).mean().sqrt()).item()
        assert rel < rel_rms_bound, (name, rel)
        if qtype == "q8_0":  # per element: half a step of the block's absmax / 127 (+ the f16 rounding of d)
            absmax = src.view(src.shape[0], -1, 32).abs().amax(-1, keepdim=True)
            err = (back - src).view_as(absmax.expand(-1, -1, 32))
            assert (err.abs() <= absmax / 127 * 0.57 + 1e-7).all()


def test_gguf_export_refuses_other_architectures(tmp_path):
    model = Transformer(ModelConfig(arch="MyResearchForCausalLM", vocab_size=32, d_model=16, n_layers=1, n_heads=2,
                                    d_ff=32))  # (GLM-4 and gpt-oss, the examples here before, are exported now)
    with pytest.raises(ConfigError, match="no llama.cpp architecture for MyResearchForCausalLM"):
        export_gguf(model, tmp_path / "x.gguf")
    gpt2 = Transformer(ModelConfig(arch="GPT2LMHeadModel", vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    with pytest.raises(ConfigError, match="llama.cpp's 'gpt2' architecture for GPT2LMHeadModel; this model has "
                                          "norm='rms' \\(needs 'layer'\\)"):
        export_gguf(gpt2, tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="gguf type 'q5_k' is not supported"):
        export_gguf(gpt2, tmp_path / "x.gguf", qtype="q5_k")
    assert not (tmp_path / "x.gguf").exists()


def test_quantize_run_gptq_with_calibration_file_and_gguf(ckpt, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(TINY_CORPUS * 4)
    cfg = load_config(QuantizeConfig, overrides=[f"model={ckpt}", "method=gptq", "group_size=32", f"calib={calib}",
                                                 "calib_samples=4", "calib_seq_len=32", f"out={tmp_path / 'q'}",
                                                 "gguf=q4_0", "device=cpu"])
    result = run_quantize(cfg)
    assert "[quantize]" in capsys.readouterr().out
    out = tmp_path / "q"
    assert {"config.json", "model.safetensors", "tokenizer.json", "model.gguf"} <= {p.name for p in out.iterdir()}
    assert result["bytes_after"] < result["bytes_before"]
    model = load_quantized(out)
    assert isinstance(model.layers[0].mlp.down_proj, Int4Linear)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "gptq" and qc["group_size"] == 32 and qc["calib_samples"] == 4
    from lmforge.infer import SamplingParams, generate

    tok = Tokenizer.from_dir(out)
    text = generate(model, [tok.encode("Hello")], SamplingParams(temperature=0, max_new_tokens=4), tokenizer=tok)
    assert len(text[0].token_ids) == 4
    assert gguf.GGUFReader(out / "model.gguf").fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0


def test_quantize_config_errors(ckpt):
    with pytest.raises(ConfigError, match="unknown config key 'group' \\(did you mean 'group_size'\\?\\)"):
        load_config(QuantizeConfig, overrides=[f"model={ckpt}", "group=32"])
    with pytest.raises(ConfigError, match="method 'awq' needs calibration text: set calib=PATH"):
        run_quantize(QuantizeConfig(model=str(ckpt), method="awq"))


def test_cli_quantize_verb(ckpt, tmp_path, capsys):
    from lmforge.cli import main

    out = tmp_path / "cli-int8"
    assert main(["quantize", str(ckpt), "--method", "int8", "--out", str(out), "--gguf", "q8_0"]) == 0
    assert isinstance(load_quantized(out).layers[1].attn.o_proj, Int8Linear)
    assert (out / "model.gguf").is_file()
    assert main(["quantize", str(ckpt), "--method", "gptq"]) == 2
    assert "needs calibration text" in capsys.readouterr().err
    assert main(["quantize", "--help"]) == 0
    assert "group_size" in capsys.readouterr().out


def test_cli_export_format_gguf(ckpt, tmp_path, capsys):
    """`lmforge export CKPT --format gguf --quant Q4_K_M --out m.gguf`: the type in any case, the vocabulary's
    pre-tokenizer detected; a directory as out, or quant without format=gguf, is one line and exit 2."""
    from lmforge.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export", str(ckpt), "--format", "gguf", "--quant", "Q4_K_M", "--out", str(out)]) == 0
    assert "gguf q4_k_m" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"  # the tiny vocabulary splits as GPT-2 does
    assert main(["export", str(ckpt), "--format", "gguf", "--out", str(tmp_path)]) == 2
    assert "must be a .gguf file path for format=gguf" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--quant", "q4_0", "--out", str(tmp_path / "hf")]) == 2
    assert "add --format gguf" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--format", "gguf", "--quant", "q3", "--out", str(out)]) == 2
    assert "config key 'quant'" in capsys.readouterr().err


def test_gguf_export_refuses_non_finite_weights_and_leaves_no_file(tmp_path):
    """Tensors are quantized and written one at a time: a NaN found in the last one aborts the export, and neither the
    file nor its temporary remains."""
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64))
    with torch.no_grad():
        model.lm_head.weight[3, 5] = float("nan")
    with pytest.raises(ConfigError, match="tensor 'output.weight' has non-finite values"):
        export_gguf(model, tmp_path / "m.gguf", qtype="q8_0")
    assert list(tmp_path.iterdir()) == []
