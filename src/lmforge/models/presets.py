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
    # Today's MoE families (config values from each repo's config.json; the MTP layers of DeepSeek-V3 / GLM-4.5 are
    # not part of the model lmforge builds).
    # DeepSeek-V3: MLA (q rank 1536, kv latent 512, 128 + 64 RoPE q/k dims, 128 value dims), 256 routed experts
    # top-8 in 8 groups (best 4), a shared expert, three dense first layers, yarn x40.
    "deepseek-v3": dict(
        hf_repo="deepseek-ai/DeepSeek-V3", arch="DeepseekV3ForCausalLM", vocab_size=129280, d_model=7168, n_layers=61,
        n_heads=128, d_ff=18432, norm_eps=1e-6, attention="mla", mla_q_rank=1536, mla_kv_rank=512, mla_rope_dim=64,
        mla_nope_dim=128, mla_v_dim=128, rope_interleaved=True, rope_theta=10000.0,
        rope_scaling=RopeScaling(type="yarn", factor=40.0, original_max_seq_len=4096, beta_fast=32.0, beta_slow=1.0,
                                 mscale=1.0, mscale_all_dim=1.0),
        mlp="moe", moe_experts=256, moe_top_k=8, moe_d_ff=2048, moe_shared_d_ff=2048, moe_router="sigmoid",
        moe_groups=8, moe_topk_groups=4, moe_score_bias=True, moe_routed_scale=2.5, moe_dense_layers=(0, 1, 2),
        max_seq_len=163840, bos_token_id=0, eos_token_id=1),
    # Kimi-K2: DeepSeek-V3's architecture with 64 heads, 384 experts in one group and one dense layer.
    "kimi-k2": dict(
        hf_repo="moonshotai/Kimi-K2-Instruct", arch="DeepseekV3ForCausalLM", vocab_size=163840, d_model=7168,
        n_layers=61, n_heads=64, d_ff=18432, norm_eps=1e-6, attention="mla", mla_q_rank=1536, mla_kv_rank=512,
        mla_rope_dim=64, mla_nope_dim=128, mla_v_dim=128, rope_interleaved=True, rope_theta=50000.0,
        rope_scaling=RopeScaling(type="yarn", factor=32.0, original_max_seq_len=4096, beta_fast=1.0, beta_slow=1.0,
                                 mscale=1.0, mscale_all_dim=1.0),
        mlp="moe", moe_experts=384, moe_top_k=8, moe_d_ff=2048, moe_shared_d_ff=2048, moe_router="sigmoid",
        moe_score_bias=True, moe_routed_scale=2.827, moe_dense_layers=(0,), max_seq_len=131072,
        bos_token_id=163584, eos_token_id=163585),
    # GLM-4.5-Air: the DeepSeek-V3 router over 128 experts (top-8, one group), q/k/v bias, RoPE on half of each head.
    "glm-4.5-air": dict(
        hf_repo="zai-org/GLM-4.5-Air", arch="Glm4MoeForCausalLM", vocab_size=151552, d_model=4096, n_layers=46,
        n_heads=96, n_kv_heads=8, head_dim=128, d_ff=10944, norm_eps=1e-5, qkv_bias=True, rotary_fraction=0.5,
        rope_theta=1000000.0, mlp="moe", moe_experts=128, moe_top_k=8, moe_d_ff=1408, moe_shared_d_ff=1408,
        moe_router="sigmoid", moe_score_bias=True, moe_dense_layers=(0,), max_seq_len=131072,
        eos_token_id=[151329, 151336, 151338], pad_token_id=151329),
    # Qwen3-30B-A3B: per-head qk-norm, 128 experts top-8 renormalized, no shared expert.
    "qwen3-30b-a3b": dict(
        hf_repo="Qwen/Qwen3-30B-A3B", arch="Qwen3MoeForCausalLM", vocab_size=151936, d_model=2048, n_layers=48,
        n_heads=32, n_kv_heads=4, head_dim=128, d_ff=6144, norm_eps=1e-6, qk_norm="head", rope_theta=1000000.0,
        mlp="moe", moe_experts=128, moe_top_k=8, moe_d_ff=768, moe_norm_topk=True, max_seq_len=40960,
        bos_token_id=151643, eos_token_id=151645),
    # gpt-oss: attention sinks, 128-token windows on even layers, biased router and experts, clamped SwiGLU, yarn x32.
    "gpt-oss-20b": dict(
        hf_repo="openai/gpt-oss-20b", arch="GptOssForCausalLM", vocab_size=201088, d_model=2880, n_layers=24,
        n_heads=64, n_kv_heads=8, head_dim=64, d_ff=2880, norm_eps=1e-5, qkv_bias=True, out_bias=True,
        attn_sinks=True, sliding_window=128, sliding_window_layers=tuple(range(0, 24, 2)), rope_theta=150000.0,
        rope_scaling=RopeScaling(type="yarn", factor=32.0, original_max_seq_len=4096, beta_fast=32.0, beta_slow=1.0,
                                 truncate=False),
        mlp="moe", moe_experts=32, moe_top_k=4, moe_router_bias=True, moe_expert_bias=True, glu_limit=7.0,
        max_seq_len=131072, eos_token_id=200002, pad_token_id=199999),
    "gpt-oss-120b": dict(
        hf_repo="openai/gpt-oss-120b", arch="GptOssForCausalLM", vocab_size=201088, d_model=2880, n_layers=36,
        n_heads=64, n_kv_heads=8, head_dim=64, d_ff=2880, norm_eps=1e-5, qkv_bias=True, out_bias=True,
        attn_sinks=True, sliding_window=128, sliding_window_layers=tuple(range(0, 36, 2)), rope_theta=150000.0,
        rope_scaling=RopeScaling(type="yarn", factor=32.0, original_max_seq_len=4096, beta_fast=32.0, beta_slow=1.0,
                                 truncate=False),
        mlp="moe", moe_experts=128, moe_top_k=4, moe_router_bias=True, moe_expert_bias=True, glu_limit=7.0,
        max_seq_len=131072, eos_token_id=200002, pad_token_id=199999),
    # Llama 4 (text decoder): NoPE + temperature tuning every 4th layer, 8192-token chunked attention on the others,
    # top-1 sigmoid experts that scale their input, a shared expert. Scout: 16 experts on every layer, L2 qk-norm on
    # the RoPE layers; Maverick: 128 experts on every other layer, no qk-norm.
    "llama-4-scout-17b-16e": dict(
        hf_repo="meta-llama/Llama-4-Scout-17B-16E", arch="Llama4ForCausalLM", vocab_size=202048, d_model=5120,
        n_layers=48, n_heads=40, n_kv_heads=8, head_dim=128, d_ff=16384, norm_eps=1e-5, rope_interleaved=True,
        rope_theta=500000.0, rope_scaling=RopeScaling(type="llama3", factor=16.0, low_freq_factor=1.0,
                                                      high_freq_factor=1.0, original_max_seq_len=8192),
        nope_layers=tuple(range(3, 48, 4)), qk_norm="l2", attn_chunk=8192,
        attn_chunk_layers=tuple(i for i in range(48) if i % 4 != 3), attn_temperature_tuning=True,
        mlp="moe", moe_experts=16, moe_top_k=1, moe_d_ff=8192, moe_shared_d_ff=8192, moe_router="sigmoid",
        moe_norm_topk=False, moe_scale_input=True, max_seq_len=10485760, bos_token_id=200000,
        eos_token_id=[200001, 200007, 200008], pad_token_id=200018),
    "llama-4-maverick-17b-128e": dict(
        hf_repo="meta-llama/Llama-4-Maverick-17B-128E", arch="Llama4ForCausalLM", vocab_size=202048, d_model=5120,
        n_layers=48, n_heads=40, n_kv_heads=8, head_dim=128, d_ff=16384, norm_eps=1e-5, rope_interleaved=True,
        rope_theta=500000.0, nope_layers=tuple(range(3, 48, 4)), attn_chunk=8192,  # no qk-norm (use_qk_norm: false)
        attn_chunk_layers=tuple(i for i in range(48) if i % 4 != 3), attn_temperature_tuning=True,
        mlp="moe", moe_experts=128, moe_top_k=1, moe_d_ff=8192, moe_shared_d_ff=8192, moe_router="sigmoid",
        moe_norm_topk=False, moe_scale_input=True, moe_dense_layers=tuple(range(0, 48, 2)), max_seq_len=1048576,
        bos_token_id=200000, eos_token_id=[200001, 200007, 200008], pad_token_id=200018),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named preset, with field overrides (e.g. n_layers=2 for a quick test)."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}'{did_you_mean(key, PRESETS)}; presets: {', '.join(PRESETS)}")
    fields = {k: v for k, v in PRESETS[key].items() if k != "hf_repo"}
    return ModelConfig(**{**fields, **overrides})
