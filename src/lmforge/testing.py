"""Tiny random reference models for tests, examples and benches, made by `transformers` (a dev dependency).

Lives in the package (not tests/) so `examples/` and the CLI quickstart can build the same fixtures offline.
"""
from __future__ import annotations

from pathlib import Path

import torch

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
    # Phi-3: fused qkv_proj and gate_up_proj, GQA, a sliding window.
    "Phi3ForCausalLM": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=128, max_position_embeddings=128, sliding_window=7,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # GLM-4: interleaved rotary on half of each head, q/k/v bias, fused gate_up_proj, GQA.
    "GlmForCausalLM": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, intermediate_size=128, vocab_size=128, max_position_embeddings=128,
                           pad_token_id=0, eos_token_id=2),
}

_CONFIG_CLASSES = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig",
                   "Qwen2ForCausalLM": "Qwen2Config", "GPT2LMHeadModel": "GPT2Config", "BloomForCausalLM": "BloomConfig",
                   "MixtralForCausalLM": "MixtralConfig", "Qwen2MoeForCausalLM": "Qwen2MoeConfig",
                   "GemmaForCausalLM": "GemmaConfig", "PhiForCausalLM": "PhiConfig", "Phi3ForCausalLM": "Phi3Config",
                   "GlmForCausalLM": "GlmConfig"}

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
            if p.ndim == 1:  # default init leaves norms at 1 and biases at 0, which would hide mapping bugs
                p.normal_(0.0, 0.5) if name.endswith("bias") else p.uniform_(0.5, 1.5)
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
    `keep_alive` is uvicorn's timeout_keep_alive (`ServeConfig.timeout_keep_alive`)."""
    import socket
    import threading
    import time

    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
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
