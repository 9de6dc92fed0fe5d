"""Named model shapes as data: ModelConfig fields plus the Hugging Face repo each one describes.

Use them to build random-weight models of real shapes (benches, the planner) without downloading anything:
`preset_config("llama-3.2-1b", n_layers=2)` (names are case-insensitive).
"""
from __future__ import annotations

from ..errors import ConfigError, did_you_mean
from .config import ModelConfig, RopeScaling

_LLAMA3_SCALING = RopeScaling(type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_seq_len=8192)

PRESETS: dict[str, dict] = {
    "llama-3-8b": dict(
        hf_repo="meta-llama/Meta-Llama-3-8B", arch="LlamaForCausalLM", vocab_size=128256, d_model=4096,
        n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, rope_theta=500000.0, norm_eps=1e-5, max_seq_len=8192,
        bos_token_id=128000, eos_token_id=128001),
    "llama-3.2-1b": dict(
        hf_repo="meta-llama/Llama-3.2-1B", arch="LlamaForCausalLM", vocab_size=128256, d_model=2048, n_layers=16,
        n_heads=32, n_kv_heads=8, head_dim=64, d_ff=8192, rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING,
        norm_eps=1e-5, max_seq_len=131072, tie_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "qwen2.5-0.5b": dict(
        hf_repo="Qwen/Qwen2.5-0.5B", arch="Qwen2ForCausalLM", vocab_size=151936, d_model=896, n_layers=24,
        n_heads=14, n_kv_heads=2, d_ff=4864, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
        tie_embeddings=True, max_seq_len=32768, bos_token_id=151643, eos_token_id=151643),
    "qwen2.5-7b": dict(
        hf_repo="Qwen/Qwen2.5-7B", arch="Qwen2ForCausalLM", vocab_size=152064, d_model=3584, n_layers=28,
        n_heads=28, n_kv_heads=4, d_ff=18944, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
        max_seq_len=131072, bos_token_id=151643, eos_token_id=151643),
    "mistral-7b": dict(
        hf_repo="mistralai/Mistral-7B-v0.3", arch="MistralForCausalLM", vocab_size=32768, d_model=4096,
        n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, rope_theta=1000000.0, norm_eps=1e-5, max_seq_len=32768,
        bos_token_id=1, eos_token_id=2),
    "tinyllama-1.1b": dict(
        hf_repo="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", arch="LlamaForCausalLM", vocab_size=32000,
        d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632, rope_theta=10000.0, norm_eps=1e-5,
        max_seq_len=2048, bos_token_id=1, eos_token_id=2),
    "gpt2": dict(
        hf_repo="openai-community/gpt2", arch="GPT2LMHeadModel", vocab_size=50257, d_model=768, n_layers=12,
        n_heads=12, d_ff=3072, norm="layer", mlp="gelu", act="gelu_tanh", pos="learned", qkv_bias=True,
        out_bias=True, mlp_bias=True, tie_embeddings=True, max_seq_len=1024, bos_token_id=50256, eos_token_id=50256),
    "bloom-560m": dict(
        hf_repo="bigscience/bloom-560m", arch="BloomForCausalLM", vocab_size=250880, d_model=1024, n_layers=24,
        n_heads=16, d_ff=4096, norm="layer", mlp="gelu", act="gelu_tanh", pos="alibi", qkv_bias=True,
        out_bias=True, mlp_bias=True, embed_norm=True, tie_embeddings=True, max_seq_len=2048, bos_token_id=1,
        eos_token_id=2),
    # Mixture of experts: 8 experts top-2 (46.7B total, 12.9B active); 60 experts top-4 + gated shared expert (14.3B
    # total, 2.7B active).
    "mixtral-8x7b": dict(
        hf_repo="mistralai/Mixtral-8x7B-v0.1", arch="MixtralForCausalLM", vocab_size=32000, d_model=4096,
        n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, mlp="moe", moe_experts=8, moe_top_k=2,
        rope_theta=1000000.0, norm_eps=1e-5, max_seq_len=32768, bos_token_id=1, eos_token_id=2),
    "qwen1.5-moe-a2.7b": dict(
        hf_repo="Qwen/Qwen1.5-MoE-A2.7B", arch="Qwen2MoeForCausalLM", vocab_size=151936, d_model=2048, n_layers=24,
        n_heads=16, d_ff=5632, mlp="moe", moe_experts=60, moe_top_k=4, moe_d_ff=1408, moe_norm_topk=False,
        moe_shared_d_ff=5632, moe_shared_gate=True, qkv_bias=True, rope_theta=1000000.0, norm_eps=1e-6,
        max_seq_len=8192, bos_token_id=151643, eos_token_id=151643),
    # GLM: ChatGLM3 (custom-code ChatGLMModel checkpoint) and GLM-4 (transformers' GlmForCausalLM); both use MQA with
    # 2 groups, q/k/v bias and interleaved rotary on half of each 128-dim head.
    "chatglm3-6b": dict(
        hf_repo="THUDM/chatglm3-6b", arch="ChatGLMModel", vocab_size=65024, d_model=4096, n_layers=28, n_heads=32,
        n_kv_heads=2, head_dim=128, d_ff=13696, rotary_fraction=0.5, rope_interleaved=True, qkv_bias=True,
        norm_eps=1e-5, max_seq_len=8192, eos_token_id=2, pad_token_id=0),
    "glm-4-9b": dict(
        hf_repo="THUDM/glm-4-9b-hf", arch="GlmForCausalLM", vocab_size=151552, d_model=4096, n_layers=40, n_heads=32,
        n_kv_heads=2, head_dim=128, d_ff=13696, rotary_fraction=0.5, rope_interleaved=True, qkv_bias=True,
        norm_eps=1.5625e-07, max_seq_len=8192, eos_token_id=[151329, 151336, 151338], pad_token_id=151329),
    # Gemma: (1 + w) RMSNorm, sqrt(d)-scaled embeddings, GeGLU, 256-dim heads, tied head.
    "gemma-2b": dict(
        hf_repo="google/gemma-2b", arch="GemmaForCausalLM", vocab_size=256000, d_model=2048, n_layers=18, n_heads=8,
        n_kv_heads=1, head_dim=256, d_ff=16384, act="gelu_tanh", norm_weight_offset=1.0, scale_embeddings=True,
        norm_eps=1e-6, tie_embeddings=True, max_seq_len=8192, bos_token_id=2, eos_token_id=1, pad_token_id=0),
    "gemma-7b": dict(
        hf_repo="google/gemma-7b", arch="GemmaForCausalLM", vocab_size=256000, d_model=3072, n_layers=28, n_heads=16,
        head_dim=256, d_ff=24576, act="gelu_tanh", norm_weight_offset=1.0, scale_embeddings=True, norm_eps=1e-6,
        tie_embeddings=True, max_seq_len=8192, bos_token_id=2, eos_token_id=1, pad_token_id=0),
    # Phi-2: parallel attention + MLP, LayerNorm, rotary on 40% of each head, biases everywhere (lm_head too).
    "phi-2": dict(
        hf_repo="microsoft/phi-2", arch="PhiForCausalLM", vocab_size=51200, d_model=2560, n_layers=32, n_heads=32,
        d_ff=10240, norm="layer", mlp="gelu", act="gelu_tanh", parallel_block=True, rotary_fraction=0.4,
        qkv_bias=True, out_bias=True, mlp_bias=True, lm_head_bias=True, max_seq_len=2048, bos_token_id=50256,
        eos_token_id=50256),
    # Phi-3: the Llama layout stored fused (qkv_proj, gate_up_proj), with a 2047-token sliding window.
    "phi-3-mini-4k": dict(
        hf_repo="microsoft/Phi-3-mini-4k-instruct", arch="Phi3ForCausalLM", vocab_size=32064, d_model=3072,
        n_layers=32, n_heads=32, d_ff=8192, sliding_window=2047, norm_eps=1e-5, max_seq_len=4096, bos_token_id=1,
        eos_token_id=32000, pad_token_id=32000),
    # --- 2024-25 families -------------------------------------------------------------------------------------------
    # Qwen3: per-head qk-norm, 128-dim heads (q wider than d_model on the small ones), no q/k/v bias.
    "qwen3-0.6b": dict(
        hf_repo="Qwen/Qwen3-0.6B", arch="Qwen3ForCausalLM", vocab_size=151936, d_model=1024, n_layers=28, n_heads=16,
        n_kv_heads=8, head_dim=128, d_ff=3072, qk_norm="head", rope_theta=1000000.0, norm_eps=1e-6,
        tie_embeddings=True, max_seq_len=40960, bos_token_id=151643, eos_token_id=151645),
    "qwen3-8b": dict(
        hf_repo="Qwen/Qwen3-8B", arch="Qwen3ForCausalLM", vocab_size=151936, d_model=4096, n_layers=36, n_heads=32,
        n_kv_heads=8, head_dim=128, d_ff=12288, qk_norm="head", rope_theta=1000000.0, norm_eps=1e-6,
        max_seq_len=40960, bos_token_id=151643, eos_token_id=151645),
    # Gemma 2: sandwich norms, query_pre_attn_scalar, soft-capped attention (50) and logits (30), a 4096-token
    # window on every other layer (0, 2, ...).
    "gemma-2-2b": dict(
        hf_repo="google/gemma-2-2b", arch="Gemma2ForCausalLM", vocab_size=256000, d_model=2304, n_layers=26,
        n_heads=8, n_kv_heads=4, head_dim=256, d_ff=9216, act="gelu_tanh", norm_weight_offset=1.0,
        scale_embeddings=True, norm_placement="sandwich", attn_scale=256 ** -0.5, attn_logit_softcap=50.0,
        final_logit_softcap=30.0, sliding_window=4096, sliding_window_layers=tuple(range(0, 26, 2)), norm_eps=1e-6,
        tie_embeddings=True, max_seq_len=8192, bos_token_id=2, eos_token_id=1, pad_token_id=0),
    # Gemma 3: Gemma 2's block + qk-norm, five sliding-window layers (local RoPE base 10k) per global one (1M).
    "gemma-3-1b": dict(
        hf_repo="google/gemma-3-1b-pt", arch="Gemma3ForCausalLM", vocab_size=262144, d_model=1152, n_layers=26,
        n_heads=4, n_kv_heads=1, head_dim=256, d_ff=6912, act="gelu_tanh", norm_weight_offset=1.0,
        scale_embeddings=True, norm_placement="sandwich", qk_norm="head", attn_scale=256 ** -0.5,
        sliding_window=512, sliding_window_layers=tuple(i for i in range(26) if (i + 1) % 6),
        rope_theta=1000000.0, rope_local_theta=10000.0, norm_eps=1e-6, tie_embeddings=True, max_seq_len=32768,
        bos_token_id=2, eos_token_id=1, pad_token_id=0),
    # the text decoder of the multimodal checkpoint (its SigLIP tower is not loaded); global layers scale RoPE x8
    "gemma-3-4b": dict(
        hf_repo="google/gemma-3-4b-pt", arch="Gemma3ForCausalLM", vocab_size=262208, d_model=2560, n_layers=34,
        n_heads=8, n_kv_heads=4, head_dim=256, d_ff=10240, act="gelu_tanh", norm_weight_offset=1.0,
        scale_embeddings=True, norm_placement="sandwich", qk_norm="head", attn_scale=256 ** -0.5,
        sliding_window=1024, sliding_window_layers=tuple(i for i in range(34) if (i + 1) % 6),
        rope_theta=1000000.0, rope_scaling=RopeScaling(type="linear", factor=8.0), rope_local_theta=10000.0,
        norm_eps=1e-6, tie_embeddings=True, max_seq_len=131072, bos_token_id=2, eos_token_id=[1, 106],
        pad_token_id=0),
    # OLMo 2: norms after attention and MLP, qk-norm over the whole projections, MHA.
    "olmo-2-1b": dict(
        hf_repo="allenai/OLMo-2-0425-1B", arch="Olmo2ForCausalLM", vocab_size=100352, d_model=2048, n_layers=16,
        n_heads=16, d_ff=8192, norm_placement="post", qk_norm="proj", rope_theta=500000.0, norm_eps=1e-6,
        max_seq_len=4096, eos_token_id=100257, pad_token_id=100277),
    # SmolLM3: no positional encoding on every 4th layer (3, 7, ...).
    "smollm3-3b": dict(
        hf_repo="HuggingFaceTB/SmolLM3-3B", arch="SmolLM3ForCausalLM", vocab_size=128256, d_model=2048, n_layers=36,
        n_heads=16, n_kv_heads=4, d_ff=11008, nope_layers=tuple(range(3, 36, 4)), rope_theta=5000000.0,
        norm_eps=1e-6, tie_embeddings=True, max_seq_len=65536, eos_token_id=128012, pad_token_id=128004),
    # Phi-4: the Phi-3 layout (fused qkv / gate_up on disk) at 14B, GQA, no window, no rope scaling.
    "phi-4": dict(
        hf_repo="microsoft/phi-4", arch="Phi3ForCausalLM", vocab_size=100352, d_model=5120, n_layers=40, n_heads=40,
        n_kv_heads=10, d_ff=17920, rope_theta=250000.0, norm_eps=1e-5, max_seq_len=16384, bos_token_id=100257,
        eos_token_id=100265, pad_token_id=100349),
    # Mistral Small 3.1: the text decoder of the Pixtral checkpoint (Mistral3ForConditionalGeneration).
    "mistral-small-3.1-24b": dict(
        hf_repo="mistralai/Mistral-Small-3.1-24B-Base-2503", arch="MistralForCausalLM", vocab_size=131072,
        d_model=5120, n_layers=40, n_heads=32, n_kv_heads=8, head_dim=128, d_ff=32768, rope_theta=1000000000.0,
        norm_eps=1e-5, max_seq_len=131072, bos_token_id=1, eos_token_id=2),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named preset, with field overrides (e.g. n_layers=2 for a quick test)."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}'{did_you_mean(key, PRESETS)}; presets: {', '.join(PRESETS)}")
    fields = {k: v for k, v in PRESETS[key].items() if k != "hf_repo"}
    return ModelConfig(**{**fields, **overrides})
