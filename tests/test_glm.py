"""ChatGLM2/3 (custom-code `ChatGLMModel` checkpoints) against a reference forward written from the published
architecture, both directions; GLM chat formats; prefix-LM attention (GLM's bidirectional prompt)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lmforge.models import ModelConfig, Transformer, load_hf, preset_config, save_hf
from lmforge.tokenizer import get_template, render_chat_template

ATOL = 1e-4

# A scaled-down chatglm3-6b config.json (same keys as the released one; 2 query groups shared by 4 heads).
CHATGLM_CONFIG = {
    "architectures": ["ChatGLMModel"], "model_type": "chatglm", "add_bias_linear": False, "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True, "apply_residual_connection_post_layernorm": False,
    "attention_softmax_in_fp32": True, "ffn_hidden_size": 96, "fp32_residual_connection": False,
    "hidden_size": 64, "kv_channels": 16, "layernorm_epsilon": 1e-5, "multi_query_attention": True,
    "multi_query_group_num": 2, "num_attention_heads": 4, "num_layers": 2, "original_rope": True,
    "padded_vocab_size": 128, "post_layer_norm": True, "rmsnorm": True, "seq_length": 256, "rope_ratio": 2,
    "tie_word_embeddings": False, "torch_dtype": "float32", "eos_token_id": 2, "pad_token_id": 0,
}


def chatglm_reference(sd: dict[str, torch.Tensor], c: dict, tokens: torch.Tensor) -> torch.Tensor:
    """ChatGLM2/3 forward from the published design, on checkpoint-named tensors: RMSNorm pre-norm blocks; one fused
    query_key_value linear (with bias) giving q | k | v for `multi_query_group_num` key/value groups; rotary on the
    first half of each head's dims, rotating adjacent pairs (2i, 2i+1) by position * base^(-2i/(head_dim/2)) with
    base = 10000 * rope_ratio; causal softmax(q k^T / sqrt(head_dim)); dense_h_to_4h = [gate | up] with SwiGLU;
    final RMSNorm; output_layer. Written independently of lmforge's modules."""
    nh, hd, g, eps = c["num_attention_heads"], c["kv_channels"], c["multi_query_group_num"], c["layernorm_epsilon"]
    B, T = tokens.shape
    rms = lambda t, w: w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps))  # noqa: E731
    rot = hd // 2
    theta = 1.0 / ((10000.0 * c.get("rope_ratio", 1)) ** (torch.arange(0, rot, 2).float() / rot))  # (rot/2,)
    angle = torch.arange(T).float()[:, None] * theta  # (T, rot/2)
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]  # broadcast over (B, T, heads, rot/2)

    def rope(t):  # (B, T, heads, hd)
        pairs = t[..., :rot].reshape(B, T, t.shape[2], rot // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)
        return torch.cat([rotated, t[..., rot:]], -1)

    x = sd["transformer.embedding.word_embeddings.weight"][tokens]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(c["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        qkv = h @ sd[p + "self_attention.query_key_value.weight"].T + sd[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([nh * hd, g * hd, g * hd], -1)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, g, hd), v.view(B, T, g, hd)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // g, dim=2), v.repeat_interleave(nh // g, dim=2)  # head j uses group j // (nh/g)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~causal, float("-inf")).softmax(-1), v)
        x = x + attn.reshape(B, T, nh * hd) @ sd[p + "self_attention.dense.weight"].T
        gate, up = (rms(x, sd[p + "post_attention_layernorm.weight"]) @ sd[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.dense_4h_to_h.weight"].T
    return rms(x, sd["transformer.encoder.final_layernorm.weight"]) @ sd["transformer.output_layer.weight"].T


def _random_chatglm_checkpoint(path, c=CHATGLM_CONFIG) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    d, nh, hd, g, f, V = (c[k] for k in ("hidden_size", "num_attention_heads", "kv_channels", "multi_query_group_num",
                                         "ffn_hidden_size", "padded_vocab_size"))
    qkv = (nh + 2 * g) * hd
    sd = {"transformer.embedding.word_embeddings.weight": torch.randn(V, d),
          "transformer.rotary_pos_emb.inv_freq": torch.zeros(hd // 4),  # stored by real checkpoints; derived
          "transformer.encoder.final_layernorm.weight": torch.rand(d) + 0.5,
          "transformer.output_layer.weight": torch.randn(V, d) * 0.1}
    for i in range(c["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        sd.update({p + "input_layernorm.weight": torch.rand(d) + 0.5, p + "post_attention_layernorm.weight": torch.rand(d) + 0.5,
                   p + "self_attention.query_key_value.weight": torch.randn(qkv, d) * 0.1,
                   p + "self_attention.query_key_value.bias": torch.randn(qkv) * 0.5,
                   p + "self_attention.dense.weight": torch.randn(d, nh * hd) * 0.1,
                   p + "mlp.dense_h_to_4h.weight": torch.randn(2 * f, d) * 0.1,
                   p + "mlp.dense_4h_to_h.weight": torch.randn(d, f) * 0.1})
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(c))
    return sd


@torch.no_grad()
def test_chatglm_checkpoint_loads_and_matches_the_reference(tmp_path):
    sd = _random_chatglm_checkpoint(tmp_path / "glm")
    model = load_hf(tmp_path / "glm", progress=False)
    cfg = model.cfg
    assert (cfg.kv_heads, cfg.dim_per_head, cfg.rotary_dim, cfg.rope_theta) == (2, 16, 8, 20000.0)
    assert cfg.rope_interleaved and cfg.qkv_bias and not cfg.out_bias and cfg.stop_token_ids == [2]
    tokens = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    want = chatglm_reference(sd, CHATGLM_CONFIG, tokens)
    assert want.std() > 0.1
    torch.testing.assert_close(model(tokens), want, atol=ATOL, rtol=0)
    # cached decoding gives the same logits
    cache = model.new_cache(2, 16)
    steps = [model(tokens[:, :5], cache=cache, slots=torch.arange(5))]
    steps += [model(tokens[:, t:t + 1], cache=cache, slots=torch.tensor([t])) for t in range(5, 11)]
    torch.testing.assert_close(torch.cat(steps, 1), want, atol=ATOL, rtol=0)


@torch.no_grad()
def test_saved_chatglm_checkpoint_matches_the_reference_and_reloads(tmp_path):
    torch.manual_seed(0)
    cfg = preset_config("chatglm3-6b", vocab_size=128, d_model=64, n_layers=2, n_heads=4, head_dim=16, d_ff=96,
                        rope_theta=30000.0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # random norms and biases so the mapping of every tensor is checked
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.5)
    out = save_hf(model, tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["ChatGLMModel"] and config["multi_query_group_num"] == 2
    assert config["rope_ratio"] == 3.0 and config["add_qkv_bias"] and not config["add_bias_linear"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_chatglm.ChatGLMForConditionalGeneration"
    sd = load_file(str(out / "model.safetensors"))
    assert sd["transformer.encoder.layers.1.self_attention.query_key_value.weight"].shape == ((4 + 2 * 2) * 16, 64)
    inv_freq = 1.0 / (30000.0 ** (torch.arange(0, 8, 2).float() / 8))
    torch.testing.assert_close(sd["transformer.rotary_pos_emb.inv_freq"], inv_freq)
    tokens = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(chatglm_reference(sd, config, tokens), model(tokens), atol=ATOL, rtol=0)
    back = load_hf(out, progress=False)
    assert back.cfg == model.cfg
    torch.testing.assert_close(back(tokens), model(tokens), atol=1e-6, rtol=0)


def test_chatglm_variants_lmforge_cannot_run_are_one_line_errors(tmp_path):
    _random_chatglm_checkpoint(tmp_path)
    from lmforge.errors import CheckpointError

    for key, value in (("rmsnorm", False), ("original_rope", False), ("apply_residual_connection_post_layernorm", True)):
        (tmp_path / "config.json").write_text(json.dumps({**CHATGLM_CONFIG, key: value}))
        with pytest.raises(CheckpointError, match=f"config.json {key}=") as e:
            load_hf(tmp_path, progress=False)
        assert "\n" not in str(e.value)


def test_glm_presets_describe_the_released_shapes():
    chatglm, glm4 = preset_config("chatglm3-6b"), preset_config("glm-4-9b")
    assert chatglm.rotary_dim == glm4.rotary_dim == 64 and chatglm.kv_heads == glm4.kv_heads == 2
    assert chatglm.num_params() == 6_243_584_000 and glm4.num_params() == 9_399_951_360


# ------------------------------------------------------------------------------------------------- chat formats


CHAT = [{"role": "system", "content": "S"}, {"role": "user", "content": "你好"}, {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"}]


def test_glm_chat_formats():
    assert render_chat_template(get_template("glm3"), CHAT, add_generation_prompt=True) == (
        "[gMASK]sop<|system|>\n S<|user|>\n 你好<|assistant|>\n A<|user|>\n V<|assistant|>")
    assert render_chat_template(get_template("glm4"), CHAT, add_generation_prompt=True) == (
        "[gMASK]<sop><|system|>\nS<|user|>\n你好<|assistant|>\nA<|user|>\nV<|assistant|>")
    assert render_chat_template(get_template("glm4"), CHAT[1:2]) == "[gMASK]<sop><|user|>\n你好"


# -------------------------------------------------------------------------------------------------- prefix LM


def _tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                   rotary_fraction=0.5, rope_interleaved=True, **kw)).eval()


@torch.no_grad()
def test_prefix_lm_prompt_is_bidirectional_and_the_answer_causal():
    model = _tiny()
    a = torch.randint(0, 50, (1, 8))
    prefix = torch.tensor([5])
    b = a.clone()
    b[0, 4] = (a[0, 4] + 1) % 50  # a later prompt token
    c = a.clone()
    c[0, 6] = (a[0, 6] + 1) % 50  # an answer token
    out_a, out_b, out_c = (model(t, prefix_lengths=prefix) for t in (a, b, c))
    assert not torch.allclose(out_a[:, :4], out_b[:, :4])  # earlier prompt tokens see later prompt tokens
    torch.testing.assert_close(out_a[:, :6], out_c[:, :6])  # nothing sees a later answer token
    torch.testing.assert_close(model(a, prefix_lengths=torch.tensor([0])), model(a))  # empty prefix = causal
    torch.testing.assert_close(model(a, prefix_lengths=torch.tensor([1])), model(a))  # one token: nothing changes


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@torch.no_grad()
def test_prefix_lm_with_a_kv_cache_and_packed_rows():
    model = _tiny()
    tokens = torch.randint(0, 50, (2, 10))
    prefix = torch.tensor([4, 6])
    full = model(tokens, prefix_lengths=prefix)
    # prefill the prompt at once, then decode: the cache keeps prefix keys visible both ways
    cache = model.new_cache(2, 12)
    steps = [model(tokens[:, :6], cache=cache, slots=torch.arange(6), prefix_lengths=prefix)]
    steps += [model(tokens[:, t:t + 1], cache=cache, slots=torch.tensor([t]), prefix_lengths=prefix)
              for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    # packed: two documents, the prefix applies within each (positions restart per document)
    x, y = tokens[:1, :6], tokens[1:, :5]
    row = torch.cat([x, y], 1)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]])
    docs = torch.tensor([[0] * 6 + [1] * 5])
    for backend in ("sdpa", "flex"):
        model.attention_backend = backend
        packed = model(row, positions, document_ids=docs, prefix_lengths=torch.tensor([3]))
        torch.testing.assert_close(packed[:, :6], model(x, prefix_lengths=torch.tensor([3])), atol=1e-5, rtol=0)
        torch.testing.assert_close(packed[:, 6:], model(y, prefix_lengths=torch.tensor([3])), atol=1e-5, rtol=0)

