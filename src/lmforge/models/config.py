"""ModelConfig: every architectural choice of the one decoder, as named fields.

A model family is a set of values for these fields (a preset, or a converter reading an HF ``config.json``),
never a subclass. Validation happens here so a bad value fails before any tensor is allocated.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RopeScaling(BaseModel):
    """How RoPE frequencies are stretched for longer contexts; the math is transformers' `modeling_rope_utils`.

    ``linear``: positions divided by ``factor`` (Chen et al. 2023). ``llama3``: low frequencies divided by ``factor``,
    high frequencies kept, a smooth blend between (Llama 3.1/3.2). ``yarn``: NTK-by-parts interpolation between
    ``beta_fast`` and ``beta_slow`` rotations plus an attention factor on cos/sin (Peng et al. 2023; Qwen3, gpt-oss,
    DeepSeek). ``longrope``: per-frequency ``short_factor`` / ``long_factor`` rescaling, the long set for rows longer
    than ``original_max_seq_len``, plus an attention factor (Phi-3/3.5 128k). ``dynamic``: NTK-aware base growth for
    rows longer than the model's ``max_seq_len`` (each row by its own length).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["linear", "llama3", "yarn", "longrope", "dynamic"]
    factor: float | None = Field(None, gt=0)  # longrope/yarn: None = max_seq_len / original_max_seq_len
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_seq_len: int = 8192  # llama3, yarn, longrope: the pre-training context
    attention_factor: float | None = Field(None, gt=0)  # yarn/longrope: cos/sin multiplier; None = derived
    beta_fast: float = 32.0  # yarn: rotations above which dims extrapolate
    beta_slow: float = 1.0  # yarn: rotations below which dims interpolate
    mscale: float | None = None  # yarn (DeepSeek): attention factor mscale(factor, mscale) / mscale(factor, all_dim)
    mscale_all_dim: float | None = None
    truncate: bool = True  # yarn: round the correction range to whole dims (gpt-oss: false)
    short_factor: tuple[float, ...] | None = None  # longrope: per-frequency divisors (rotary_dim / 2 each)
    long_factor: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> RopeScaling:
        if self.factor is None and self.type in ("linear", "llama3", "dynamic"):
            raise ValueError(f"rope_scaling type {self.type} needs a factor")
        if self.type == "longrope" and (self.short_factor is None or self.long_factor is None):
            raise ValueError("rope_scaling type longrope needs short_factor and long_factor")
        return self


class ModelConfig(BaseModel):
    """One configurable pre-norm decoder. Field names follow DESIGN.md; defaults describe a small Llama."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = "LlamaForCausalLM"  # the HF `architectures` value used to save this model
    vocab_size: int = Field(32000, gt=0)
    d_model: int = Field(4096, gt=0)
    n_layers: int = Field(32, gt=0)
    n_heads: int = Field(32, gt=0)
    n_kv_heads: int | None = None  # None → n_heads (MHA); 1 → MQA; between → GQA
    head_dim: int | None = None  # None → d_model // n_heads
    d_ff: int = Field(11008, gt=0)

    norm: Literal["rms", "layer"] = "rms"
    norm_eps: float = Field(1e-5, gt=0)
    norm_weight_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma stores w around 0 and uses 1.0
    mlp: Literal["swiglu", "gelu", "moe"] = "swiglu"  # moe: a router over gated (SwiGLU/GeGLU) experts
    act: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"  # the MLP nonlinearity (gate activation for swiglu)
    parallel_block: bool = False  # x + attn(norm(x)) + mlp(norm(x)) with one norm per layer (Phi, GPT-J)
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model) (Gemma)

    # Mixture of experts (mlp="moe"); see lmforge.models.moe.
    moe_experts: int = Field(0, ge=0)  # routed experts per MoE layer
    moe_top_k: int = Field(2, ge=1)  # experts each token is sent to
    moe_d_ff: int | None = None  # each routed expert's hidden size; None -> d_ff
    moe_norm_topk: bool = True  # renormalize the top-k routing weights to sum to 1 (Mixtral; Qwen1.5-MoE: false)
    moe_shared_d_ff: int = Field(0, ge=0)  # hidden size of an always-on shared expert (Qwen2-MoE/DeepSeek); 0 = none
    moe_shared_gate: bool = False  # scale the shared expert by sigmoid(x . w) (Qwen2-MoE)
    moe_dense_layers: tuple[int, ...] = ()  # layers that keep a dense SwiGLU MLP of d_ff (Qwen2-MoE mlp_only_layers)
    moe_z_loss_weight: float = Field(0.0, ge=0)  # router z-loss (ST-MoE), relative to the load-balancing loss
    # Router (see lmforge.models.moe.make_router). softmax: softmax over all experts, then top-k (Mixtral, Qwen,
    # GPT-OSS). sigmoid: independent sigmoid scores, top-k chosen within the best groups (DeepSeek-V3, GLM-4.5,
    # Llama 4 with one group).
    moe_router: Literal["softmax", "sigmoid"] = "softmax"
    moe_groups: int = Field(1, ge=1)  # sigmoid: experts split into this many equal groups (DeepSeek-V3 n_group)
    moe_topk_groups: int = Field(1, ge=1)  # sigmoid: a token picks its experts from its best groups only (topk_group)
    moe_score_bias: bool = False  # sigmoid: a per-expert bias added to the scores for selection only
    moe_routed_scale: float = Field(1.0, gt=0)  # routed weights times this (DeepSeek-V3 routed_scaling_factor)
    moe_router_bias: bool = False  # the router linear has a bias (GPT-OSS)
    moe_scale_input: bool = False  # route weight * x into the expert instead of weight * expert(x) (Llama 4)
    moe_expert_bias: bool = False  # biases on every expert projection (GPT-OSS)
    # GPT-OSS's clamped SwiGLU in gated MLPs: gate <= limit, |up| <= limit, out = (up + 1) * gate * sigmoid(alpha *
    # gate). None: the plain act(gate) * up.
    glu_limit: float | None = Field(None, gt=0)
    glu_alpha: float = Field(1.702, gt=0)

    # Attention. gqa: per-head q/k/v projections (MHA, GQA, MQA). mla: DeepSeek's multi-head latent attention, where
    # keys and values are expanded from one compressed latent per token (the cache holds the latent).
    attention: Literal["gqa", "mla"] = "gqa"
    mla_q_rank: int = Field(0, ge=0)  # low-rank q (q_a_proj -> RMSNorm -> q_b_proj); 0 = one q_proj
    mla_kv_rank: int = Field(0, ge=0)  # width of the compressed kv latent (kv_lora_rank)
    mla_rope_dim: int = Field(0, ge=0)  # per-head q/k dims that carry RoPE; the key part is shared by all heads
    mla_nope_dim: int = Field(0, ge=0)  # per-head q/k dims without positions
    mla_v_dim: int = Field(0, ge=0)  # value dims per head
    attn_sinks: bool = False  # a learned logit per head joins each softmax denominator (GPT-OSS)
    attn_chunk: int | None = Field(None, gt=0)  # attend only within aligned chunks of this many positions (Llama 4)
    attn_chunk_layers: tuple[int, ...] | None = None  # layers that attend in chunks; None = all (with attn_chunk)
    # Llama 4's temperature tuning of NoPE layers: q scaled by 1 + scale * log(1 + floor((pos + 1) / floor_)), which
    # keeps attention from flattening over very long contexts.
    attn_temperature_tuning: bool = False
    attn_temperature_floor: int = Field(8192, gt=0)
    attn_temperature_scale: float = 0.1

    pos: Literal["rope", "alibi", "learned", "sinusoidal", "none"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rotary_fraction: float = Field(1.0, gt=0, le=1)  # share of each head's dims that rotate (ChatGLM: 0.5)
    rope_interleaved: bool = False  # rotate pairs (0,1),(2,3).. (GPT-J/GLM) instead of halves (Llama/NeoX)
    sliding_window: int | None = Field(None, gt=0)  # each token sees at most this many keys (Mistral v0.1)
    sliding_window_layers: tuple[int, ...] | None = None  # layers that use the window; None = all (Qwen2, Gemma-2)

    # Attention and norm variants of the 2024-25 families (Qwen3, Gemma 2/3, OLMo 2, SmolLM3). General on purpose:
    # each is a field plus the small module it picks, for any family that needs it (gpt-oss, Llama 4, GLM-4.5, ...).
    qk_norm: Literal["none", "head", "proj", "l2"] = "none"  # RMSNorm on q and k before RoPE: over each head's dims
    #   (Qwen3, Gemma 3: weights of head_dim) or over the whole projection (OLMo 2: weights of n_heads * head_dim);
    #   l2: weightless, over each head's dims, on the RoPE layers only (Llama 4)
    norm_placement: Literal["pre", "sandwich", "post"] = "pre"  # pre: x + f(norm(x)) (Llama); sandwich:
    #   x + norm(f(norm(x))) (Gemma 2/3); post: x + norm(f(x)) (OLMo 2); f = attention, then the MLP
    attn_scale: float | None = Field(None, gt=0)  # q.k multiplier; None = head_dim**-0.5 (Gemma: query_pre_attn_scalar**-0.5)
    attn_logit_softcap: float | None = Field(None, gt=0)  # attention scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = Field(None, gt=0)  # output logits -> cap * tanh(logits / cap) (Gemma 2)
    nope_layers: tuple[int, ...] = ()  # layers with no positional encoding at all (SmolLM3: every 4th; Llama 4)
    rope_local_theta: float | None = Field(None, gt=0)  # RoPE base of the sliding-window layers (Gemma 3: 10k; the
    #   full-attention layers keep rope_theta and rope_scaling); None = every RoPE layer uses rope_theta
    rope_local_scaling: RopeScaling | None = None  # the sliding-window layers' scaling (with rope_local_theta)

    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2, GPT-2, BLOOM)
    out_bias: bool = False  # bias on the attention output projection (GPT-2, BLOOM)
    mlp_bias: bool = False  # bias on MLP projections (GPT-2, BLOOM)
    embed_norm: bool = False  # a norm right after the token embedding (BLOOM)
    lm_head_bias: bool = False  # bias on the output layer (Phi)
    tie_embeddings: bool = False
    max_seq_len: int = Field(4096, gt=0)

    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _canonical(cls, data):
        """head_dim equal to d_model // n_heads and n_kv_heads equal to n_heads are the defaults: store None so equal
        models compare equal."""
        if isinstance(data, dict) and data.get("head_dim") is not None:
            d, h = data.get("d_model", 4096), data.get("n_heads", 32)
            if h and d % h == 0 and data["head_dim"] == d // h:
                data = {**data, "head_dim": None}
        if isinstance(data, dict) and data.get("n_kv_heads") is not None and data["n_kv_heads"] == data.get("n_heads", 32):
            data = {**data, "n_kv_heads": None}
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        kv = self.kv_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({kv})")
        if self.head_dim is None and self.d_model % self.n_heads and self.attention == "gqa":
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), or set head_dim")
        if self.pos == "rope" and self.rotary_dim % 2:
            raise ValueError(f"rotary dims ({self.rotary_dim}) must be even; adjust rotary_fraction or head_dim")
        if self.pos == "sinusoidal" and self.d_model % 2:
            raise ValueError("sinusoidal positions need an even d_model")
        if self.mlp == "moe" and not 1 <= self.moe_top_k <= self.moe_experts:
            raise ValueError(f"mlp=moe needs 1 <= moe_top_k ({self.moe_top_k}) <= moe_experts ({self.moe_experts})")
        if self.mlp != "moe" and (self.moe_experts or self.moe_shared_d_ff):
            raise ValueError("moe_experts/moe_shared_d_ff are set but mlp is not 'moe'; set mlp=moe or drop them")
        if self.moe_shared_gate and not self.moe_shared_d_ff:
            raise ValueError("moe_shared_gate needs a shared expert; set moe_shared_d_ff")
        for name in ("moe_dense_layers", "sliding_window_layers", "nope_layers", "attn_chunk_layers"):
            bad = [i for i in getattr(self, name) or () if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"{name} has layer index {bad[0]} outside 0..{self.n_layers - 1}")
        if self.sliding_window_layers is not None and self.sliding_window is None:
            raise ValueError("sliding_window_layers is set but sliding_window is not; set the window size")
        if self.lm_head_bias and self.tie_embeddings:
            raise ValueError("lm_head_bias needs an untied output layer; set tie_embeddings=false")
        if self.parallel_block and self.mlp == "moe":
            raise ValueError("parallel_block with mlp=moe is not supported")
        if self.parallel_block and self.norm_placement != "pre":
            raise ValueError("parallel_block needs norm_placement=pre (one norm feeds both branches)")
        if (self.nope_layers or self.rope_local_theta is not None) and self.pos != "rope":
            raise ValueError("nope_layers / rope_local_theta choose RoPE per layer; they need pos=rope")
        if self.rope_local_theta is not None and self.sliding_window is None:
            raise ValueError("rope_local_theta applies to the sliding-window layers; set sliding_window")
        if self.rope_local_scaling is not None and self.rope_local_theta is None:
            raise ValueError("rope_local_scaling needs rope_local_theta (the local layers' RoPE base)")
        if self.attn_chunk_layers is not None and self.attn_chunk is None:
            raise ValueError("attn_chunk_layers is set but attn_chunk is not; set the chunk size")
        if self.attn_temperature_tuning and not self.nope_layers:
            raise ValueError("attn_temperature_tuning scales the queries of NoPE layers; set nope_layers")
        self._check_router()
        self._check_mla()
        return self

    def _check_router(self) -> None:
        if self.moe_router == "softmax" and (self.moe_groups > 1 or self.moe_score_bias):
            raise ValueError("moe_groups/moe_score_bias need moe_router=sigmoid")
        if self.moe_topk_groups > self.moe_groups:
            raise ValueError(f"moe_topk_groups ({self.moe_topk_groups}) must be <= moe_groups ({self.moe_groups})")
        if self.mlp != "moe" or self.moe_groups == 1:
            return
        per_group, E = self.moe_experts // self.moe_groups, self.moe_experts
        if E % self.moe_groups or per_group < 2:
            raise ValueError(f"moe_experts ({E}) must split into moe_groups ({self.moe_groups}) equal groups of at "
                             "least 2 (a group scores by its best two experts)")
        if self.moe_top_k > self.moe_topk_groups * per_group:
            raise ValueError(f"moe_top_k ({self.moe_top_k}) exceeds the experts of moe_topk_groups "
                             f"({self.moe_topk_groups} x {per_group}); raise moe_topk_groups")

    def _check_mla(self) -> None:
        if self.attention != "mla":
            if self.mla_kv_rank or self.mla_q_rank:
                raise ValueError("mla_kv_rank/mla_q_rank are set but attention is not 'mla'; set attention=mla")
            return
        if not (self.mla_kv_rank and self.mla_rope_dim and self.mla_v_dim):
            raise ValueError("attention=mla needs mla_kv_rank, mla_rope_dim and mla_v_dim > 0")
        if self.mla_rope_dim % 2 or self.pos != "rope" or self.rotary_fraction != 1.0:
            raise ValueError("attention=mla needs pos=rope, rotary_fraction=1 and an even mla_rope_dim")
        if (self.qkv_bias or self.out_bias or self.sliding_window is not None or self.attn_sinks or self.nope_layers
                or self.attn_chunk or self.qk_norm != "none" or self.attn_logit_softcap):
            raise ValueError("attention=mla has no qkv_bias/out_bias, sliding_window, attn_sinks, nope_layers, "
                             "attn_chunk, qk_norm or attn_logit_softcap")

    # Derived sizes: computed, never stored, so they cannot disagree with the fields.
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        if self.attention == "mla":
            return self.mla_rope_dim
        return int(self.dim_per_head * self.rotary_fraction)

    @property
    def qk_head_dim(self) -> int:
        """Dims of one query/key head (MLA: the position-free part plus the RoPE part)."""
        return self.mla_nope_dim + self.mla_rope_dim if self.attention == "mla" else self.dim_per_head

    @property
    def softmax_scale(self) -> float:
        """The q.k multiplier: `attn_scale`, else 1/sqrt(query/key head dims); for MLA times YaRN's
        mscale(factor, mscale_all_dim)^2 (DeepSeek's reference scales the whole q.k product, not only the rotated
        dims, as transformers' `yarn_apply_mscale` does)."""
        scale = self.attn_scale or self.qk_head_dim ** -0.5
        s = self.rope_scaling
        if self.attention == "mla" and s is not None and s.type == "yarn" and s.mscale_all_dim:
            factor = s.factor or self.max_seq_len / s.original_max_seq_len
            if factor > 1:
                scale *= (0.1 * s.mscale_all_dim * math.log(factor) + 1.0) ** 2
        return scale

    @property
    def cache_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(heads, dims) of the two tensors a KV cache holds per token and layer: keys and values, or for MLA the
        normed kv latent (1, mla_kv_rank) and the rotated shared key part (1, mla_rope_dim)."""
        if self.attention == "mla":
            return (1, self.mla_kv_rank), (1, self.mla_rope_dim)
        return (self.kv_heads, self.dim_per_head), (self.kv_heads, self.dim_per_head)

    @property
    def cache_values_per_token(self) -> int:
        """Cached numbers per token and layer (what KV-cache memory scales with)."""
        (hk, dk), (hv, dv) = self.cache_shapes
        return hk * dk + hv * dv

    @property
    def expert_d_ff(self) -> int:
        return self.moe_d_ff or self.d_ff

    def is_moe_layer(self, layer: int) -> bool:
        return self.mlp == "moe" and layer not in self.moe_dense_layers

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: full causal attention)."""
        if self.sliding_window_layers is None or layer in self.sliding_window_layers:
            return self.sliding_window
        return None

    def layer_chunk(self, layer: int) -> int | None:
        """The attention chunk of `layer` (None: not chunked)."""
        if self.attn_chunk_layers is None or layer in self.attn_chunk_layers:
            return self.attn_chunk
        return None

    def layer_span(self, layer: int) -> tuple[int | None, int | None]:
        """(sliding window, chunk) of `layer`: what its attention mask depends on beyond causality."""
        return self.layer_window(layer), self.layer_chunk(layer)

    def layer_rope(self, layer: int) -> Literal["global", "local"] | None:
        """Which RoPE table `layer` rotates with: "local" (rope_local_theta, sliding-window layers), "global"
        (rope_theta + rope_scaling), or None (no RoPE: another position scheme, or a NoPE layer)."""
        if self.pos != "rope" or layer in self.nope_layers:
            return None
        if self.rope_local_theta is not None and self.layer_window(layer) is not None:
            return "local"
        return "global"

    def _mlp_params(self, f: int, bias: bool = False) -> int:
        """A gated MLP of hidden size f (0 when f is 0)."""
        return 3 * self.d_model * f + (2 * f + self.d_model) * bias if f else 0

    @property
    def attention_params(self) -> int:
        """Parameters of one attention block (projections, biases, per-head norms and sinks)."""
        d, H = self.d_model, self.n_heads
        if self.attention == "mla":
            qk, qr, kvr = self.qk_head_dim, self.mla_q_rank, self.mla_kv_rank
            q = d * qr + qr + qr * H * qk if qr else d * H * qk  # q_a_proj + q_a_norm + q_b_proj | q_proj
            kv = d * (kvr + self.mla_rope_dim) + kvr + kvr * H * (self.mla_nope_dim + self.mla_v_dim)
            return q + kv + H * self.mla_v_dim * d
        hd = self.dim_per_head
        q, kv = H * hd, self.kv_heads * hd
        qk_norm = {"none": 0, "head": 2 * hd, "proj": q + kv, "l2": 0}[self.qk_norm]  # q_norm + k_norm weights
        return (d * (q + 2 * kv) + q * d + (q + 2 * kv) * self.qkv_bias + d * self.out_bias + H * self.attn_sinks
                + qk_norm)

    @property
    def stop_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def num_params(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameter count computed from the config alone (no model needed): what `lmforge info`/plan report.

        `active=True` counts what one token uses: the top-k routed experts of each MoE layer instead of all of them.
        """
        d = self.d_model
        dense = self._mlp_params(self.d_ff, self.mlp_bias) if self.mlp != "gelu" else (
            2 * d * self.d_ff + (self.d_ff + d) * self.mlp_bias)
        experts = self.moe_top_k if active else self.moe_experts
        E = self.moe_experts
        moe = (experts * self._mlp_params(self.expert_d_ff, self.moe_expert_bias)
               + E * d + E * (self.moe_score_bias + self.moe_router_bias)  # router (+ biases)
               + self._mlp_params(self.moe_shared_d_ff) + d * self.moe_shared_gate)
        attn = self.attention_params
        norm = d * (2 if self.norm == "layer" else 1)
        block_norms = 1 if self.parallel_block else 4 if self.norm_placement == "sandwich" else 2
        total = norm  # final norm
        for layer in range(self.n_layers):
            total += attn + (moe if self.is_moe_layer(layer) else dense) + norm * block_norms
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2) + self.vocab_size * self.lm_head_bias
            total += self.max_seq_len * d * (self.pos == "learned") + norm * self.embed_norm
        return total
