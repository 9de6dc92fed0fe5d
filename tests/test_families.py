"""The 2024-25 families beyond the parametrized parity tests: published configs map to the presets, RoPE scaling
math equals transformers' `modeling_rope_utils`, length-dependent scalings behave as transformers does per sequence,
multimodal checkpoints' text decoders in both tensor layouts, and one-line refusals of what lmforge cannot express."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lmforge.errors import CheckpointError
from lmforge.infer import SamplingParams, generate
from lmforge.models import ModelConfig, Transformer, config_from_hf, load_hf, preset_config
from lmforge.models.positions import Rotary, rope_attention_factor, rope_inv_freq
from lmforge.testing import make_tiny_hf_model

ATOL = 1e-4
_SMOLLM3_USE_ROPE = [int((i + 1) % 4 != 0) for i in range(36)]

# config.json of the published checkpoints, as on the Hub (Gemma 3 4B and Mistral Small 3.1 are multimodal: their
# text_config lists only what differs from the text model's defaults).
PUBLISHED_CONFIGS = {
    "qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=151643,
        eos_token_id=151645, head_dim=128, hidden_act="silu", hidden_size=1024, intermediate_size=3072,
        max_position_embeddings=40960, max_window_layers=28, model_type="qwen3", num_attention_heads=16,
        num_hidden_layers=28, num_key_value_heads=8, rms_norm_eps=1e-06, rope_scaling=None, rope_theta=1000000,
        sliding_window=None, tie_word_embeddings=True, use_sliding_window=False, vocab_size=151936),
    "qwen3-8b": dict(
        architectures=["Qwen3ForCausalLM"], attention_bias=False, bos_token_id=151643, eos_token_id=151645,
        head_dim=128, hidden_act="silu", hidden_size=4096, intermediate_size=12288, max_position_embeddings=40960,
        max_window_layers=36, model_type="qwen3", num_attention_heads=32, num_hidden_layers=36, num_key_value_heads=8,
        rms_norm_eps=1e-06, rope_scaling=None, rope_theta=1000000, sliding_window=None, tie_word_embeddings=False,
        use_sliding_window=False, vocab_size=151936),
    "gemma-2-2b": dict(
        architectures=["Gemma2ForCausalLM"], attention_bias=False, attention_dropout=0.0, attn_logit_softcapping=50.0,
        bos_token_id=2, cache_implementation="hybrid", eos_token_id=1, final_logit_softcapping=30.0, head_dim=256,
        hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", hidden_size=2304,
        intermediate_size=9216, max_position_embeddings=8192, model_type="gemma2", num_attention_heads=8,
        num_hidden_layers=26, num_key_value_heads=4, pad_token_id=0, query_pre_attn_scalar=256, rms_norm_eps=1e-06,
        rope_theta=10000.0, sliding_window=4096, vocab_size=256000),
    "gemma-3-1b": dict(
        architectures=["Gemma3ForCausalLM"], attention_bias=False, attn_logit_softcapping=None, bos_token_id=2,
        eos_token_id=1, final_logit_softcapping=None, head_dim=256, hidden_activation="gelu_pytorch_tanh",
        hidden_size=1152, intermediate_size=6912, max_position_embeddings=32768, model_type="gemma3_text",
        num_attention_heads=4, num_hidden_layers=26, num_key_value_heads=1, pad_token_id=0, query_pre_attn_scalar=256,
        rms_norm_eps=1e-06, rope_local_base_freq=10000, rope_scaling=None, rope_theta=1000000, sliding_window=512,
        sliding_window_pattern=6, vocab_size=262144),
    "gemma-3-4b": dict(
        architectures=["Gemma3ForConditionalGeneration"], boi_token_index=255999, eoi_token_index=256000,
        eos_token_id=[1, 106], image_token_index=262144, mm_tokens_per_image=256, model_type="gemma3",
        text_config=dict(hidden_size=2560, intermediate_size=10240, model_type="gemma3_text", num_hidden_layers=34,
                         rope_scaling={"factor": 8.0, "rope_type": "linear"}, sliding_window=1024),
        vision_config=dict(hidden_size=1152, image_size=896, intermediate_size=4304, model_type="siglip_vision_model",
                           num_attention_heads=16, num_hidden_layers=27, patch_size=14, vision_use_head=False)),
    "olmo-2-1b": dict(
        architectures=["Olmo2ForCausalLM"], attention_bias=False, eos_token_id=100257, hidden_act="silu",
        hidden_size=2048, intermediate_size=8192, max_position_embeddings=4096, model_type="olmo2",
        num_attention_heads=16, num_hidden_layers=16, num_key_value_heads=16, pad_token_id=100277, rms_norm_eps=1e-06,
        rope_scaling=None, rope_theta=500000, tie_word_embeddings=False, vocab_size=100352),
    "smollm3-3b": dict(
        architectures=["SmolLM3ForCausalLM"], attention_bias=False, bos_token_id=None, eos_token_id=128012,
        hidden_act="silu", hidden_size=2048, intermediate_size=11008, max_position_embeddings=65536,
        max_window_layers=28, mlp_bias=False, model_type="smollm3", no_rope_layer_interval=4,
        no_rope_layers=_SMOLLM3_USE_ROPE, num_attention_heads=16, num_hidden_layers=36, num_key_value_heads=4,
        pad_token_id=128004, pretraining_tp=2, rms_norm_eps=1e-06, rope_scaling=None, rope_theta=5000000.0,
        sliding_window=None, use_sliding_window=False, vocab_size=128256),
    "phi-4": dict(
        architectures=["Phi3ForCausalLM"], attention_bias=False, bos_token_id=100257, eos_token_id=100265,
        hidden_act="silu", hidden_size=5120, intermediate_size=17920, max_position_embeddings=16384, model_type="phi3",
        num_attention_heads=40, num_hidden_layers=40, num_key_value_heads=10, original_max_position_embeddings=16384,
        pad_token_id=100349, rms_norm_eps=1e-05, rope_scaling=None, rope_theta=250000, sliding_window=None,
        tie_word_embeddings=False, vocab_size=100352),
    "mistral-small-3.1-24b": dict(
        architectures=["Mistral3ForConditionalGeneration"], image_token_index=10, model_type="mistral3",
        multimodal_projector_bias=False, projector_hidden_act="gelu", spatial_merge_size=2,
        text_config=dict(head_dim=128, hidden_act="silu", hidden_size=5120, intermediate_size=32768,
                         max_position_embeddings=131072, model_type="mistral", num_attention_heads=32,
                         num_hidden_layers=40, num_key_value_heads=8, rms_norm_eps=1e-05, rope_theta=1000000000.0,
                         sliding_window=None, vocab_size=131072),
        vision_config=dict(head_dim=64, hidden_size=1024, image_size=1540, intermediate_size=4096,
                           model_type="pixtral", num_attention_heads=16, num_hidden_layers=24, patch_size=14),
        vision_feature_layer=-1),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_published_configs_read_as_their_presets(name):
    """What `lmforge info` / the planner report for a preset is what loading the real checkpoint builds."""
    assert config_from_hf(PUBLISHED_CONFIGS[name]) == preset_config(name)


# ------------------------------------------------------------------------------------------------ RoPE math


def _hf_and_ours(rope: dict, **extra):
    hf = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
                     num_hidden_layers=1, vocab_size=32, max_position_embeddings=64,
                     rope_parameters={"rope_theta": 10000.0, **rope}, **extra)
    ours = config_from_hf({**hf.to_dict(), "architectures": ["LlamaForCausalLM"]})
    return hf, ours


ROPE_CASES = {
    "linear": dict(rope_type="linear", factor=4.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
    "yarn-mscale": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=8, mscale=0.707,
                        mscale_all_dim=1.0, beta_fast=16.0, beta_slow=2.0),
    "yarn-no-truncate-attention-factor": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                              truncate=False, attention_factor=1.3),
    "longrope": dict(rope_type="longrope", original_max_position_embeddings=16,
                     short_factor=[1.0 + 0.1 * i for i in range(32)], long_factor=[1.0 + 0.5 * i for i in range(32)]),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_scaling_math_equals_transformers(case):
    hf, cfg = _hf_and_ours(ROPE_CASES[case])
    kind = ROPE_CASES[case]["rope_type"]
    want, want_factor = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    torch.testing.assert_close(rope_inv_freq(cfg), want, rtol=1e-6, atol=0)
    assert rope_attention_factor(cfg, cfg.rope_scaling) == pytest.approx(want_factor, rel=1e-12)
    if kind == "longrope":  # the long set, for sequences past the original context
        long, _ = ROPE_INIT_FUNCTIONS[kind](hf, "cpu", seq_len=17)
        torch.testing.assert_close(rope_inv_freq(cfg, long=True), long, rtol=1e-6, atol=0)
        assert not torch.allclose(long, want)


def test_partial_rotary_yarn_and_dynamic_per_row_frequencies_equal_transformers():
    hf, cfg = _hf_and_ours(dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
                           partial_rotary_factor=0.5)
    assert cfg.rotary_dim == 32
    torch.testing.assert_close(rope_inv_freq(cfg), ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")[0], rtol=1e-6, atol=0)
    # dynamic NTK: each row's frequencies grow with its own length past max_position_embeddings (64)
    hf, cfg = _hf_and_ours(dict(rope_type="dynamic", factor=2.0))
    rotary = Rotary(cfg, cfg.rope_theta, cfg.rope_scaling)
    rotary.reset("cpu")
    positions = torch.tensor([[37, 38, 39], [97, 98, 99]])  # lengths 40 (unscaled) and 100 (scaled)
    got = rotary.frequencies(positions)
    for row, length in ((0, 40), (1, 100)):
        want, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, "cpu", seq_len=torch.tensor(length))
        torch.testing.assert_close(got[row, 0], want, rtol=1e-6, atol=0)
    assert not torch.allclose(got[0], got[1])


def _greedy(model, prompt, n):
    return generate(model, [prompt], SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))[0].token_ids


@torch.no_grad()
@pytest.mark.parametrize("arch,scaling", [
    ("LlamaForCausalLM", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=8)),
    ("Phi3ForCausalLM", dict(original_max_position_embeddings=8)),  # the tiny longrope with an 8-token switch
], ids=["dynamic", "longrope"])
def test_length_dependent_rope_matches_transformers_per_sequence(tmp_path, arch, scaling):
    """dynamic/longrope pick frequencies by length: short and long sequences, each row of a batch by its own length,
    and a cached decode that crosses the switch (each step's new token rotated by its step's length) all equal
    transformers run one sequence at a time."""
    torch.manual_seed(0)
    ref = make_tiny_hf_model(arch, tmp_path / "m", **scaling)
    ref.generation_config.eos_token_id = None
    model = load_hf(tmp_path / "m", progress=False)
    assert model.cfg.rope_scaling.type in ("dynamic", "longrope")
    tokens = torch.randint(3, 128, (1, 14))
    for n in (5, 14):  # below and past the switch
        torch.testing.assert_close(model(tokens[:, :n]), ref(tokens[:, :n]).logits, atol=ATOL, rtol=0)
    batch = torch.cat([torch.zeros(1, 9, dtype=torch.long), tokens[:, :5]], 1)  # left-padded short row
    mask = (batch != 0).long()
    got = model(torch.cat([batch, tokens]), attention_mask=torch.cat([mask, torch.ones_like(mask)]))
    torch.testing.assert_close(got[0, 9:], ref(tokens[:, :5]).logits[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], ref(tokens).logits[0], atol=ATOL, rtol=0)
    prompt = tokens[0, :5].tolist()
    want = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, pad_token_id=0)[0, 5:].tolist()
    assert _greedy(model, prompt, 8) == want


# ------------------------------------------------------------------------------------------------ checkpoints


@torch.no_grad()
def test_multimodal_text_decoders_load_from_both_tensor_layouts(tmp_path):
    """transformers writes (and the Hub holds) language_model.model.* with Mistral 3's head at
    language_model.lm_head; checkpoints saved from transformers 4.52-4.57's in-memory layout say model.language_model.*
    and lm_head. Both load; the vision tower and projector are skipped."""
    for arch in ("Gemma3ForConditionalGeneration", "Mistral3ForConditionalGeneration"):
        torch.manual_seed(0)
        ref = make_tiny_hf_model(arch, tmp_path / arch)
        file = tmp_path / arch / "model.safetensors"
        tensors = load_file(file)
        assert any(k.startswith("language_model.model.") for k in tensors)
        assert any(k.startswith("vision_tower.") for k in tensors)
        tokens = torch.randint(0, 128, (2, 9))
        torch.testing.assert_close(load_hf(tmp_path / arch, progress=False)(tokens), ref(tokens).logits, atol=ATOL,
                                   rtol=0)
        renamed = {k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.",
                   "lm_head.").replace("vision_tower.", "model.vision_tower.")
                   .replace("multi_modal_projector.", "model.multi_modal_projector."): v for k, v in tensors.items()}
        save_file(renamed, file, metadata={"format": "pt"})
        torch.testing.assert_close(load_hf(tmp_path / arch, progress=False)(tokens), ref(tokens).logits, atol=ATOL,
                                   rtol=0)


def test_gemma3_transformers4_keys_equal_transformers5_keys(tmp_path):
    """sliding_window_pattern + rope_local_base_freq + rope_scaling (transformers 4.x) read as layer_types + nested
    rope_parameters (5.x)."""
    torch.manual_seed(0)
    make_tiny_hf_model("Gemma3ForCausalLM", tmp_path, num_hidden_layers=6, layer_types=None)
    v5 = json.loads((tmp_path / "config.json").read_text())
    assert v5["layer_types"][5] == "full_attention" and isinstance(v5["rope_parameters"]["full_attention"], dict)
    v4 = {k: v for k, v in v5.items() if k not in ("layer_types", "rope_parameters")}
    v4.update(sliding_window_pattern=6, rope_theta=1e6, rope_local_base_freq=1e4,
              rope_scaling={"rope_type": "linear", "factor": 4.0})
    cfg = config_from_hf(v5)
    assert config_from_hf(v4) == cfg
    assert cfg.sliding_window_layers == (0, 1, 2, 3, 4) and cfg.rope_local_theta == 1e4
    assert cfg.layer_rope(5) == "global" and cfg.layer_rope(0) == "local" and cfg.rope_scaling.factor == 4.0


def _refusal(hf: dict, match: str):
    with pytest.raises(CheckpointError, match=match) as e:
        config_from_hf(hf)
    assert "\n" not in str(e.value)


def test_what_cannot_be_expressed_is_refused_in_one_line(tmp_path):
    base = dict(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    llama = dict(base, architectures=["LlamaForCausalLM"])
    _refusal(dict(llama, rope_scaling={"rope_type": "yarn", "factor": 2.0, "magic": 1}), r"rope_scaling\.magic is not")
    _refusal(dict(llama, rope_scaling={"rope_type": "longrope", "short_factor": [1.0]}), "longrope")
    _refusal(dict(base, architectures=["Gemma2ForCausalLM"], layer_types=["sliding_attention", "chunked_attention"]),
             r"layer_types\[1\]='chunked_attention' is not supported")
    _refusal(dict(base, architectures=["Qwen3ForCausalLM"], use_sliding_window=True, sliding_window=4,
                  layer_types=["full_attention", "hybrid"]), r"layer_types\[1\]='hybrid'")
    _refusal(dict(base, architectures=["Gemma2ForCausalLM"], use_bidirectional_attention=True), "bidirectional")
    _refusal(dict(base, architectures=["Gemma3ForCausalLM"], attn_logit_softcapping=50.0), "attn_logit_softcapping")
    _refusal(dict(architectures=["Gemma3ForConditionalGeneration"], text_config=dict(base, final_logit_softcapping=30.0)),
             "final_logit_softcapping")
    _refusal(dict(base, architectures=["SmolLM3ForCausalLM"], no_rope_layers=[1]), "no_rope_layers")
    _refusal(dict(architectures=["Mistral3ForConditionalGeneration"], vision_config={}), "no text_config")
    _refusal(dict(architectures=["T5ForConditionalGeneration"], is_encoder_decoder=True, model_type="t5"),
             "'T5ForConditionalGeneration' is an encoder-decoder checkpoint")
    _refusal(dict(architectures=["SiglipVisionModel"], model_type="siglip_vision_model"), "vision-only checkpoint")
    _refusal(dict(architectures=["LlavaForConditionalGeneration"], vision_config={}, text_config={}, model_type="llava"),
             "unknown architecture 'LlavaForConditionalGeneration'")


def test_saving_a_new_family_flag_under_an_arch_without_it_is_refused(tmp_path):
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, qk_norm="head")
    from lmforge.models import save_hf

    with pytest.raises(CheckpointError, match=r"LlamaForCausalLM cannot express qk_norm='head'.*Qwen3ForCausalLM"):
        save_hf(Transformer(cfg), tmp_path)
    cfg = cfg.model_copy(update={"arch": "Qwen3ForCausalLM", "final_logit_softcap": 30.0})
    with pytest.raises(CheckpointError, match="Qwen3ForCausalLM cannot express final_logit_softcap"):
        save_hf(Transformer(cfg), tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


# ------------------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@torch.no_grad()
def test_soft_capped_packed_rows_equal_separate_documents(backend):
    """Packed documents under Gemma 2's soft-capped, windowed attention: the dense mask (eager soft-capped path) and
    flex_attention's BlockMask with a score_mod give each document what it gets alone."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      norm_placement="sandwich", attn_scale=0.4, attn_logit_softcap=0.3, final_logit_softcap=2.0,
                      sliding_window=3, sliding_window_layers=(0,))
    model = Transformer(cfg).eval()
    for p in model.parameters():
        p.normal_(0, 0.3)  # scores large enough that the cap matters
    model.attention_backend = backend
    a, b = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 4))
    packed = torch.cat([a, b], 1)
    docs = torch.tensor([[0] * 5 + [1] * 4])
    positions = torch.tensor([list(range(5)) + list(range(4))])
    out = model(packed, positions, document_ids=docs)
    torch.testing.assert_close(out[:, :5], model(a), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 5:], model(b), atol=1e-5, rtol=0)
    uncapped = Transformer(cfg.model_copy(update={"attn_logit_softcap": None})).eval()
    uncapped.load_state_dict(model.state_dict())
    assert (uncapped(a) - model(a)).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------ lifecycle


@pytest.fixture(scope="module")
def sft_rows(tmp_path_factory):
    rows = [{"messages": [{"role": "user", "content": f"count {i}: " + "alpha beta gamma"[: 5 + i % 11]},
                          {"role": "assistant", "content": f"done {i % 3}"}]} for i in range(24)]
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Olmo2ForCausalLM",
                                  "SmolLM3ForCausalLM"])
def test_lora_training_run_lowers_the_loss_and_its_adapter_loads_in_peft(arch, sft_rows, tmp_path):
    """`lmforge train` with LoRA on each new family (q/k-norms, soft-capped logits through the checkpointed loss,
    post-norms, NoPE layers): the loss goes down, and peft applies the written adapter to transformers' model with
    the same logits lmforge gets."""
    import peft
    from transformers import AutoModelForCausalLM

    from lmforge.cli import main
    from lmforge.peft import load_peft_adapter
    from lmforge.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "base", arch=arch, vocab_size=300)
    out = tmp_path / "run"
    cfg = tmp_path / "lora.yaml"
    cfg.write_text(f"model: {{path: {ckpt}}}\ndata: {{path: {sft_rows}, max_seq_len: 48}}\noptim: {{lr: 1.0e-2}}\n"
                   "method: lora\nlora: {r: 4, alpha: 8, target_modules: all-linear}\n"
                   f"train: {{output_dir: {out}, max_steps: 6, micro_batch_size: 6, device: cpu, progress: false, "
                   "tensorboard: false}\n")
    assert main(["train", str(cfg)]) == 0
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1, losses
    adapter = out / "final"
    model = load_hf(ckpt, progress=False)
    load_peft_adapter(model, adapter)
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt), adapter).eval()
    tokens = torch.randint(3, 300, (2, 10))
    with torch.no_grad():
        lm, hf = model.eval()(tokens), ref(tokens).logits
    torch.testing.assert_close(lm, hf, atol=ATOL, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    assert (base(tokens).logits - hf).abs().max() > 1e-3  # the adapter changed the model


def test_gguf_export_refuses_block_variants_llama_cpp_llama_arch_lacks(tmp_path):
    """A LlamaForCausalLM exports as llama.cpp's 'llama' architecture: a model with qk-norm, sandwich norms, soft-caps
    or dynamic RoPE would load there as a different model, so it is refused, naming the fields."""
    from lmforge.errors import ConfigError
    from lmforge.quant.gguf_export import export_gguf

    for fields, named in ((dict(qk_norm="head"), "qk_norm='head'"),
                          (dict(norm_placement="sandwich", attn_logit_softcap=50.0), "norm_placement='sandwich'"),
                          (dict(rope_scaling=dict(type="dynamic", factor=4.0)), "rope_scaling.type='dynamic'")):
        model = Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, **fields))
        with pytest.raises(ConfigError, match=named):
            export_gguf(model, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
