"""ModelConfig: every architectural choice of the one decoder, as named fields.

A model family is a set of values for these fields (a preset, or a converter reading an HF ``config.json``),
never a subclass. Validation happens here so a bad value fails before any tensor is allocated.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RopeScaling(BaseModel):
    """How RoPE frequencies are stretched for longer contexts.

    ``linear``: positions divided by ``factor`` (Chen et al. 2023). ``llama3``: low frequencies divided by ``factor``,
    high frequencies kept, a smooth blend between (Llama 3.1/3.2).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["linear", "llama3"]
    factor: float = Field(gt=0)
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_seq_len: int = 8192  # llama3 only


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
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    act: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"  # the MLP nonlinearity (gate activation for swiglu)

    pos: Literal["rope", "alibi", "learned", "sinusoidal", "none"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rotary_fraction: float = Field(1.0, gt=0, le=1)  # share of each head's dims that rotate (ChatGLM: 0.5)
    rope_interleaved: bool = False  # rotate pairs (0,1),(2,3).. (GPT-J/GLM) instead of halves (Llama/NeoX)
    sliding_window: int | None = None  # each token sees at most this many keys (Mistral v0.1)

    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2, GPT-2, BLOOM)
    out_bias: bool = False  # bias on the attention output projection (GPT-2, BLOOM)
    mlp_bias: bool = False  # bias on MLP projections (GPT-2, BLOOM)
    embed_norm: bool = False  # a norm right after the token embedding (BLOOM)
    tie_embeddings: bool = False
    max_seq_len: int = Field(4096, gt=0)

    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _canonical(cls, data):
        """head_dim equal to d_model // n_heads is the default: store None so equal models compare equal."""
        if isinstance(data, dict) and data.get("head_dim") is not None:
            d, h = data.get("d_model", 4096), data.get("n_heads", 32)
            if h and d % h == 0 and data["head_dim"] == d // h:
                data = {**data, "head_dim": None}
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
    def stop_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count computed from the config alone (no model needed): what `lmforge info`/plan report."""
        d, hd, f = self.d_model, self.dim_per_head, self.d_ff
        q, kv = self.n_heads * hd, self.kv_heads * hd
        attn = d * (q + 2 * kv) + q * d + (q + 2 * kv) * self.qkv_bias + d * self.out_bias
        mlp = (3 if self.mlp == "swiglu" else 2) * d * f + (f * (2 if self.mlp == "swiglu" else 1) + d) * self.mlp_bias
        norm = d * (2 if self.norm == "layer" else 1)
        per_layer = attn + mlp + 2 * norm
        total = self.n_layers * per_layer + norm  # + final norm
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
            total += self.max_seq_len * d * (self.pos == "learned") + norm * self.embed_norm
        return total
