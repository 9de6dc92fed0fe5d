"""ModelConfig: every architectural choice of the one decoder, as named fields.

A model family is a set of values for these fields (a preset, or a converter reading an HF ``config.json``),
never a subclass. Validation happens here so a bad value fails before any tensor is allocated.
"""
from __future__ import annotations

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

    pos: Literal["rope", "alibi", "learned", "sinusoidal", "none"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rotary_fraction: float = Field(1.0, gt=0, le=1)  # share of each head's dims that rotate (ChatGLM: 0.5)
    rope_interleaved: bool = False  # rotate pairs (0,1),(2,3).. (GPT-J/GLM) instead of halves (Llama/NeoX)
    sliding_window: int | None = Field(None, gt=0)  # each token sees at most this many keys (Mistral v0.1)
    sliding_window_layers: tuple[int, ...] | None = None  # layers that use the window; None = all (Qwen2, Gemma-2)

    # Attention and norm variants of the 2024-25 families (Qwen3, Gemma 2/3, OLMo 2, SmolLM3). General on purpose:
    # each is a field plus the small module it picks, for any family that needs it (gpt-oss, Llama 4, GLM-4.5, ...).
    qk_norm: Literal["none", "head", "proj"] = "none"  # RMSNorm on q and k before RoPE: over each head's dims
    #   (Qwen3, Gemma 3: weights of head_dim) or over the whole projection (OLMo 2: weights of n_heads * head_dim)
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
        if self.head_dim is None and self.d_model % self.n_heads:
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
        for name in ("moe_dense_layers", "sliding_window_layers", "nope_layers"):
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
        return self

    # Derived sizes: computed, never stored, so they cannot disagree with the fields.
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_per_head * self.rotary_fraction)

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

    def layer_rope(self, layer: int) -> Literal["global", "local"] | None:
        """Which RoPE table `layer` rotates with: "local" (rope_local_theta, sliding-window layers), "global"
        (rope_theta + rope_scaling), or None (no RoPE: another position scheme, or a NoPE layer)."""
        if self.pos != "rope" or layer in self.nope_layers:
            return None
        if self.rope_local_theta is not None and self.layer_window(layer) is not None:
            return "local"
        return "global"

    @property
    def stop_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def num_params(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameter count computed from the config alone (no model needed): what `lmforge info`/plan report.

        `active=True` counts what one token uses: the top-k routed experts of each MoE layer instead of all of them.
        """
        d, hd = self.d_model, self.dim_per_head
        q, kv = self.n_heads * hd, self.kv_heads * hd
        attn = d * (q + 2 * kv) + q * d + (q + 2 * kv) * self.qkv_bias + d * self.out_bias

        def swiglu(f: int, bias: bool = False) -> int:
            return 3 * d * f + (2 * f + d) * bias

        dense = swiglu(self.d_ff, self.mlp_bias) if self.mlp != "gelu" else 2 * d * self.d_ff + (self.d_ff + d) * self.mlp_bias
        experts = self.moe_top_k if active else self.moe_experts
        moe = (experts * swiglu(self.expert_d_ff) + self.moe_experts * d  # routed experts + router
               + swiglu(self.moe_shared_d_ff) + d * self.moe_shared_gate)
        attn += {"none": 0, "head": 2 * hd, "proj": q + kv}[self.qk_norm]  # q_norm + k_norm weights
        norm = d * (2 if self.norm == "layer" else 1)
        block_norms = 1 if self.parallel_block else 4 if self.norm_placement == "sandwich" else 2
        total = norm  # final norm
        for layer in range(self.n_layers):
            total += attn + (moe if self.is_moe_layer(layer) else dense) + norm * block_norms
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2) + self.vocab_size * self.lm_head_bias
            total += self.max_seq_len * d * (self.pos == "learned") + norm * self.embed_norm
        return total
