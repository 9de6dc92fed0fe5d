"""Tiny random reference models for tests, examples and benches, made by `transformers` (a dev dependency).

Lives in the package (not tests/) so `examples/` and the CLI quickstart can build the same fixtures offline.
"""
from __future__ import annotations

from pathlib import Path

import torch

GEMMA_SOFTCAPS = (0.05, 0.3)  # attention-score and logit caps of the tiny Gemma 2/3 (see tests: they clip)
_GEMMA3_TEXT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    intermediate_size=128, vocab_size=128, max_position_embeddings=128, query_pre_attn_scalar=24,
                    sliding_window=4, final_logit_softcapping=GEMMA_SOFTCAPS[1],
                    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})

_LLAMA4_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                    num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layers=[1, 0, 1, 0],
                    attention_chunk_size=4, floor_scale=4, attn_scale=0.5, max_position_embeddings=128,
                    initializer_range=0.1,
                    rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                     "rope_theta": 10000.0})

# Two layers, hidden 64: small enough for CPU tests, big enough to exercise GQA/MQA, biases and every position scheme.
TINY_HF_CONFIGS: dict[str, dict] = {
    "LlamaForCausalLM": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, vocab_size=128, max_position_embeddings=128,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "MistralForCausalLM": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                               intermediate_size=128, vocab_size=128, max_position_embeddings=128, sliding_window=6),
    "Qwen2ForCausalLM": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, vocab_size=128, max_position_embeddings=128,
                             tie_word_embeddings=True),
    "GPT2LMHeadModel": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128, bos_token_id=1,
                            eos_token_id=2),
    "BloomForCausalLM": dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=128),
    # Mixture of experts: 4 experts, top-2; Qwen2-MoE adds a gated shared expert, no top-k renormalization, a dense
    # layer (mlp_only_layers) and a sliding window on one layer.
    "MixtralForCausalLM": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=96, vocab_size=128, max_position_embeddings=128, num_local_experts=4,
                               num_experts_per_tok=2),
    "Qwen2MoeForCausalLM": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                                num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
                                vocab_size=128, max_position_embeddings=128, use_sliding_window=True,
                                sliding_window=5, layer_types=["full_attention", "sliding_attention", "full_attention"]),
    # Gemma: (1+w) RMSNorm, sqrt(d)-scaled embeddings, GeGLU, head_dim != d/heads, MQA, tied head.
    "GemmaForCausalLM": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                             head_dim=32, intermediate_size=128, vocab_size=128, max_position_embeddings=128),
    # Phi-2 layout: parallel attention + MLP, LayerNorm, partial rotary (half of 16 dims), biases, biased lm_head.
    "PhiForCausalLM": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           vocab_size=128, max_position_embeddings=128, partial_rotary_factor=0.5),
    # Phi-3: fused qkv_proj and gate_up_proj, GQA, a sliding window, longrope (Phi-3 128k) with a 2-token "original"
    # context, so every forward of the tests is a long one (long factors, attention factor sqrt(1 + ln 64 / ln 2)).
    "Phi3ForCausalLM": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=128, max_position_embeddings=128, sliding_window=7,
                            original_max_position_embeddings=2,
                            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                             "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                                             "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]},
                            pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # GLM-4: interleaved rotary on half of each head, q/k/v bias, fused gate_up_proj, GQA.
    "GlmForCausalLM": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, intermediate_size=128, vocab_size=128, max_position_embeddings=128,
                           pad_token_id=0, eos_token_id=2),
    # GLM-4-0414: GLM-4's block plus sandwich norms (post_self_attn_layernorm, post_mlp_layernorm), its tiny
    # default rms_norm_eps (1.5625e-07), head_dim != d/heads.
    "Glm4ForCausalLM": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=32, intermediate_size=128, vocab_size=128, max_position_embeddings=128,
                            pad_token_id=0, eos_token_id=2),
    # Qwen3: per-head qk-norm, head_dim != d/heads, q/k/v/o bias, tied head, a window on layer 1, yarn RoPE scaling
    # (factor 4 over a 16-token original context: most dims interpolate, cos/sin scaled by 1 + 0.1 ln 4).
    "Qwen3ForCausalLM": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=32, intermediate_size=128, vocab_size=128, max_position_embeddings=64,
                             tie_word_embeddings=True, attention_bias=True, use_sliding_window=True, sliding_window=5,
                             max_window_layers=1,
                             rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                              "original_max_position_embeddings": 16}),
    # Gemma 2: sandwich norms, query_pre_attn_scalar != head_dim, windows (4 < the tests' 12 tokens) on layers 0 and
    # 2, and soft-caps small enough to clip this model's scores and logits.
    "Gemma2ForCausalLM": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=32, intermediate_size=128, vocab_size=128, max_position_embeddings=128,
                              query_pre_attn_scalar=24, sliding_window=4, attn_logit_softcapping=GEMMA_SOFTCAPS[0],
                              final_logit_softcapping=GEMMA_SOFTCAPS[1]),
    # Gemma 3: Gemma 2's block + per-head qk-norm, sliding/global layers with their own RoPE (local 10k, global 1M
    # with linear scaling), a final soft-cap (transformers' Gemma 3 applies no attention soft-cap).
    "Gemma3ForCausalLM": dict(**_GEMMA3_TEXT),
    # The language model inside a multimodal Gemma 3 checkpoint (a tiny SigLIP tower, skipped on load; no final
    # soft-cap: transformers' multimodal class never applies one).
    "Gemma3ForConditionalGeneration": dict(
        text_config={**_GEMMA3_TEXT, "final_logit_softcapping": None},
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4),
    # OLMo 2: norms after attention / MLP, RMSNorm over the whole q and k projections, GQA.
    "Olmo2ForCausalLM": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, vocab_size=128, max_position_embeddings=128, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2),
    # SmolLM3: NoPE on every 4th layer (layer 3), windows on the NoPE layers, tied head, GQA.
    "SmolLM3ForCausalLM": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=128, vocab_size=128, max_position_embeddings=128,
                               use_sliding_window=True, sliding_window=5, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2),
    # Mistral Small 3.1's layout: a Mistral text decoder inside a Pixtral checkpoint (tiny vision tower, skipped).
    "Mistral3ForConditionalGeneration": dict(
        text_config=dict(model_type="mistral", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, intermediate_size=128, vocab_size=128,
                         max_position_embeddings=128, sliding_window=None, tie_word_embeddings=False),
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=16, image_size=28, patch_size=14),
        tie_word_embeddings=False),
    # DeepSeek-V3: MLA (low-rank q, a 16-dim kv latent, 8 interleaved RoPE dims of 24 q/k dims, 12 value dims) and a
    # sigmoid router over 8 experts in 4 groups, of which each token may use 2 groups (so some groups are excluded),
    # top-2, routed scale 2.5, a shared expert, one dense first layer; yarn RoPE whose mscale differs from
    # mscale_all_dim (so both the cos/sin factor and the softmax-scale correction act).
    "DeepseekV3ForCausalLM": dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                                  n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
                                  qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16, n_group=4, topk_group=2,
                                  num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=128,
                                  num_nextn_predict_layers=0, initializer_range=0.1,
                                  rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                   "original_max_position_embeddings": 16, "mscale": 1.0,
                                                   "mscale_all_dim": 0.7}),
    # gpt-oss: attention sinks, a 4-token window on even layers, q/k/v/o biases, a biased softmax router over 4
    # experts (top-2) with biased experts, the clamped SwiGLU with a limit low enough to clamp here, and yarn RoPE
    # without truncation (as released, over a 16-token original context).
    "GptOssForCausalLM": dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                              num_experts_per_tok=2, sliding_window=4, max_position_embeddings=128, swiglu_limit=1.0,
                              initializer_range=0.1,
                              rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                               "original_max_position_embeddings": 16, "beta_fast": 32.0,
                                               "beta_slow": 1.0, "truncate": False}),
    # GLM-4.5: DeepSeek-V3's sigmoid router (8 experts top-2, selection bias, routed scale 1.5) with a shared expert
    # and a dense first layer, q/k/v bias, per-head qk-norm and RoPE on half of each head.
    "Glm4MoeForCausalLM": dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                               routed_scaling_factor=1.5, first_k_dense_replace=1, use_qk_norm=True,
                               attention_bias=True, partial_rotary_factor=0.5, max_position_embeddings=128,
                               num_nextn_predict_layers=0, initializer_range=0.1),
    # Qwen3-MoE: per-head qk-norm, 8 experts top-2 renormalized, no shared expert, a dense layer (mlp_only_layers).
    "Qwen3MoeForCausalLM": dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                                max_position_embeddings=128, initializer_range=0.1),
    # Llama 4: MoE on layers 1 and 3 (4 experts, top-1 sigmoid, scores scale the expert input, a shared expert),
    # NoPE on layers 1 and 3 with temperature tuning (floor 4: it acts within the tests' 12 tokens), 4-token chunked
    # attention with L2 qk-norm on the RoPE layers 0 and 2, llama3 RoPE scaling.
    "Llama4ForCausalLM": dict(_LLAMA4_TEXT),
    # The language model of a multimodal Llama 4 checkpoint (a tiny vision tower, skipped on load).
    "Llama4ForConditionalGeneration": dict(
        text_config=dict(_LLAMA4_TEXT),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, vision_output_dim=64, projector_input_dim=64,
                           projector_output_dim=64),
        tie_word_embeddings=False),
}

_CONFIG_CLASSES = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig",
                   "Qwen2ForCausalLM": "Qwen2Config", "GPT2LMHeadModel": "GPT2Config", "BloomForCausalLM": "BloomConfig",
                   "MixtralForCausalLM": "MixtralConfig", "Qwen2MoeForCausalLM": "Qwen2MoeConfig",
                   "GemmaForCausalLM": "GemmaConfig", "PhiForCausalLM": "PhiConfig", "Phi3ForCausalLM": "Phi3Config",
                   "GlmForCausalLM": "GlmConfig", "Glm4ForCausalLM": "Glm4Config",
                   "Qwen3ForCausalLM": "Qwen3Config", "Gemma2ForCausalLM": "Gemma2Config",
                   "Gemma3ForCausalLM": "Gemma3TextConfig", "Gemma3ForConditionalGeneration": "Gemma3Config",
                   "Olmo2ForCausalLM": "Olmo2Config", "SmolLM3ForCausalLM": "SmolLM3Config",
                   "Mistral3ForConditionalGeneration": "Mistral3Config", "DeepseekV3ForCausalLM": "DeepseekV3Config",
                   "GptOssForCausalLM": "GptOssConfig", "Glm4MoeForCausalLM": "Glm4MoeConfig",
                   "Qwen3MoeForCausalLM": "Qwen3MoeConfig", "Llama4ForCausalLM": "Llama4TextConfig",
                   "Llama4ForConditionalGeneration": "Llama4Config"}

# Architectures whose transformers forward on a left-padded batch depends on the padding: Llama 4 computes the NoPE
# layers' attention temperature from a token's index in the padded row instead of its position. lmforge uses the
# position (padding changes nothing); the parity test compares padded rows with each row run alone.
PADDING_DEPENDENT_REFERENCE = {"Llama4ForCausalLM", "Llama4ForConditionalGeneration"}

# Architectures whose modeling code ships inside the checkpoint (trust_remote_code), so transformers has no class to
# compare with: their parity tests use a reference forward written from the published architecture instead
# (tests/test_glm.py for ChatGLM).
CUSTOM_CODE_ARCHS = {"ChatGLMModel", "ChatGLMForConditionalGeneration"}


def make_tiny_hf_model(arch: str, out_dir: str | Path | None = None, **overrides):
    """A random `transformers` model of `arch` (norm weights and biases randomized too); saved to out_dir if given."""
    import transformers

    fields = {**TINY_HF_CONFIGS[arch], **overrides}
    config = getattr(transformers, _CONFIG_CLASSES[arch])(**fields)
    config.architectures = [arch]
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("_bias"):  # default init leaves norms at 1 and biases at 0, which
                p.normal_(0.0, 0.5) if name.endswith("bias") else p.uniform_(0.5, 1.5)  # would hide mapping bugs
        params = dict(model.named_parameters())
        for name, t in model.state_dict().items():  # persistent buffers too (a router's selection bias)
            if name not in params and t.is_floating_point() and t.ndim == 1:
                t.normal_(0.0, 0.1)
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


# A few hundred words of English and Chinese, enough to train a small byte-level BPE with real merges.
TINY_CORPUS = """\
lmforge takes an open language model from checkpoint to a cheap-to-run model: train it, fine-tune it, align it,
compress it, evaluate it and serve it. A tokenizer turns text into token ids; the model predicts the next token; the
sampler picks one; the loop repeats until a stop token or the length limit. Attention lets every token look back at
the tokens before it, and the key-value cache keeps what was computed so each new token costs one step, not many.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine, thank you.
大语言模型把文本切分成词元，再逐个预测下一个词元。李白是唐代伟大的浪漫主义诗人。你好，世界！今天天气很好。
"""


def make_tiny_checkpoint(out_dir: str | Path, arch: str = "LlamaForCausalLM", vocab_size: int = 512, seed: int = 0) -> Path:
    """A complete tiny checkpoint directory, written by `transformers`: random weights + a trained BPE tokenizer
    with a ChatML chat template. What the README quickstart, the CLI tests and the examples run on."""
    from .tokenizer import get_template, save_pretrained_tokenizer, train_bpe

    out_dir = Path(out_dir)
    tok = train_bpe([TINY_CORPUS] * 20, vocab_size=vocab_size)
    save_pretrained_tokenizer(tok, out_dir, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                              unk_token="<unk>", chat_template=get_template("chatml"))
    token_ids = {k: tok.token_to_id(v) for k, v in (("bos_token_id", "<s>"), ("eos_token_id", "<|im_end|>"),
                                                     ("pad_token_id", "<pad>"))}
    torch.manual_seed(seed)
    make_tiny_hf_model(arch, out_dir, vocab_size=tok.get_vocab_size(), **token_ids)
    return out_dir


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0, keep_alive: float = 30.0):
    """Serve an ASGI app with uvicorn on a daemon thread: (base url, stop()). `port` 0 picks a free one;
    `keep_alive` is uvicorn's timeout_keep_alive (`ServeConfig.timeout_keep_alive`).

    uvicorn is told not to configure logging (`log_config=None`; its loggers propagate to the host's): its default
    `dictConfig` first flushes and closes every logging handler in the process, and a handler that owns its stream
    (absl's, created when rouge-score is imported, holds the sys.stderr of that moment) then closes it: under pytest
    that is a capture file, and the session dies with 'I/O operation on closed file'."""
    import socket
    import threading
    import time

    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None,
                                           timeout_keep_alive=keep_alive))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while not server.started and thread.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError(f"uvicorn did not start on {host}:{port} within {timeout:.0f} s")

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    return f"http://{host}:{port}", stop
