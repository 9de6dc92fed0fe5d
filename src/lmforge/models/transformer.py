"""The one decoder: pre-norm blocks of attention + MLP, every variant a ModelConfig flag.

Linear layers are built through a factory `linear(name, in_features, out_features, bias) -> nn.Module`, where
`name` is the module's full dotted path (e.g. "layers.3.attn.q_proj"). LoRA, quantized and tensor-parallel linears
are other factories; the model code never changes for them. Module names follow the HF Llama convention
(q_proj/k_proj/v_proj/o_proj, gate_proj/up_proj/down_proj) so PEFT target names mean the same thing here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .attention import (alibi_bias, allowed_keys, attend, document_block_mask, plain_causal,
                        with_prefix_keys)
from .config import ModelConfig
from .kv_cache import AttendingCache, Cache, KVCache, RollingKVCache
from .moe import MoE, moe_aux_loss
from .positions import (QueryScale, Rotary, alibi_slopes, apply_rope, rope_inv_freq, sinusoidal_embedding,
                        temperature_scale)

try:
    import torch.nn.attention.flex_attention  # noqa: F401

    _HAS_FLEX = True
except ImportError:  # torch < 2.5
    _HAS_FLEX = False



try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed
    DTensor = ()


LinearFactory = Callable[[str, int, int, bool], nn.Module]
RING_CHUNK = 64  # a rolling cache takes steps of up to this many tokens without copying (longer prefills concat)


def default_linear(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as Llama does, so bf16 matches the reference).

    With an `offset` (Gemma: 1.0) the scale is (offset + weight), applied in fp32 before the cast, as Gemma does.
    Without a weight (`weight=False`): x / rms(x) only (Llama 4's L2 qk-norm).
    """

    def __init__(self, dim: int, eps: float, offset: float = 0.0, weight: bool = True):
        super().__init__()
        self.dim, self.eps, self.offset = dim, eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float = 0.0) -> torch.Tensor:
    """`RMSNorm`'s computation on given parameters (what kernels that fold the norm in are checked against)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return normed.to(x.dtype)
    if offset:
        return (normed * (offset + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rms":
        return RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_weight_offset)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


def embedding_scale(d_model: int, dtype: torch.dtype) -> float:
    """Gemma's sqrt(d_model) embedding multiplier, rounded to the activation dtype as transformers does, as a host
    float: multiplying by it copies nothing to the device (a tensor made per forward broke CUDA-graph capture)."""
    return torch.tensor(d_model ** 0.5, dtype=dtype).item()


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class QKVProjection(nn.Module):
    """An attention's q, k and v projections of one input: `forward(attn, x)` → (attn.q_proj(x), attn.k_proj(x),
    attn.v_proj(x)). A module of its own so inference can swap in one packed matmul for the three
    (lmforge.infer.kernels.decode_fusion) without the attention knowing; it holds no parameters, so the projections
    keep their checkpoint names."""

    def forward(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)


class GatedProjections(nn.Module):
    """A gated MLP's three projections around its gating: `forward(mlp, x)` → mlp.down_proj(mlp.glu(
    mlp.gate_proj(x), mlp.up_proj(x))). A module of its own so inference can swap in a packed gate/up matmul (and a
    down projection that gates its input as it loads it); no parameters, so the projections keep their names."""

    def forward(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return mlp.down_proj(mlp.glu(mlp.gate_proj(x), mlp.up_proj(x)))


class TiedHead(nn.Module):
    """The tied LM head's matmul, `forward(hidden, weight)` = hidden @ weight.T with the embedding matrix as weight;
    a module so inference can swap in a one-row GEMV. No parameters (the weight is the embedding's)."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, weight)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, linear: LinearFactory, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd, d = cfg.dim_per_head, cfg.d_model
        self.q_proj = linear(f"{prefix}.q_proj", d, cfg.n_heads * hd, cfg.qkv_bias)
        self.k_proj = linear(f"{prefix}.k_proj", d, cfg.kv_heads * hd, cfg.qkv_bias)
        self.v_proj = linear(f"{prefix}.v_proj", d, cfg.kv_heads * hd, cfg.qkv_bias)
        self.o_proj = linear(f"{prefix}.o_proj", cfg.n_heads * hd, d, cfg.out_bias)
        self.qkv = QKVProjection()
        # qk-norm: RMSNorm over each head's dims (Qwen3, Gemma 3), over the whole projection (OLMo 2), or weightless
        # over each head's dims on RoPE layers (Llama 4; a rotation keeps the norm, so before or after RoPE is one)
        norm_q, norm_k = {"none": (0, 0), "head": (hd, hd), "proj": (cfg.n_heads * hd, cfg.kv_heads * hd),
                          "l2": (hd, hd) if cfg.layer_rope(layer) is not None else (0, 0)}[cfg.qk_norm]
        weighted = cfg.qk_norm != "l2"
        self.q_norm = RMSNorm(norm_q, cfg.norm_eps, cfg.norm_weight_offset, weighted) if norm_q else None
        self.k_norm = RMSNorm(norm_k, cfg.norm_eps, cfg.norm_weight_offset, weighted) if norm_k else None
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attn_sinks else None  # GPT-OSS

    def forward(self, x, rope, mask, cache: KVCache | None, slots: torch.Tensor | None,
                prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`prefix_kv`: keys and values (1 or B, Hkv, n, hd) of n tokens in front of the sequence (prompt methods),
        attended by every query; `mask` then covers [prefix keys, own keys] (`with_prefix_keys`)."""
        q, k, v = self.qkv(self, x)  # x: (B, T, d_model)
        return self.o_proj(self.mix(q, k, v, rope, mask, cache, slots, prefix_kv))

    def heads(self, q, k, v, rope=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected q (B, T, H*hd), k, v (B, T, Hkv*hd) → per-head (B, H, T, hd), (B, Hkv, T, hd) x 2, with the
        qk-norm and (given `rope` = (cos, sin)) RoPE applied."""
        B, T, _ = q.shape
        hd = self.cfg.dim_per_head
        if self.q_norm is not None:  # over the last `n` dims: a head (hd) or the whole projection
            q = self.q_norm(q.unflatten(-1, (-1, self.q_norm.dim))).flatten(-2)
            k = self.k_norm(k.unflatten(-1, (-1, self.k_norm.dim))).flatten(-2)
        q = q.view(B, T, -1, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, -1, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, -1, hd).transpose(1, 2)
        if isinstance(rope, QueryScale):  # a NoPE layer with temperature tuning (Llama 4)
            q = (q * rope.scale).to(q.dtype)  # in fp32, as the reference
        elif rope is not None:
            q = apply_rope(q, *rope, interleaved=self.cfg.rope_interleaved)
            k = apply_rope(k, *rope, interleaved=self.cfg.rope_interleaved)
        return q, k, v

    def attend(self, q, k, v, mask) -> torch.Tensor:
        """q (B, H, T, hd) over k, v (B, Hkv, S, hd) with this model's score scale and soft-cap → (B, H, T, hd)."""
        return attend(q, k, v, mask, self.cfg.attn_scale, self.cfg.attn_logit_softcap, self.sinks)

    def mix(self, q, k, v, rope, mask, cache: KVCache | None, slots: torch.Tensor | None,
            prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Attention over projected q (B, T, H*hd), k and v (B, T, Hkv*hd): qk-norm, RoPE, the cache, the prefix
        keys/values, the mask → (B, T, H*hd), what o_proj takes."""
        B, T, _ = q.shape
        # a paged cache attends itself (its kernels may rotate q/k too); prefix keys go through update + SDPA
        attending = cache is not None and prefix_kv is None and isinstance(cache, AttendingCache)
        rotated_by_cache = attending and isinstance(rope, tuple) and cache.rotates
        q, k, v = self.heads(q, k, v, None if rotated_by_cache else rope)
        extra = {} if self.sinks is None else {"sinks": self.sinks}
        if attending:
            y = cache.attend(self.layer, q, k, v, mask, rope if rotated_by_cache else None, **extra)  # (B, H, T, hd)
        else:
            if cache is not None:
                k, v = cache.update(self.layer, slots, k, v)  # (B, Hkv, S, hd)
            if prefix_kv is not None:  # n prefix keys/values in front of the sequence's own: (B, Hkv, n + S, hd)
                pk, pv = prefix_kv
                k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
                v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
            y = self.attend(q, k, v, mask)  # (B, H, T, hd)
        return y.transpose(1, 2).reshape(B, T, -1)


# Linear classes whose output is exactly x @ weight.T + bias (no quantization or adapter inside): what MLA may
# absorb into its query/output. The infer side registers its GEMV-routed linear here.
PLAIN_LINEARS: set[type] = {nn.Linear}
MLA_NORM_EPS = 1e-6  # DeepSeek's q/kv latent RMSNorms use their default eps, not rms_norm_eps


class LatentAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention (MLA), `attention: mla`.

    Each token writes one compressed latent: c = RMSNorm(W_dkv x) (mla_kv_rank dims) and one RoPE key part
    k_rope = RoPE(W_kr x) (mla_rope_dim dims) shared by all heads; that pair is all the KV cache holds
    (`cfg.cache_shapes`). Keys and values of every head come from the latent: [k_nope | v] = W_ukv c (kv_b_proj),
    k = [k_nope | k_rope]. Queries are q = W_q x or, low-rank, W_uq RMSNorm(W_dq x), split the same way into
    [q_nope | q_rope]. The softmax scale is 1/sqrt(nope + rope dims) times YaRN's mscale^2 (`cfg.softmax_scale`).

    Two equal ways to attend over the cached latents: expand keys/values for every cached token (training and
    prefill), or absorb W_uk into the query and W_uv into the output and attend over the latents themselves as
    one shared key/value head (decode: cheaper when few queries meet many cached tokens; needs a plain kv_b_proj).
    """

    def __init__(self, cfg: ModelConfig, prefix: str, linear: LinearFactory, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        d, H, qk = cfg.d_model, cfg.n_heads, cfg.qk_head_dim
        if cfg.mla_q_rank:
            self.q_a_proj = linear(f"{prefix}.q_a_proj", d, cfg.mla_q_rank, False)
            self.q_a_norm = RMSNorm(cfg.mla_q_rank, MLA_NORM_EPS)
            self.q_b_proj = linear(f"{prefix}.q_b_proj", cfg.mla_q_rank, H * qk, False)
        else:
            self.q_proj = linear(f"{prefix}.q_proj", d, H * qk, False)
        self.kv_a_proj_with_mqa = linear(f"{prefix}.kv_a_proj_with_mqa", d, cfg.mla_kv_rank + cfg.mla_rope_dim, False)
        self.kv_a_norm = RMSNorm(cfg.mla_kv_rank, MLA_NORM_EPS)
        self.kv_b_proj = linear(f"{prefix}.kv_b_proj", cfg.mla_kv_rank, H * (cfg.mla_nope_dim + cfg.mla_v_dim), False)
        self.o_proj = linear(f"{prefix}.o_proj", H * cfg.mla_v_dim, d, False)

    def forward(self, x, rope, mask, cache: Cache | None, slots: torch.Tensor | None, prefix_kv=None) -> torch.Tensor:
        if prefix_kv is not None:
            raise NotImplementedError("prefix keys/values with latent attention (mla): its cache holds latents")
        cfg = self.cfg
        B, T, _ = x.shape  # x: (B, T, d_model)
        nope, rd = cfg.mla_nope_dim, cfg.mla_rope_dim
        q = self.q_proj(x) if cfg.mla_q_rank == 0 else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(B, T, cfg.n_heads, nope + rd).transpose(1, 2).split([nope, rd], -1)  # (B, H, T, .)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([cfg.mla_kv_rank, rd], -1)
        latent = self.kv_a_norm(latent)[:, None]  # (B, 1, T, r)
        k_rope = k_rope[:, None]  # (B, 1, T, rd)
        q_rope = apply_rope(q_rope, *rope, interleaved=cfg.rope_interleaved)
        k_rope = apply_rope(k_rope, *rope, interleaved=cfg.rope_interleaved)
        if cache is not None:
            latent, k_rope = cache.update(self.layer, slots, latent, k_rope)  # (B, 1, S, r), (B, 1, S, rd)
        if cache is not None and self._absorbs(T):
            y = self._attend_latent(q_nope, q_rope, latent, k_rope, mask)
        else:
            y = self._attend_expanded(q_nope, q_rope, latent, k_rope, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # y: (B, H, T, v)

    def _absorbs(self, T: int) -> bool:
        """Attend over the latents when that is cheaper: T queries cost T * (2r + rd) per head and cached token,
        expanding costs r * (nope + v) per head and cached token."""
        cfg = self.cfg
        plain = type(self.kv_b_proj) in PLAIN_LINEARS
        cost = T * (2 * cfg.mla_kv_rank + cfg.mla_rope_dim)
        return plain and cost < cfg.mla_kv_rank * (cfg.mla_nope_dim + cfg.mla_v_dim)

    def _attend_expanded(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        cfg = self.cfg
        B, H, _, _ = q_nope.shape
        S = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0]).view(B, S, H, cfg.mla_nope_dim + cfg.mla_v_dim).transpose(1, 2)
        k_nope, v = kv.split([cfg.mla_nope_dim, cfg.mla_v_dim], -1)  # (B, H, S, nope), (B, H, S, v)
        k = torch.cat([k_nope, k_rope.expand(B, H, S, -1)], -1)
        return attend(torch.cat([q_nope, q_rope], -1), k, v, mask, scale=cfg.softmax_scale)

    def _attend_latent(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """q_nope . (W_uk c) = (W_uk^T q_nope) . c: one key/value head of [c | k_rope] / c, then W_uv on the output."""
        cfg = self.cfg
        H, r = cfg.n_heads, cfg.mla_kv_rank
        w = self.kv_b_proj.weight.view(H, cfg.mla_nope_dim + cfg.mla_v_dim, r)
        w_uk, w_uv = w[:, :cfg.mla_nope_dim], w[:, cfg.mla_nope_dim:]  # (H, nope, r), (H, v, r)
        q = torch.cat([torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk), q_rope], -1)  # (B, H, T, r + rd)
        out = attend(q, torch.cat([latent, k_rope], -1), latent, mask, scale=cfg.softmax_scale)  # (B, H, T, r)
        return torch.einsum("bhtr,hvr->bhtv", out, w_uv)


class MLP(nn.Module):
    """Gated (SwiGLU/GeGLU): down(act(gate(x)) * up(x)).  GELU-style: down(act(up(x))).

    `d_ff`/`gated`/`bias` default to the config's dense MLP; MoE experts pass their own (always gated). With
    `glu_limit` set, the gate is GPT-OSS's clamped SwiGLU (see `glu`).
    """

    def __init__(self, cfg: ModelConfig, prefix: str, linear: LinearFactory, d_ff: int | None = None,
                 gated: bool | None = None, bias: bool | None = None):
        super().__init__()
        self.act = ACTIVATIONS[cfg.act]
        self.gated = cfg.mlp != "gelu" if gated is None else gated
        self.limit, self.alpha = cfg.glu_limit, cfg.glu_alpha
        f = d_ff or cfg.d_ff
        bias = (cfg.mlp_bias and d_ff is None) if bias is None else bias
        if self.gated:
            self.gate_proj = linear(f"{prefix}.gate_proj", cfg.d_model, f, bias)
        self.up_proj = linear(f"{prefix}.up_proj", cfg.d_model, f, bias)
        self.down_proj = linear(f"{prefix}.down_proj", f, cfg.d_model, bias)
        if self.gated:
            self.gate_up_down = GatedProjections()

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """act(gate) * up; GPT-OSS (glu_limit): gate clamped above at the limit, up to +-limit, then
        (up + 1) * gate * sigmoid(alpha * gate)."""
        if self.limit is None:
            return self.act(gate) * up
        gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.gate_up_down(self, x)
        return self.down_proj(self.act(self.up_proj(x)))


ATTENTIONS: dict[str, type[nn.Module]] = {"gqa": Attention, "mla": LatentAttention}


class Block(nn.Module):
    """A residual block of attention then MLP, its norms where `norm_placement` puts them:

        pre       x = x + attn(attn_norm(x));                x = x + mlp(mlp_norm(x))                (Llama)
        sandwich  x = x + attn_post_norm(attn(attn_norm(x))); x = x + mlp_post_norm(mlp(mlp_norm(x)))  (Gemma 2/3)
        post      x = x + attn_post_norm(attn(x));            x = x + mlp_post_norm(mlp(x))           (OLMo 2)

    With `parallel_block` (Phi) both branches read the same normed input and there is no second norm. Absent norms
    are None. The MLP is dense or a mixture of experts."""

    def __init__(self, cfg: ModelConfig, layer: int, linear: LinearFactory):
        super().__init__()
        pre, post = cfg.norm_placement in ("pre", "sandwich"), cfg.norm_placement in ("sandwich", "post")
        self.attn_norm = make_norm(cfg) if pre else None
        self.attn = ATTENTIONS[cfg.attention](cfg, f"layers.{layer}.attn", linear, layer)
        self.attn_post_norm = make_norm(cfg) if post else None
        self.mlp_norm = make_norm(cfg) if pre and not cfg.parallel_block else None
        prefix = f"layers.{layer}.mlp"
        self.mlp = MoE(cfg, prefix, linear, MLP) if cfg.is_moe_layer(layer) else MLP(cfg, prefix, linear)
        self.mlp_post_norm = make_norm(cfg) if post else None

    def forward(self, x, rope, mask, cache, slots, prefix_kv=None):
        """x (B, T, d_model) → (B, T, d_model); `prefix_kv` (k, v) of prefix tokens this layer's attention sees."""
        prefix = () if prefix_kv is None else (prefix_kv,)
        if self.attn.cfg.parallel_block:
            h = self.attn_norm(x)
            return x + self.attn(h, rope, mask, cache, slots, *prefix) + self.mlp(h)
        h = self.attn(x if self.attn_norm is None else self.attn_norm(x), rope, mask, cache, slots, *prefix)
        x = x + (h if self.attn_post_norm is None else self.attn_post_norm(h))
        h = self.mlp(x if self.mlp_norm is None else self.mlp_norm(x))
        return x + (h if self.mlp_post_norm is None else self.mlp_post_norm(h))


@dataclass(frozen=True)
class CheckpointPolicy:
    """Activation checkpointing: which blocks recompute their activations in backward instead of keeping them.

    Every `every`-th block (0 = none), the lowest `limit` of those only (None = no cap): their activations would
    live longest, and the blocks above keep theirs (spare memory buys back recompute time). `preserve_rng`: the
    recompute replays the forward's RNG state (needed only when something random runs, i.e. dropout; off lets a
    CUDA graph capture the step)."""

    every: int = 0
    limit: int | None = None
    preserve_rng: bool = True

    def applies(self, layer: int) -> bool:
        every, limit = self.every, self.limit
        return bool(every) and layer % every == 0 and (limit is None or layer // every < limit)


def transformers_in(module: nn.Module) -> list[Transformer]:
    """The `Transformer`s inside `module`, itself included: the backbone(s) of a wrapper such as a reward model or a
    policy with a value head."""
    return [m for m in module.modules() if isinstance(m, Transformer)]


class Transformer(nn.Module):
    """Token ids in, logits out; one forward for training, prefill and cached decode."""

    def __init__(self, cfg: ModelConfig, linear: LinearFactory = default_linear,
                 checkpointing: CheckpointPolicy = CheckpointPolicy()):
        super().__init__()
        self.cfg = cfg
        self.checkpointing = checkpointing  # activation checkpointing in training forwards (`set_checkpointing`)
        self.attention_backend = "auto"  # "auto" | "sdpa" | "flex": how packed rows are masked
        self.aux_loss: torch.Tensor | None = None  # MoE load-balancing (+ z) loss of the last training forward
        # how quantized linears were made (method and options; lmforge.quant fills it), written into config.json's
        # quantization_config on save; empty for a model in full precision
        self.quantization_config: dict = {}
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # virtual tokens in front of every row (prompt methods): `cached_prefix(model)` → per layer (k, v), see
        # `hidden_states(prefix_kv=...)`; None = none
        self.register_module("prompt_encoder", None)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.layers = nn.ModuleList(Block(cfg, i, linear) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else linear("lm_head", cfg.d_model, cfg.vocab_size, cfg.lm_head_bias)
        self.tied_head = TiedHead()  # the matmul of a tied head (lm_head None): hidden @ embed.weight.T
        # RoPE tables, one per distinct (base, scaling): "global" (rope_theta, rope_scaling) and, with
        # rope_local_theta, "local" (Gemma 3's sliding-window layers); layers pick theirs by cfg.layer_rope.
        kinds = dict.fromkeys(k for k in map(cfg.layer_rope, range(cfg.n_layers)) if k is not None)
        self.rotary = nn.ModuleDict({k: Rotary(cfg, *(
            (cfg.rope_theta, cfg.rope_scaling) if k == "global" else (cfg.rope_local_theta, cfg.rope_local_scaling)))
            for k in kinds})
        # Derived constants, rebuilt (not loaded) so checkpoints never carry them.
        self.register_buffer("rope_inv_freq", torch.empty(0), persistent=False)
        self.register_buffer("alibi_slopes", torch.empty(0), persistent=False)
        self.reset_buffers()
        self.reset_parameters()

    def reset_buffers(self) -> None:
        """(Re)compute RoPE frequencies / ALiBi slopes on the current device, e.g. after building on `meta`."""
        device = self.embed.weight.device
        if device.type == "meta":
            return
        if self.cfg.pos == "rope":
            self.rope_inv_freq = rope_inv_freq(self.cfg).to(device)  # the global table's (short-context) frequencies
        for rotary in self.rotary.values():
            rotary.reset(device)
        if self.cfg.pos == "alibi":
            self.alibi_slopes = alibi_slopes(self.cfg.n_heads).to(device)

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per layer, the (cos, sin) (B, 1, T, rotary_dim/2) its attention rotates q and k with, or None (no RoPE:
        ALiBi/learned positions, or a NoPE layer), or for NoPE layers with temperature tuning (Llama 4) a
        `QueryScale`. Layers of one kind share one table, built once per forward."""
        tables = {kind: rotary(positions, dtype) for kind, rotary in self.rotary.items()}
        if self.cfg.attn_temperature_tuning:  # NoPE layers get a per-position query scale instead (Llama 4)
            tables[None] = QueryScale(temperature_scale(self.cfg, positions))
        return [tables.get(self.cfg.layer_rope(i)) for i in range(self.cfg.n_layers)]

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Random init for training from scratch: N(0, std) weights, residual outputs scaled by 1/sqrt(2 * layers)."""
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if p.ndim == 1:  # norms and biases
                offset = self.cfg.norm_weight_offset if self.cfg.norm == "rms" else 0.0
                p.fill_(1.0 - offset) if name.endswith("norm.weight") else p.zero_()
            else:
                scale = (2 * self.cfg.n_layers) ** -0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1
                p.normal_(0.0, std * scale)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) token ids
        positions: torch.Tensor | None = None,  # (B, T) absolute positions; -1 marks a padding token
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 = real token, 0 = padding (HF convention)
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,  # (T,) cache slots the new tokens fill; needed with `cache`
        document_ids: torch.Tensor | None = None,  # (B, T) packed rows: tokens attend within their document only
        prefix_lengths: torch.Tensor | None = None,  # (B,) prefix-LM: positions < this attend bidirectionally
    ) -> torch.Tensor:
        """Logits (B, T, vocab)."""
        return self.logits(self.hidden_states(tokens, positions, attention_mask, cache, slots, document_ids,
                                              prefix_lengths))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.tied_head(hidden, self.embed.weight) if self.lm_head is None else self.lm_head(hidden)
        cap = self.cfg.final_logit_softcap
        return out if cap is None else torch.tanh(out / cap) * cap  # Gemma 2: logits squashed into (-cap, cap)

    def head_weight(self) -> torch.Tensor | None:
        """The (vocab, d_model) matrix W when `logits(h)` is exactly ``h @ W.T`` (tied embeddings, or a bias-free
        plain nn.Linear head): what the fused linear + cross-entropy loss needs. None for any other head (LoRA- or
        quantized-wrapped, biased) and for tensor-parallel DTensor weights: those take the checkpointed loss."""
        head = self.embed if self.lm_head is None else self.lm_head
        if self.cfg.final_logit_softcap is not None:  # the logits are not h @ W.T: soft-capped after it
            return None
        if self.lm_head is not None and (type(head) is not nn.Linear or head.bias is not None):
            return None
        weight = getattr(head, "weight", None)
        return None if weight is None or isinstance(weight, DTensor) else weight

    def hidden_states(self, tokens, positions=None, attention_mask=None, cache=None, slots=None,
                      document_ids=None, prefix_lengths=None, plain: bool | None = None,
                      prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model): what the LM head, a value head or a fused loss consumes.

        The steps are public, for callers that run part of the model (pipeline stages, prompt methods):
        `default_positions` → `embed_inputs` → `rope_tables` + `layer_masks` → `run_blocks` (any range) → `norm`.

        `prefix_lengths` (B,) turns on prefix-LM attention (GLM's blank infilling, T5-style prefix LM): tokens at
        positions below it see each other in both directions (within their document); later tokens stay causal.
        `prefix_kv`: per layer (k, v), each (1 or B, Hkv, n, hd), of n virtual tokens at positions 0..n-1 in front
        of every row, visible to every query (prompt methods); the real tokens' positions (given or default) are
        shifted by n. Without it the model's `prompt_encoder` (when a prompt method set one) supplies it.
        In training mode an MoE model leaves its auxiliary loss in `self.aux_loss` (padding excluded).
        `plain`: the caller already knows whether `positions` are `plain_causal` (checked on the host before the copy:
        no sync here, as a CUDA graph needs); None = check.
        """
        if cache is not None and slots is None:
            raise ValueError("forward with a KV cache needs `slots`: the cache indices the new tokens fill")
        if prefix_kv is None and self.prompt_encoder is not None:
            prefix_kv = self.prompt_encoder.cached_prefix(self)
        if prefix_kv is not None:  # the virtual tokens take positions 0..n-1: the real ones start at n
            if positions is None:
                positions = self.default_positions(tokens, attention_mask, slots)
            n = prefix_kv[0][0].shape[2]
            positions, attention_mask = torch.where(positions >= 0, positions + n, positions), None
        # a mask unless causality alone suffices (right-padded training rows: `plain_causal`, one host sync)
        needs_mask = (attention_mask is not None or document_ids is not None or prefix_lengths is not None
                      or cache is not None
                      or (positions is not None and not (plain if plain is not None else plain_causal(positions))))
        if positions is None:
            positions = self.default_positions(tokens, attention_mask, slots)

        x = self.embed_inputs(tokens, positions)  # (B, T, d_model)
        ropes = self.rope_tables(positions, x.dtype)
        if cache is not None:
            key_positions = cache.write_positions(slots, positions)
            query_slots = cache.query_slots(slots)  # where the new tokens' keys are (moved in a ring buffer)
        else:
            key_positions, query_slots = positions, None
        flex = document_ids is not None and prefix_kv is None and self.use_flex_attention(tokens)
        masks = self.layer_masks(positions, key_positions, query_slots, needs_mask, document_ids, prefix_lengths,
                                 flex=flex, prefix=0 if prefix_kv is None else prefix_kv[0][0].shape[2])
        x = self.run_blocks(x, ropes, masks, cache, slots, prefix_kv)
        if self.cfg.mlp == "moe":
            moe_layers = [b.mlp for b in self.layers if isinstance(b.mlp, MoE)]
            self.aux_loss = moe_aux_loss(moe_layers, self.cfg, positions >= 0) if self.training else None
        return self.norm(x)

    def default_positions(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          slots: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) positions when the caller gives none: with an attention mask, real tokens counted from 0 and pads
        -1 (left or right padding); else 0..T-1 after the cache slot the tokens start at."""
        B, T = tokens.shape
        if attention_mask is not None:
            return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, -1)
        start = 0 if slots is None else slots[:1]
        return (torch.arange(T, device=tokens.device) + start).expand(B, T)

    def embed_inputs(self, tokens: torch.Tensor | None, positions: torch.Tensor,
                     embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Input of the first block (B, T, d_model): the token embeddings (or given `embeds` (B, T, d_model), e.g. a
        soft prompt) with the embedding scale, learned or sinusoidal positions and the embedding norm applied."""
        x = self.embed(tokens) if embeds is None else embeds.to(self.embed.weight.dtype)  # (B, T, d_model)
        if self.cfg.scale_embeddings:  # Gemma: sqrt(d) rounded to the activation dtype, as the reference does
            x = x * embedding_scale(self.cfg.d_model, x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions.clamp(min=0))
        elif self.cfg.pos == "sinusoidal":
            x = x + sinusoidal_embedding(positions, self.cfg.d_model, x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return x

    def layer_masks(self, positions, key_positions=None, query_slots=None, needs_mask: bool = True,
                    document_ids=None, prefix_lengths=None, flex: bool = False, prefix: int = 0,
                    layers: range | None = None) -> list:
        """Per layer (index i; None for layers outside `layers`), the mask its attention takes, built once per
        distinct (window, chunk) and shared. Queries at `positions` (B, T) over keys at `key_positions` (B, S)
        (default: the queries themselves), the queries at `query_slots` (T,) among the keys (default 0..T-1).
        `flex`: packed rows (`document_ids`) get a flex_attention BlockMask. `prefix`: n prefix keys in front,
        visible to every query (`with_prefix_keys`)."""
        T = positions.shape[1]
        key_positions = positions if key_positions is None else key_positions
        query_slots = torch.arange(T, device=positions.device) if query_slots is None else query_slots
        layers = range(len(self.layers)) if layers is None else layers
        spans = {i: self.cfg.layer_span(i) for i in layers}
        built = {}  # one mask per distinct (window, chunk), shared by the layers using it
        for window, chunk in dict.fromkeys(spans.values()):
            if document_ids is not None and flex:
                mask = document_block_mask(positions, document_ids, window, prefix_lengths, chunk)
            else:
                mask = self.span_mask(positions, key_positions, query_slots, needs_mask, document_ids, window,
                                      prefix_lengths, chunk)
                if prefix:
                    mask = with_prefix_keys(mask, prefix, positions,
                                            self.alibi_slopes if self.cfg.pos == "alibi" else None)
            built[window, chunk] = mask
        return [built[spans[i]] if i in spans else None for i in range(len(self.layers))]

    def run_blocks(self, x, ropes, masks, cache=None, slots=None, prefix_kv=None,
                   layers: range | None = None) -> torch.Tensor:
        """x (B, T, d_model) through blocks `layers` (default all) with per-layer `ropes` and `masks`; blocks in
        training mode that `checkpointed` names recompute their activations in backward."""
        for i in range(len(self.layers)) if layers is None else layers:
            block = self.layers[i]
            args = (x, ropes[i], masks[i], cache, slots) + (() if prefix_kv is None else (prefix_kv[i],))
            if block.training and self.checkpointed(i):
                x = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False,
                                                      preserve_rng_state=self.checkpointing.preserve_rng)
            else:
                x = block(*args)
        return x

    def set_checkpointing(self, policy: CheckpointPolicy) -> None:
        """Which blocks recompute their activations in backward from now on (see `CheckpointPolicy`)."""
        self.checkpointing = policy

    def checkpointed(self, layer: int) -> bool:
        """Is block `layer` recomputed in backward (the `CheckpointPolicy`)?"""
        return self.checkpointing.applies(layer)

    # shorthands for the policy's fields (scripts and tests set these)
    checkpoint_every = property(lambda self: self.checkpointing.every,
                                lambda self, v: self.set_checkpointing(replace(self.checkpointing, every=v)))
    checkpoint_limit = property(lambda self: self.checkpointing.limit,
                                lambda self, v: self.set_checkpointing(replace(self.checkpointing, limit=v)))
    checkpoint_rng = property(lambda self: self.checkpointing.preserve_rng,
                              lambda self, v: self.set_checkpointing(replace(self.checkpointing, preserve_rng=v)))

    def use_flex_attention(self, tokens: torch.Tensor) -> bool:
        """Packed rows use a flex_attention BlockMask on CUDA (sparse: skips other documents' blocks); elsewhere
        the dense boolean mask with SDPA (CPU flex is an unoptimized reference). ALiBi needs the dense bias."""
        return self.attention_backend == "flex" or (
            self.attention_backend == "auto" and tokens.is_cuda and self.cfg.pos != "alibi" and _HAS_FLEX)

    def span_mask(self, positions, key_positions, query_slots, needs_mask: bool, document_ids=None, window=None,
                  prefix_lengths=None, chunk=None):
        """The dense mask of layers with this (window, chunk): None (plain causal SDPA) when nothing but causality
        applies; else a bool mask (B, 1, T, S) or an ALiBi bias (B, H, T, S)."""
        cfg = self.cfg
        if not needs_mask and cfg.pos != "alibi" and window is None and chunk is None:
            return None
        allowed = allowed_keys(positions, key_positions, query_slots, window, document_ids, prefix_lengths, chunk)
        if cfg.pos == "alibi":
            return alibi_bias(allowed, positions, key_positions, self.alibi_slopes, self.embed.weight.dtype)
        return allowed

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A static KV cache for `max_len` positions; a ring buffer of about the window instead when every layer
        uses a sliding window and `max_len` is longer than that (memory stays flat however long the output)."""
        w, cfg = self.embed.weight, self.cfg
        ring = cfg.sliding_window is not None and cfg.sliding_window_layers is None
        if ring and max_len > cfg.sliding_window + RING_CHUNK - 1:
            return RollingKVCache(cfg, batch_size, cfg.sliding_window, RING_CHUNK, dtype=w.dtype, device=w.device)
        return KVCache(cfg, batch_size, max_len, dtype=w.dtype, device=w.device)
