"""The native decoder on its own: config validation, presets, variants, KV cache for every position scheme."""
from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.models import ModelConfig, PRESETS, Transformer, preset_config
from lmforge.models.positions import alibi_slopes, rope_inv_freq

# Published parameter counts of the checkpoints the presets describe.
PUBLISHED_PARAMS = {
    "llama-3-8b": 8_030_261_248, "llama-3.2-1b": 1_235_814_400, "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512, "mistral-7b": 7_248_023_552, "tinyllama-1.1b": 1_100_048_384,
    "gpt2": 124_439_808, "bloom-560m": 559_214_592, "mixtral-8x7b": 46_702_792_704,
    "qwen1.5-moe-a2.7b": 14_315_784_192, "chatglm3-6b": 6_243_584_000, "glm-4-9b": 9_399_951_360,
    "gemma-2b": 2_506_172_416, "gemma-7b": 8_537_680_896, "phi-2": 2_779_683_840, "phi-3-mini-4k": 3_821_079_552,
    # The 2024-25 families: each count computed from the repo's config.json (the preset), cross-checked with the
    # published figures below and the Hub's safetensors totals: Qwen3-8B 8.19B, gemma-2-2b 2.61B, gemma-3-1b-pt
    # 1.00B, OLMo-2-0425-1B 1.48B, SmolLM3-3B 3.08B, phi-4 14.7B. Qwen3-0.6B ties its head (the Hub's 752M counts the
    # stored copy); gemma-3-4b and Mistral-Small-3.1 are the text decoders of multimodal checkpoints (gemma-3-4b:
    # 4,300,079,472 on the Hub = this + a 416.9M SigLIP tower + a 2.95M projector).
    "qwen3-0.6b": 596_049_920, "qwen3-8b": 8_190_735_360, "gemma-2-2b": 2_614_341_888, "gemma-3-1b": 999_885_952,
    "gemma-3-4b": 3_880_263_168, "olmo-2-1b": 1_484_916_736, "smollm3-3b": 3_075_098_624, "phi-4": 14_659_507_200,
    "mistral-small-3.1-24b": 23_572_403_200,
}
# Published non-embedding counts, in millions: Qwen3 model cards (0.44B, 6.95B), the Gemma 2 report (2B: 2,024,517,888
# exactly) and the Gemma 3 report's table 1 (1B: 698M, 4B: 3,209M).
PUBLISHED_NON_EMBEDDING_M = {"qwen3-0.6b": 440, "qwen3-8b": 6950, "gemma-2-2b": 2024.517888, "gemma-3-1b": 698,
                             "gemma-3-4b": 3209}
# Published "active" sizes of the MoE presets (parameters one token uses), in billions.
PUBLISHED_ACTIVE_B = {"mixtral-8x7b": 12.9, "qwen1.5-moe-a2.7b": 2.7}
# MoE presets published as rounded totals / active counts (billions), with the precision they are published at.
# Vendors count "active" two ways: with the input embedding table ("with") or without it ("without": only the rows
# a token reads, as OpenAI's gpt-oss card, which matches to 0.01B). Sources: DeepSeek-V3 technical report
# (arXiv 2412.19437: 671B total, 37B activated), Kimi-K2 model card (1T total, 32B activated), GLM-4.5 report / model
# card (Air: 106B total, 12B active), Qwen3 model card (30.5B total, 3.3B activated), gpt-oss model card (20.91B /
# 3.61B; 116.83B / 5.13B), Llama 4 model cards (Scout 17B active, 109B total with the vision encoder, which lmforge
# does not build: the text decoder is ~1.2B less; Maverick 17B active, 400B total).
PUBLISHED_MOE_B = {  # name: (total, active, precision, active counts the input embedding)
    "deepseek-v3": (671, 37, 1, False), "kimi-k2": (1000, 32, 50, False), "glm-4.5-air": (106, 12, 1, False),
    "qwen3-30b-a3b": (30.5, 3.3, 0.1, True), "gpt-oss-20b": (20.91, 3.61, 0.01, False),
    "gpt-oss-120b": (116.83, 5.13, 0.01, False), "llama-4-scout-17b-16e": (109, 17, 1.5, True),
    "llama-4-maverick-17b-128e": (400, 17, 1, True),
}


def _built_params(cfg) -> int:
    """Parameters + persistent buffers of the model `cfg` builds (on meta). Large MoE models are counted block by
    block, one block per distinct layer kind (building 61 x 256 experts at once takes ~15 s)."""
    from lmforge.models.transformer import Block

    if cfg.moe_experts * cfg.n_layers <= 1000:
        with torch.device("meta"):
            return sum(t.numel() for t in Transformer(cfg).state_dict().values())
    with torch.device("meta"):
        outside = Transformer(cfg.model_copy(update={"n_layers": 1, "mlp": "swiglu", "moe_experts": 0,
                                                     "moe_shared_d_ff": 0, "moe_dense_layers": (), "nope_layers": (),
                                                     "attn_chunk_layers": None, "sliding_window_layers": None,
                                                     "moe_groups": 1, "moe_topk_groups": 1, "moe_score_bias": False,
                                                     "moe_router": "softmax", "attn_temperature_tuning": False}))
        first_block = sum(t.numel() for t in outside.layers[0].state_dict().values())
        total = sum(t.numel() for t in outside.state_dict().values()) - first_block
        kinds: dict = {}
        for i in range(cfg.n_layers):
            key = (cfg.is_moe_layer(i), cfg.layer_rope(i) is None)
            if key not in kinds:
                kinds[key] = sum(t.numel() for t in Block(cfg, i, lambda n, a, b, bias: torch.nn.Linear(a, b, bias))
                                 .state_dict().values())
            total += kinds[key]
    return total


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_published_parameter_counts(name):
    cfg = preset_config(name)
    assert _built_params(cfg) == cfg.num_params()  # the formula counts what the model holds
    if name in PUBLISHED_MOE_B:
        total, active, precision, with_embedding = PUBLISHED_MOE_B[name]
        assert abs(cfg.num_params() / 1e9 - total) <= precision
        ours = cfg.num_params(active=True) - (0 if with_embedding else cfg.vocab_size * cfg.d_model)
        assert abs(ours / 1e9 - active) <= precision
        return
    assert cfg.num_params() == PUBLISHED_PARAMS[name]
    if name in PUBLISHED_NON_EMBEDDING_M:
        want = PUBLISHED_NON_EMBEDDING_M[name]
        assert cfg.num_params(include_embeddings=False) / 1e6 == pytest.approx(want, abs=0.5 if want < 1000 else 5)
    if name in PUBLISHED_ACTIVE_B:
        assert round(cfg.num_params(active=True) / 1e9, 1) == PUBLISHED_ACTIVE_B[name]


def test_unknown_preset_suggests_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'llama-3.2-1b'"):
        preset_config("llama-3.2-1")


def test_bad_head_layout_is_rejected():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelConfig(d_model=64, n_heads=4, n_kv_heads=3)


VARIANTS = {
    "mha_rope": dict(n_kv_heads=4),
    "gqa_rope": dict(n_kv_heads=2),
    "mqa_rope": dict(n_kv_heads=1),
    "rope_linear": dict(rope_scaling=dict(type="linear", factor=4.0)),
    "partial_interleaved_rope": dict(rotary_fraction=0.5, rope_interleaved=True),
    "alibi": dict(pos="alibi", norm="layer", mlp="gelu", act="gelu_tanh"),
    "alibi_gqa": dict(pos="alibi", n_kv_heads=2),
    "learned": dict(pos="learned", norm="layer", mlp="gelu", act="gelu", qkv_bias=True, out_bias=True),
    "sinusoidal": dict(pos="sinusoidal", tie_embeddings=True),
    "sliding_window": dict(sliding_window=3),
    "per_layer_window": dict(sliding_window=3, sliding_window_layers=(1,)),
    "moe": dict(mlp="moe", moe_experts=4, moe_top_k=2, moe_shared_d_ff=16, moe_shared_gate=True),
    "gemma": dict(norm_weight_offset=1.0, scale_embeddings=True, act="gelu_tanh", head_dim=16, n_kv_heads=1),
    "phi_parallel": dict(parallel_block=True, norm="layer", mlp="gelu", rotary_fraction=0.5, qkv_bias=True,
                         out_bias=True, mlp_bias=True, lm_head_bias=True),
    "qk_norm_head": dict(qk_norm="head", head_dim=16, n_kv_heads=2),
    "post_norm_qk_proj": dict(norm_placement="post", qk_norm="proj", n_kv_heads=2),
    "sandwich_softcaps": dict(norm_placement="sandwich", attn_scale=0.3, attn_logit_softcap=0.5,
                              final_logit_softcap=1.0, sliding_window=3, sliding_window_layers=(0,)),
    "local_global_rope_nope": dict(sliding_window=3, sliding_window_layers=(0,), rope_local_theta=100.0,
                                   rope_scaling=dict(type="linear", factor=2.0), nope_layers=(1,), n_layers=3),
    "yarn": dict(rope_scaling=dict(type="yarn", factor=4.0, original_max_seq_len=8)),
    "longrope": dict(rope_scaling=dict(type="longrope", original_max_seq_len=2, short_factor=[1.0, 2.0, 3.0, 4.0],
                                       long_factor=[1.0, 3.0, 5.0, 7.0])),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@torch.no_grad()
def test_cached_decoding_matches_full_forward(variant):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32),
                         **VARIANTS[variant]})
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, 50, (2, 9))
    full = model(tokens)
    cache = model.new_cache(2, 12)
    steps = [model(tokens[:, :4], cache=cache, slots=torch.arange(4))]
    steps += [model(tokens[:, t:t + 1], cache=cache, slots=torch.tensor([t])) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_left_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)).eval()
    seq = torch.randint(0, 50, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    out = model(padded, attention_mask=mask)
    assert torch.isfinite(out).all()  # padding rows never see an empty key set
    torch.testing.assert_close(out[:, 3:], model(seq), atol=1e-5, rtol=0)


@torch.no_grad()
def test_right_padded_rows_take_plain_causal_attention(monkeypatch):
    """Training batches (positions 0..n-1, then -1 padding) need no mask: SDPA's is_causal, same real-token outputs."""
    from lmforge.models import attention, transformer
    from lmforge.models.attention import plain_causal

    pos = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, -1, -1]])
    assert plain_causal(pos)
    assert not plain_causal(torch.tensor([[-1, 0, 1, 2, 3]]))  # left padding
    assert not plain_causal(torch.tensor([[0, 1, 2, 0, 1]]))  # restarted positions (packed documents)
    assert not plain_causal(torch.tensor([[0, 1, -1, 3, 4]]))  # a real token after a pad
    assert not plain_causal(torch.tensor([[1, 2, 3, 4, 5]]))  # shifted (virtual prefix tokens)

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)).eval()
    tokens = torch.randint(0, 50, (2, 5))
    masks = []
    real_attend = attention.attend
    monkeypatch.setattr(transformer, "attend",
                        lambda q, k, v, mask, *a: masks.append(mask) or real_attend(q, k, v, mask, *a))
    out = model(tokens, positions=pos)
    assert masks and all(m is None for m in masks)  # is_causal, no (B, 1, T, S) mask built
    monkeypatch.setattr(transformer, "plain_causal", lambda positions: False)  # force the position mask
    masks.clear()
    dense = model(tokens, positions=pos)
    assert masks and all(isinstance(m, torch.Tensor) for m in masks)
    torch.testing.assert_close(out[0], dense[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :3], dense[1, :3], atol=1e-5, rtol=0)  # padding outputs are nobody's


def test_sliding_window_limits_what_a_token_sees():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, d_ff=64, sliding_window=2)
    model = Transformer(cfg).eval()
    a = torch.randint(0, 50, (1, 6))
    b = a.clone()
    b[0, 0] = (a[0, 0] + 1) % 50  # outside the last token's window (one layer)
    with torch.no_grad():
        torch.testing.assert_close(model(a)[:, -1], model(b)[:, -1])
        assert not torch.allclose(model(a)[:, 1], model(b)[:, 1])


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
    plain = rope_inv_freq(ModelConfig(d_model=2048, n_heads=32, rope_theta=500000.0))
    scaled = rope_inv_freq(preset_config("llama-3.2-1b"))
    assert torch.equal(scaled[:8], plain[:8])  # short wavelengths untouched
    torch.testing.assert_close(scaled[-4:], plain[-4:] / 32)  # long wavelengths divided by the factor


def test_alibi_slopes_for_non_power_of_two_heads():
    s = alibi_slopes(12)
    assert s.shape == (12,)
    torch.testing.assert_close(s[:8], torch.tensor([2 ** (-(i + 1)) for i in range(8)], dtype=torch.float32))
    torch.testing.assert_close(s[8:], torch.tensor([2 ** (-0.5 * (2 * i + 1)) for i in range(4)], dtype=torch.float32))


def test_linear_factory_sees_every_projection_by_name():
    seen = []

    def linear(name, i, o, bias):
        seen.append(name)
        return torch.nn.Linear(i, o, bias=bias)

    Transformer(ModelConfig(vocab_size=10, d_model=16, n_layers=2, n_heads=2, d_ff=32), linear=linear)
    assert "layers.1.attn.q_proj" in seen and "layers.0.mlp.gate_proj" in seen and "lm_head" in seen
    assert len(seen) == 2 * 7 + 1


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@torch.no_grad()
def test_packed_rows_equal_separate_documents(backend):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)).eval()
    model.attention_backend = backend
    a, b = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 4))
    row = torch.cat([a, b, torch.zeros(1, 2, dtype=torch.long)], 1)  # two documents + two padding slots
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, -1, -1]])
    docs = torch.tensor([[0] * 5 + [1] * 4 + [-1] * 2])
    packed = model(row, positions, document_ids=docs)
    torch.testing.assert_close(packed[:, :5], model(a), atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[:, 5:9], model(b), atol=1e-5, rtol=0)
    assert torch.isfinite(packed).all()


def test_activation_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=4, n_heads=4, d_ff=64)).train()
    tokens = torch.randint(0, 50, (2, 8))

    def grads(every):
        model.zero_grad()
        model.checkpoint_every = every
        model(tokens).logsumexp(-1).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for g0, g1 in zip(grads(0), grads(2)):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=0)


def test_per_layer_windows_apply_only_to_their_layers():
    torch.manual_seed(0)
    base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, sliding_window=2)
    a = torch.randint(0, 50, (1, 6))
    b = a.clone()
    b[0, 0] = (a[0, 0] + 1) % 50
    outs = {}
    for name, layers in (("all", None), ("first", (0,)), ("second", (1,))):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**base, sliding_window_layers=layers)).eval()
        with torch.no_grad():
            outs[name] = (model(a)[:, -1], model(b)[:, -1])
    # two windowed layers of width 2 reach 2 tokens back: token 0 cannot influence token 5
    torch.testing.assert_close(*outs["all"])
    # one full-attention layer lets token 0 through
    assert not torch.allclose(*outs["first"]) and not torch.allclose(*outs["second"])
    with pytest.raises(ValueError, match="sliding_window_layers is set but sliding_window is not"):
        ModelConfig(**{**base, "sliding_window": None}, sliding_window_layers=(0,))


@torch.no_grad()
def test_gemma_norm_offset_and_embedding_scale():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=36, n_layers=1, n_heads=2, d_ff=64, norm_weight_offset=1.0,
                      scale_embeddings=True)
    model = Transformer(cfg)
    assert torch.count_nonzero(model.norm.weight) == 0  # (1 + 0): fresh norms are the identity scale
    x = torch.randn(3, 36)
    model.norm.weight.normal_()
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * (1 + model.norm.weight)
    torch.testing.assert_close(model.norm(x), want)
    model.layers[0].attn.o_proj.weight.zero_()
    model.layers[0].mlp.down_proj.weight.zero_()  # the residual stream is then the scaled embedding
    tokens = torch.tensor([[3, 7]])
    hidden = model.norm(model.embed(tokens) * 6.0)  # sqrt(36)
    torch.testing.assert_close(model.hidden_states(tokens), hidden)


def test_saving_as_an_arch_that_cannot_express_a_flag_is_a_one_line_error(tmp_path):
    from lmforge.errors import CheckpointError
    from lmforge.models import save_hf

    cases = [
        (dict(mlp="moe", moe_experts=2), "LlamaForCausalLM", "mlp='moe'.*MixtralForCausalLM"),
        (dict(norm_weight_offset=1.0), "MistralForCausalLM", "norm_weight_offset=1.0.*GemmaForCausalLM"),
        (dict(parallel_block=True), "Qwen2ForCausalLM", "parallel_block=True.*PhiForCausalLM"),
        (dict(sliding_window=4, sliding_window_layers=(0,)), "MistralForCausalLM", "sliding_window_layers"),
        (dict(rope_interleaved=True, rotary_fraction=0.5), "LlamaForCausalLM", "rotary_fraction=0.5"),
        (dict(mlp="moe", moe_experts=2, moe_shared_d_ff=8), "MixtralForCausalLM", "no shared expert"),
        (dict(mlp="moe", moe_experts=2, qkv_bias=True), "Qwen2MoeForCausalLM", "gated shared expert"),
    ]
    for fields, arch, match in cases:
        model = Transformer(ModelConfig(arch=arch, vocab_size=16, d_model=16, n_layers=1, n_heads=2, d_ff=32, **fields))
        with pytest.raises(CheckpointError, match=match) as e:
            save_hf(model, tmp_path / "x")
        assert "\n" not in str(e.value)
    assert not (tmp_path / "x" / "config.json").exists()  # nothing written


@torch.no_grad()
def test_rolling_cache_for_sliding_window_models_matches_the_full_forward():
    from lmforge.models import RollingKVCache

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                    sliding_window=4)).eval()
    tokens = torch.randint(0, 50, (2, 24))
    positions = torch.arange(24).expand(2, 24).clone()
    positions[1, :2] = -1  # a left-padded row
    full = model(tokens, positions)
    cache = RollingKVCache(model.cfg, 2, window=4, chunk=3)  # ring of 6 slots for 24 positions
    assert cache.max_len == 6
    steps = [model(tokens[:, :9], positions[:, :9], cache=cache, slots=torch.arange(9))]  # longer than the ring
    steps += [model(tokens[:, 9:12], positions[:, 9:12], cache=cache, slots=torch.arange(9, 12))]  # a 3-token chunk
    steps += [model(tokens[:, t:t + 1], positions[:, t:t + 1], cache=cache, slots=torch.tensor([t]))
              for t in range(12, 24)]  # decode: the ring wraps twice
    torch.testing.assert_close(torch.cat(steps, 1)[positions >= 0], full[positions >= 0], atol=1e-5, rtol=0)
    # generate() asks the model for its cache: long outputs of an all-windowed model get the ring automatically
    assert isinstance(model.new_cache(1, 4096), RollingKVCache) and model.new_cache(1, 4096).k.shape[3] == 4 + 63
    assert not isinstance(model.new_cache(1, 32), RollingKVCache)
