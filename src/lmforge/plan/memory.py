"""Peak GPU memory of a training step and of inference, from the ModelConfig alone, tensor by tensor.

The training model follows what lmforge's trainer really keeps alive (read from the code, checked on the CPU with the
profiler: `lmforge.plan.measure`):

- **Static**: weights (fp32 master + bf16 autocast for `bf16`/`fp16`; bf16 for `bf16-pure`; frozen bases in bf16
  and NF4 codes for LoRA/QLoRA, bf16 under prefix tuning's fp32 prefix), gradients of the trainable parameters,
  optimizer states (AdamW m+v in the parameter's dtype; 8-bit, SGD, LOMO, BAdam, GaLore variants), sharded by ZeRO
  stage or moved to the host.
- **Activations per layer** (saved for backward), per token: norm inputs in fp32, linear inputs (one bf16 cast per
  linear when the residual stream is fp32 under autocast), q/k/v/out and the log-sum-exp of attention, the bf16
  copy of the training mask per layer (lmforge passes a boolean mask for padded rows; SDPA turns it into a bias of the
  query dtype and keeps it; prefix tuning always takes that path, over n prefix + T keys), SwiGLU's four (B, T, d_ff)
  tensors, LoRA's rank-r intermediates. With activation checkpointing only each block's input stays; one block is
  recomputed at a time in backward.
- **The loss**: lmforge's fused linear + cross-entropy runs the head in chunks of ~1,024 rows at a 128k vocabulary
  (fp32 logits of 512 MiB) and computes each chunk's gradients in forward, so the logits cost ~8 bytes x chunk x
  vocab (fp32 logits + log-sum-exp's temporary), plus the labelled rows' gradient and, when the head trains, its
  fp32 weight gradient from forward on; never tokens x vocab, and nothing vocabulary-sized in backward.
- **Timeline**: the peak is the largest of: end of forward (inside the last loss chunk), start of backward (the
  loss's stored gradients with every activation alive), each block's backward (activations of the blocks below + gradients
  of the blocks above + that block's temporaries), and the optimizer step. Autocast's bf16 weight copies (full
  fine-tuning in mixed precision) live from their first use to their block's backward.

The numbers are "allocated" bytes, what `torch.cuda.max_memory_allocated` reports. Whether a run fits also needs the
CUDA context and the caching allocator's slack (`Overheads`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..models.config import ModelConfig
from ..train.loss import CHECKPOINT_CHUNK_TOKENS, fused_chunk_rows

GiB = 2**30
LOSS_FWD_BYTES = 8  # eager loss, per chunk row x vocab entry: fp32 logits + log-sum-exp's fp32 temporary

METHODS = ("full", "lora", "dora", "qlora", "prefix")  # the training methods the planner models
OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "lomo", "adalomo", "adamw_backward", "badam", "galore")
Method = Literal[METHODS]
Precision = Literal["fp32", "bf16", "fp16", "bf16-pure"]
Optimizer = Literal[OPTIMIZERS]
ADAPTERS = ("lora", "dora", "qlora")  # frozen base + trained low-rank updates
FROZEN_BASE = (*ADAPTERS, "prefix")  # the base stays frozen (in the half dtype under autocast); small things train
IN_BACKWARD = ("lomo", "adalomo", "adamw_backward")  # optimizers that update each weight in backward, free its grad
PLAIN_ADAM_BYTES = 16  # lmforge's own Adam step (BAdam, GaLore's other weights) per element: the fp32 gradient,
# m / (1 - b1^t), sqrt(v / (1 - b2^t)) and their quotient, all fp32 and alive at once
Attention = Literal["auto", "masked", "flash", "flex", "eager"]
Quant = Literal["none", "int8", "int4", "nf4"]

# bytes per weight element of quantized storage, constants included (NF4: double-quantized block-64 absmax as in
# lmforge.quant.nf4; INT8/INT4: one fp16 scale per row / per group of 128)
QUANT_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0, "int4": 0.5 + 2 / 128}
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "int8": 1,
               "fp8": 1, "float8": 1}


@dataclass(frozen=True)
class LinearShape:
    name: str  # q_proj, k_proj, ... (module names of lmforge.models.transformer)
    in_features: int
    out_features: int
    bias: bool

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + self.out_features * self.bias


def layer_linears(cfg: ModelConfig) -> list[LinearShape]:
    """The linear layers of one transformer block, in forward order."""
    d, q, kv, f = cfg.d_model, cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head, cfg.d_ff
    out = [LinearShape("q_proj", d, q, cfg.qkv_bias), LinearShape("k_proj", d, kv, cfg.qkv_bias),
           LinearShape("v_proj", d, kv, cfg.qkv_bias), LinearShape("o_proj", q, d, cfg.out_bias)]
    if cfg.attention == "mla":
        H, qk, qr, r = cfg.n_heads, cfg.qk_head_dim, cfg.mla_q_rank, cfg.mla_kv_rank
        q_side = ([LinearShape("q_a_proj", d, qr, False), LinearShape("q_b_proj", qr, H * qk, False)] if qr
                  else [LinearShape("q_proj", d, H * qk, False)])
        out = [*q_side, LinearShape("kv_a_proj_with_mqa", d, r + cfg.mla_rope_dim, False),
               LinearShape("kv_b_proj", r, H * (cfg.mla_nope_dim + cfg.mla_v_dim), False),
               LinearShape("o_proj", H * cfg.mla_v_dim, d, False)]
    if cfg.mlp == "swiglu":
        out.append(LinearShape("gate_proj", d, f, cfg.mlp_bias))
    return out + [LinearShape("up_proj", d, f, cfg.mlp_bias), LinearShape("down_proj", f, d, cfg.mlp_bias)]


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by where they live; ``total`` equals ``ModelConfig.num_params()``."""

    embed: int  # token (+ learned position) embeddings and the embedding norm
    head: int  # untied LM head (0 when tied)
    layer_linear: int  # linear weights + biases of one block
    layer_other: int  # norms of one block
    final_norm: int
    n_layers: int

    @property
    def layer(self) -> int:
        return self.layer_linear + self.layer_other

    @property
    def total(self) -> int:
        return self.embed + self.head + self.n_layers * self.layer + self.final_norm


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Parameters by place, consistent with ``ModelConfig.num_params`` (whatever block variant the config uses:
    the per-block figure is what the config counts, the linear share is the dense attention + MLP layout)."""
    d = cfg.d_model
    norm = d * (2 if cfg.norm == "layer" else 1)
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d + cfg.vocab_size * getattr(cfg, "lm_head_bias", False)
    body = cfg.num_params(include_embeddings=False)
    embed = cfg.num_params() - body - head
    per_layer = (body - norm) // cfg.n_layers
    linear = min(sum(li.params for li in layer_linears(cfg)), per_layer)
    return ParamCounts(embed, head, linear, per_layer - linear, body - norm - per_layer * cfg.n_layers + norm,
                       cfg.n_layers)


@dataclass
class TrainSetup:
    """What a training run does, as far as memory is concerned (filled from a TrainConfig by `setup_from_train`)."""

    micro_batch: int = 1
    seq_len: int = 2048
    method: Method = "full"
    precision: Precision = "bf16"
    activation_checkpointing: bool = False
    checkpoint_blocks: int | None = None  # with checkpointing: recompute only the lowest k blocks (None = all)
    grad_accum: int = 1
    optimizer: Optimizer = "adamw"
    optimizer_impl: Literal["fused", "foreach", "for-loop"] = "fused"
    """fused AdamW (CUDA) needs no temporaries; foreach holds sqrt(v) of every parameter at once; the for-loop
    implementation (CPU) a few copies of the largest parameter."""
    momentum: float = 0.0  # SGD
    lora_r: int = 8
    lora_targets: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"])
    lora_dropout: float = 0.0
    prefix_tokens: int = 20  # prefix tuning: virtual tokens (prefix.num_virtual_tokens)
    prefix_projection: bool = False  # prefix tuning through the reparameterisation MLP (prefix.prefix_projection)
    prefix_hidden: int = 512  # that MLP's width (prefix.encoder_hidden_size)
    galore_rank: int = 128
    galore_min_dim: int = 0  # GaLore projects block matrices whose shorter side is > rank and >= this
    grad_clip: bool = True  # global-norm clipping (train.grad_clip): half-precision gradients are read in fp32
    badam_blocks: int | None = None  # BAdam: number of blocks the layers are split into (default: one per layer)
    attention: Attention = "auto"  # auto: flex for packed rows, else causal SDPA (right-padded rows need no mask)
    packing: bool = False
    labeled_fraction: float = 1.0  # share of tokens with a target (SFT prompts cost nothing in the LM head)
    loss_chunk_tokens: int | None = None  # rows per fused loss chunk; None = lmforge.train.loss's default
    gpus: int = 1
    zero_stage: int = 0  # 0 = replicate (DDP), 1 = shard optimizer, 2 = + gradients, 3 = + weights (FSDP)
    offload_optimizer: bool = False  # optimizer states (and fp32 master weights) on the host
    device: Literal["cuda", "cpu"] = "cuda"  # cuda adds cuBLAS workspaces (forward + autograd thread)

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


@dataclass
class Overheads:
    """Memory a run needs beyond its tensors: CUDA context + library handles, allocator slack, and a safety margin
    (docs/planner.md): a run predicted to fit must not then run out of memory."""

    cuda_context: int = int(0.5 * GiB)
    fragmentation: float = 0.05  # reserved / allocated - 1 of PyTorch's caching allocator in a steady training loop
    margin: float = 0.05  # safety margin on the predicted peak (what the model of the step may still miss)
    workspace: int = 64 * 2**20  # cuBLAS / attention kernel workspaces (counted as allocated)

    def reserve(self, allocated: int) -> int:
        """Bytes of device memory a run with this peak allocation needs in total."""
        return int(allocated * (1 + self.fragmentation + self.margin)) + self.cuda_context


@dataclass
class Estimate:
    """A peak-memory prediction: the breakdown at the peak, plus every phase's total."""

    peak: int  # bytes allocated at the peak (what max_memory_allocated would say)
    phase: str  # where the peak happens
    breakdown: dict[str, int]  # components at the peak, summing to `peak`
    phases: dict[str, int]  # every phase's total
    host: int = 0  # bytes kept in host memory (offloaded optimizer)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- training memory


def _targets(setup: TrainSetup, cfg: ModelConfig) -> set[str]:
    """Names of the block linears LoRA wraps, by PEFT's rules (lmforge.peft.lora.select_targets)."""
    from ..models.modules import select_targets

    paths = {f"layers.0.{'mlp' if li.name in ('gate_proj', 'up_proj', 'down_proj') else 'attn'}.{li.name}": li.name
             for li in layer_linears(cfg)}
    return {paths[p] for p in select_targets(list(paths), setup.lora_targets)}


def _lora_params(cfg: ModelConfig, setup: TrainSetup) -> int:
    """B and A of every target (+ DoRA's magnitude vector of out_features)."""
    targets = _targets(setup, cfg)
    per = (lambda li: setup.lora_r * (li.in_features + li.out_features)
           + (li.out_features if setup.method == "dora" else 0))
    return cfg.n_layers * sum(per(li) for li in layer_linears(cfg) if li.name in targets)


@dataclass
class _Dtypes:
    weight: float  # bytes per frozen/trainable base weight element on the device
    trainable_weight: int  # bytes per trainable parameter (master copy)
    residual: int  # dtype of the residual stream (embedding output)
    act: int  # dtype of linear outputs / attention
    autocast_copies: bool  # fp32 trainable weights cast to bf16 in every forward (autocast cache)
    norm_trainable: bool


def _dtypes(setup: TrainSetup) -> _Dtypes:
    adapter = setup.method in FROZEN_BASE
    if setup.precision == "fp32":
        return _Dtypes(4, 4, 4, 4, False, not adapter)
    if setup.precision == "bf16-pure":
        return _Dtypes(2, 2, 2, 2, False, not adapter)
    # bf16 / fp16 autocast: full fine-tuning keeps fp32 weights (residual stream fp32, linears cast per call);
    # adapter methods keep the frozen base in the half dtype (run_training does), so the stream is half too
    if adapter:
        return _Dtypes(2, 4, 2, 2, False, False)
    return _Dtypes(4, 4, 4, 2, True, True)


def _prefix_params(cfg: ModelConfig, setup: TrainSetup) -> list[int]:
    """Sizes of lmforge.peft.prompts.PrefixEncoder's parameters: the flat (n, L * 2 * kv_dim) prefix, or with the
    projection its (n, kv_dim) embedding and the Linear -> tanh -> Linear MLP that produces the flat prefix."""
    n, kv = setup.prefix_tokens, cfg.kv_heads * cfg.dim_per_head
    flat = cfg.n_layers * 2 * kv
    if not setup.prefix_projection:
        return [n * flat]
    h = setup.prefix_hidden
    return [n * kv, h * kv, h, flat * h, flat]


def _trainable_params(cfg: ModelConfig, setup: TrainSetup, counts: ParamCounts) -> int:
    if setup.method == "prefix":
        return sum(_prefix_params(cfg, setup))
    if setup.method in ADAPTERS:
        return _lora_params(cfg, setup)
    if setup.optimizer == "badam":
        blocks = setup.badam_blocks or cfg.n_layers
        return math.ceil(cfg.n_layers / blocks) * counts.layer
    return counts.total


def _galore_projects(li: LinearShape, setup: TrainSetup) -> bool:
    """lmforge.train.optimizers.galore_projects for a block linear."""
    side = min(li.in_features, li.out_features)
    return side > setup.galore_rank and side >= setup.galore_min_dim


def model_state_bytes(cfg: ModelConfig, setup: TrainSetup) -> tuple[dict[str, int], int]:
    """(device bytes of weights / gradients / optimizer states, host bytes) for one GPU."""
    counts = param_counts(cfg)
    dt = _dtypes(setup)
    n_train = _trainable_params(cfg, setup, counts)
    if setup.method == "qlora":
        quantized = cfg.n_layers * sum(li.in_features * li.out_features for li in layer_linears(cfg))
        weights = quantized * QUANT_BYTES["nf4"] + (counts.total - quantized) * 2 + n_train * 4
    elif setup.method in ("lora", "dora"):
        weights = counts.total * dt.weight + n_train * dt.trainable_weight
    elif setup.method == "prefix":  # the encoder is built in fp32 whatever the base's dtype (PrefixEncoder)
        weights = counts.total * dt.weight + n_train * 4
    elif setup.optimizer == "badam":
        weights = counts.total * dt.weight  # the active block trains in place (no master copy)
    else:
        weights = counts.total * dt.weight
    g = dt.trainable_weight if setup.method not in FROZEN_BASE else 4
    if setup.optimizer == "badam":
        g = 4
    grads = 0 if setup.optimizer in IN_BACKWARD else n_train * g  # updates inside backward: no stored gradients
    s = dt.trainable_weight if setup.method not in FROZEN_BASE else 4  # AdamW states take the param dtype
    if setup.optimizer in ("adamw", "adamw_backward"):
        opt = 2 * s * n_train
    elif setup.optimizer == "adamw8bit":
        opt = 2 * n_train + 8 * (n_train // 2048 + 1)  # 8-bit m and v, one fp32 scale per 2048-block
    elif setup.optimizer == "sgd":
        opt = s * n_train if setup.momentum else 0
    elif setup.optimizer == "lomo":
        opt = 0
    elif setup.optimizer == "adalomo":  # factored second moment: rows + columns of each matrix, vectors whole
        mats = [(li.in_features, li.out_features) for li in layer_linears(cfg)]
        per_layer = sum(i + o for i, o in mats) + counts.layer_other
        embeds = (cfg.vocab_size + cfg.d_model) * (1 + (counts.head > 0))
        opt = 4 * (cfg.n_layers * per_layer + embeds + counts.final_norm)
    elif setup.optimizer == "badam":
        opt = 8 * n_train
    elif setup.optimizer == "galore":  # m, v in the rank-r subspace of each projected matrix + its projector;
        r = setup.galore_rank  # the other weights (embeddings, head, norms, small matrices) get fp32 m and v
        proj = [li for li in layer_linears(cfg) if _galore_projects(li, setup)]
        per_layer = sum(r * (max(li.in_features, li.out_features) * 2 + min(li.in_features, li.out_features))
                        for li in proj)
        projected = cfg.n_layers * sum(li.in_features * li.out_features for li in proj)
        opt = 4 * (cfg.n_layers * per_layer + 2 * (n_train - projected))
    else:  # pragma: no cover - Literal guards this
        raise ValueError(setup.optimizer)
    n = max(setup.gpus, 1)
    stage = setup.zero_stage if n > 1 else 0
    host = 0
    if stage >= 1:
        opt = opt / n
    if stage >= 2:
        grads = grads / n
    if stage >= 3:
        weights = weights / n
    if setup.offload_optimizer:
        host, opt = int(opt), 0
    return {"weights": int(weights), "gradients": int(grads), "optimizer_states": int(opt)}, host


def zero_model_state_bytes(params: float, stage: int, gpus: int, optimizer_bytes: float = 12,
                           weight_bytes: float = 2, grad_bytes: float = 2) -> float:
    """Per-GPU bytes of model states under ZeRO (Rajbhandari et al. 2020, figure 1): (2 + 2 + K) * params
    replicated; stage 1 shards the K bytes of optimizer states (fp32 master + m + v = 12 for mixed-precision Adam),
    stage 2 also the gradients, stage 3 also the weights."""
    n = gpus if stage else 1
    return (weight_bytes / (n if stage >= 3 else 1) + grad_bytes / (n if stage >= 2 else 1)
            + optimizer_bytes / (n if stage >= 1 else 1)) * params


def zero_table(cfg: ModelConfig, setup: TrainSetup, gpus: int) -> list[dict]:
    """Per-GPU model states for ZeRO stages 0-3 over `gpus` data-parallel GPUs, two ways:

    - `paper`: Rajbhandari et al.'s mixed-precision Adam, Ψ = trainable parameters: 2Ψ bf16 weights + 2Ψ bf16
      gradients + 12Ψ optimizer states (fp32 master copy, m, v), stage 1 sharding the 12Ψ, 2 also the gradients,
      3 also the weights (`zero_model_state_bytes`);
    - `lmforge`: what lmforge's trainer holds for this setup (`model_state_bytes`): its precision keeps fp32 weights
      and gradients under autocast (4Ψ + 4Ψ + 8Ψ for m, v: the same 16Ψ, split differently), frozen bases too.
    """
    from dataclasses import replace

    psi = _trainable_params(cfg, setup, param_counts(cfg))
    rows = []
    for stage in range(4):
        n = gpus if stage else 1
        paper = {"weights": 2 * psi / (n if stage >= 3 else 1), "gradients": 2 * psi / (n if stage >= 2 else 1),
                 "optimizer_states": 12 * psi / (n if stage >= 1 else 1)}
        ours, host = model_state_bytes(cfg, replace(setup, zero_stage=stage, gpus=gpus))
        rows.append({"stage": stage, "gpus": gpus, "trainable_params": psi,
                     "paper": {**{k: int(v) for k, v in paper.items()}, "total": int(sum(paper.values()))},
                     "lmforge": {**ours, "total": sum(ours.values()), "host": host}})
    return rows


def _attention_kind(setup: TrainSetup, cfg: ModelConfig | None = None) -> str:
    if setup.attention != "auto":
        return setup.attention
    softcap = cfg is not None and cfg.attn_logit_softcap is not None
    if setup.method == "prefix":  # prefix keys take a boolean mask (`with_prefix_keys`): never is_causal nor flex
        return "eager" if softcap else "masked"
    if setup.packing:
        return "flex"  # soft-caps included (a score_mod)
    # soft-capped scores (Gemma 2) are beyond SDPA: lmforge's eager path materializes them
    return "eager" if softcap else "flash"


def _prefix_len(setup: TrainSetup) -> int:
    """Keys every query sees in front of its own (prefix tuning's virtual tokens); 0 for other methods."""
    return setup.prefix_tokens if setup.method == "prefix" else 0


def _mask_rows(setup: TrainSetup) -> int:
    """Batch dimension of the boolean (rows, 1, T, n + T) mask lmforge builds once per step and shares between blocks:
    one row per sequence for packed rows and `attention=masked`; right-padded rows with prefix keys need only
    causality plus the prefix (`with_prefix_keys` of no mask: one (1, 1, T, n + T) mask for the whole batch)."""
    return 1 if setup.method == "prefix" and not setup.packing and setup.attention == "auto" else setup.micro_batch


def _prefix_activation_bytes(cfg: ModelConfig, setup: TrainSetup) -> int:
    """What the prefix encoder keeps per step: nothing beyond its parameter for a plain prefix (each block reads a
    slice); through the projection MLP its input cast, tanh output and flat output in the activation dtype, and under
    autocast the half-precision copies of its two weights."""
    if setup.method != "prefix" or not setup.prefix_projection:
        return 0
    n, kv, h = setup.prefix_tokens, cfg.kv_heads * cfg.dim_per_head, setup.prefix_hidden
    flat, act = cfg.n_layers * 2 * kv, _dtypes(setup).act
    copies = 2 * h * (kv + flat) if setup.precision in ("bf16", "fp16") else 0
    return act * n * (kv + h + flat) + copies


def block_norms(cfg: ModelConfig) -> int:
    """Residual-stream norms per block: one (parallel block), two (pre or post), four (Gemma's sandwich)."""
    return 1 if cfg.parallel_block else 4 if cfg.norm_placement == "sandwich" else 2


def layer_activation_bytes(cfg: ModelConfig, setup: TrainSetup) -> dict[str, int]:
    """Bytes one block saves for backward over the micro-batch (no checkpointing), by component."""
    B, T, n = setup.micro_batch, setup.seq_len, setup.tokens
    dt = _dtypes(setup)
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.dim_per_head
    q, kv, H = cfg.n_heads * hd, cfg.kv_heads * hd, cfg.n_heads
    lin = {li.name: li for li in layer_linears(cfg)}
    adapter = setup.method in ADAPTERS
    targets = _targets(setup, cfg) if adapter else set()
    full = setup.method == "full"

    def saves_input(name: str) -> bool:
        return name in targets or (full and name in lin)

    norm = block_norms(cfg) * (4 * d + 4 + (dt.residual * d if dt.norm_trainable else 0)) * n
    if cfg.qk_norm != "none":  # fp32 inputs of the q/k norms and their per-row statistics
        rows = cfg.n_heads + cfg.kv_heads if cfg.qk_norm == "head" else 2
        norm += (4 * (q + kv) + 4 * rows) * n
    # Linear inputs: with an fp32 stream under autocast each linear keeps its own bf16 cast; otherwise q/k/v share
    # the norm output (and gate/up share theirs).
    cast_each = dt.residual != dt.act
    groups = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj") if cfg.mlp == "swiglu" else ("up_proj",)]
    inputs = 0
    for group in groups:
        saving = [g for g in group if saves_input(g)]
        inputs += (len(saving) if cast_each else min(len(saving), 1)) * dt.act * d * n
    inputs += (dt.act * q * n if saves_input("o_proj") else 0) + (dt.act * f * n if saves_input("down_proj") else 0)
    kind = _attention_kind(setup, cfg)
    S = T + _prefix_len(setup)  # keys per query: prefix tuning puts its n in front of the sequence's own
    attn = dt.act * (2 * q * n + 2 * kv * B * S) + 4 * H * n  # q, k, v (over all S keys), out + log-sum-exp (fp32)
    mask = 0
    if kind == "masked":  # SDPA keeps the mask as a bias of the query dtype; lmforge.models.attention.attend folds
        # each KV head's query group into the rows, expanding the mask to (B, 1, G*T, S) first; CUDA's
        # memory-efficient kernel pads a bias whose rows are not a multiple of 8 elements (preprocess_mask)
        G = H // cfg.kv_heads
        S_bias = -(-S // 8) * 8 if setup.device == "cuda" else S
        mask = dt.act * (B if G > 1 else _mask_rows(setup)) * G * T * S_bias
    elif kind == "eager" and cfg.attn_logit_softcap is not None:
        attn += (2 * dt.act + 4) * H * S * n  # tanh of the scores, fp32 softmax output, probabilities
    elif kind == "eager":
        attn += 2 * dt.act * H * S * n  # scores and probabilities
    mlp = (3 if cfg.mlp == "swiglu" else 1) * dt.act * f * n  # gate, act(gate), up | up (the product is down_proj's input)
    lora = 0
    if adapter:
        for name in targets:
            li = lin[name]
            lora += dt.act * setup.lora_r * n + 2 * setup.lora_r * (li.in_features + li.out_features)
            if setup.lora_dropout:
                lora += (dt.act + 1) * li.in_features * n  # dropped input + its mask
            if setup.method == "dora":  # the base output and the LoRA output, kept for the magnitude's gradient
                lora += 2 * dt.act * li.out_features * n
    dequant = 0
    if setup.method == "qlora" and not _nf4_kernel(setup, dt):  # the reference F.linear keeps the dequantized
        dequant = sum(dt.act * li.in_features * li.out_features for li in lin.values())  # weight for backward
    out = {"norms": norm, "linear_inputs": inputs, "attention": attn, "mlp": mlp}
    if mask:
        out["attention_mask_bias"] = mask
    if lora:
        out["lora"] = lora
    if dequant:
        out["dequantized_weights"] = dequant
    return out


def masked_attention_bytes(cfg: ModelConfig, setup: TrainSetup, layer: dict[str, int]) -> int:
    """A block's bytes while SDPA turns a boolean mask into its bias (0 unless attention takes one): what the block has
    saved so far (its first norm, q, k, v, the bias) plus the mask's transient copies: lmforge's GQA fold expands the
    boolean mask to (B, 1, G*T, S) (one byte per element) and, on CUDA, the memory-efficient kernel pads a bias whose
    rows are not a multiple of 8 elements into a fresh tensor while the unpadded one still exists. `layer`: the
    block's `layer_activation_bytes`."""
    if "attention_mask_bias" not in layer:
        return 0
    G, T = cfg.n_heads // cfg.kv_heads, setup.seq_len
    S = T + _prefix_len(setup)
    elements = (setup.micro_batch if G > 1 else _mask_rows(setup)) * G * T * S
    transient = (elements if G > 1 else 0) + (
        _dtypes(setup).act * elements if setup.device == "cuda" and S % 8 else 0)
    saved = layer["norms"] // block_norms(cfg) + layer["attention"] + layer.get("linear_inputs", 0) + layer.get(
        "lora", 0) + layer["attention_mask_bias"]
    return saved + transient


def _nf4_kernel(setup: TrainSetup, dt) -> bool:
    """NF4 weights go through lmforge's custom op (CUDA, half-precision activations): it saves only the codes and
    dequantizes again in backward, so no dequantized weight outlives its matmul (`lmforge.quant.qkernel`)."""
    return setup.device == "cuda" and dt.act == 2


def layer_backward_temp_bytes(cfg: ModelConfig, setup: TrainSetup) -> int:
    """Temporaries while one block runs backward, at its peak (the MLP's backward, attention's activations still
    alive): the gradient arriving from above and the one being summed for below (residual stream), two d_ff-wide
    gradients, and for full fine-tuning the down projection's fp32 gradient plus its half-precision form."""
    n, dt = setup.tokens, _dtypes(setup)
    per_token = 2 * dt.residual * cfg.d_model + 2 * dt.act * cfg.d_ff
    weight_grad = 0
    if setup.method == "full" and setup.optimizer not in IN_BACKWARD:
        down = cfg.d_ff * cfg.d_model
        weight_grad = dt.trainable_weight * down + (2 * down if dt.autocast_copies else 0)
    return per_token * n + weight_grad


def _in_backward_temp(setup: TrainSetup, numel: int, p: int) -> int:
    """Temporaries of an update applied inside backward to a weight of `numel` elements in a `p`-byte dtype:
    AdaLomo's fp32 gradient, its square, the normalised update and its row/column scalings (~16 bytes each);
    LOMO / AdamW-in-backward a clipped copy of the gradient."""
    return (PLAIN_ADAM_BYTES if setup.optimizer == "adalomo" else p) * numel


def _largest_trainable(cfg: ModelConfig, setup: TrainSetup) -> int:
    if setup.method == "prefix":
        return max(_prefix_params(cfg, setup))
    if setup.method in ADAPTERS:
        return max(setup.lora_r * max(li.in_features, li.out_features) for li in layer_linears(cfg))
    return max([cfg.vocab_size * cfg.d_model] + [li.in_features * li.out_features for li in layer_linears(cfg)])


def train_memory(cfg: ModelConfig, setup: TrainSetup) -> Estimate:
    """Predicted peak allocated bytes of one training step on one GPU (steady state: optimizer states exist)."""
    counts = param_counts(cfg)
    dt = _dtypes(setup)
    states, host = model_state_bytes(cfg, setup)
    n, B, T, V, d = setup.tokens, setup.micro_batch, setup.seq_len, cfg.vocab_size, cfg.d_model
    L = cfg.n_layers
    ckpt = setup.activation_checkpointing
    full_ft = setup.method == "full" and setup.optimizer != "badam"

    layer = layer_activation_bytes(cfg, setup)
    layer_total = sum(layer.values())
    # per block: a checkpointed block keeps only its input; `checkpoint_blocks` checkpoints the lowest k blocks and
    # the ones above keep their whole activations (Transformer.checkpointed)
    k = L if setup.checkpoint_blocks is None else min(L, setup.checkpoint_blocks)
    recomputed = [ckpt and i < k for i in range(L)]
    saved = [dt.residual * d * n if r else layer_total for r in recomputed]
    kind = _attention_kind(setup, cfg)
    prefixed = setup.method == "prefix"
    # lmforge's boolean (rows, 1, T, n + T) mask, shared by all blocks (soft-capped eager attention takes it too)
    mask_once = _mask_rows(setup) * T * (T + _prefix_len(setup)) if kind == "masked" or prefixed else 0
    rope = 2 * (cfg.rotary_dim // 2) * dt.residual * n if cfg.pos == "rope" else 0
    embed_saved = 8 * n + rope + mask_once + _prefix_activation_bytes(cfg, setup)
    n_lab = max(1, int(n * setup.labeled_fraction))
    final_norm = (4 * d + 4 + (dt.residual * d if dt.norm_trainable else 0)) * n
    head_saved = final_norm + (dt.residual * d + 17) * n_lab  # + the labelled rows' hidden states, indices, targets
    chunk = min(n_lab, setup.loss_chunk_tokens or fused_chunk_rows(V, n_lab, head_trains=full_ft))
    grad_rows = dt.act * d * n_lab  # d loss / d hidden of the labelled rows, computed in forward, used in backward
    # the fused loss: its chunk's logits, the rows' gradient, bf16 casts of fp32 rows and of an fp32 head weight,
    # and (full fine-tuning) a fresh fp32 weight gradient of the head, held from forward into backward
    head_fused = 4 * V * d if full_ft else 0
    # per chunk row x vocab entry: CUDA runs the Triton kernel (the logits in the compute dtype, their gradient
    # written over them); eager (CPU) holds the half logits, their fp32 copy and log-sum-exp's fp32 temporary
    per_entry = dt.act if setup.device == "cuda" else LOSS_FWD_BYTES + (dt.act if dt.act != 4 else 0)
    if cfg.final_logit_softcap is not None:  # soft-capped logits (Gemma 2) take the checkpointed loss: chunks of
        # CHECKPOINT_CHUNK_TOKENS rows, each with its logits, their fp32 tanh and the log-softmax temporaries
        chunk = min(n_lab, setup.loss_chunk_tokens or CHECKPOINT_CHUNK_TOKENS)
        per_entry = dt.act + 3 * 4
    loss_fwd = (per_entry * chunk * V + grad_rows + (dt.act * d * n_lab if dt.residual != dt.act else 0)
                + (2 * V * d if dt.autocast_copies else 0))

    # bf16 copies autocast makes of fp32 trainable weights (full fine-tuning in mixed precision)
    lin_layer = sum(li.in_features * li.out_features for li in layer_linears(cfg))
    copies_layer = 2 * lin_layer if dt.autocast_copies else 0
    # gradients arrive in backward order: LM head (or the tied embedding) first, then blocks from the top
    grads_total = states["gradients"]
    shard = grads_total / max(1, _trainable_params(cfg, setup, counts) * (dt.trainable_weight if full_ft else 4)) \
        if grads_total else 0
    gbytes = dt.trainable_weight if full_ft else 4
    head_grad = int(V * d * gbytes * shard) if full_ft else 0
    layer_grad = (counts.layer if full_ft else _trainable_params(cfg, setup, counts) / L) * gbytes * shard
    head_w_grad = V * d * dt.trainable_weight if full_ft else 0  # the fused loss's head gradient in the weight's dtype
    if setup.optimizer in IN_BACKWARD:  # a tied head's gradient waits for the embedding's, at the very end
        head_grad, layer_grad = (head_w_grad if cfg.tie_embeddings else 0), 0
    prior_grads = grads_total if setup.grad_accum > 1 else 0  # later micro-batches find the gradients allocated
    temp = layer_backward_temp_bytes(cfg, setup)
    if setup.method == "qlora":  # backward dequantizes each NF4 weight for the input gradient: the int32 code
        temp += 6 * max(li.in_features * li.out_features for li in layer_linears(cfg))  # indices, level pairs, W
    workspace = Overheads().workspace if setup.device == "cuda" else 0

    acts = sum(saved) + embed_saved + head_saved
    kept_copies = sum(not r for r in recomputed) * copies_layer  # autocast copies live until a kept block's backward
    phases: dict[str, dict[str, int]] = {}
    base = {"weights": states["weights"], "optimizer_states": states["optimizer_states"], "workspace": workspace}
    phases["forward end (loss chunk)"] = {**base, "gradients": prior_grads + head_fused, "activations": acts,
                                          "autocast_weight_copies": L * copies_layer, "loss_logits": loss_fwd}
    attn_masked = masked_attention_bytes(cfg, setup, layer)
    if attn_masked:  # the top block's attention in forward, every block below done (a boolean mask's bias built)
        phases["block forward (mask bias)"] = {
            **base, "gradients": prior_grads, "activations": sum(saved[:L - 1]) + embed_saved,
            "autocast_weight_copies": L * copies_layer, "attention_temporaries": attn_masked}
    # the loss's backward casts its fp32 head gradient to the weight's dtype while the fp32 one still exists
    phases["backward start (loss chunk)"] = {
        **base, "gradients": prior_grads + head_fused + (head_w_grad if head_w_grad != head_fused else 0),
        "activations": acts, "autocast_weight_copies": kept_copies, "loss_logits": grad_rows}
    # one block at a time, from the last: blocks below keep activations, blocks above have gradients
    worst: dict[str, int] = {}
    for i in range(L - 1, -1, -1):
        above = L - 1 - i
        grads = max(prior_grads, head_grad + above * layer_grad)
        live = {**base, "gradients": int(grads), "activations": sum(saved[:i + 1]) + embed_saved,
                "autocast_weight_copies": sum(not r for r in recomputed[:i + 1]) * copies_layer,
                "backward_temporaries": temp + (layer_total if recomputed[i] else 0)}
        if not worst or sum(live.values()) > sum(worst.values()):
            worst = live
        if recomputed[i] and attn_masked:  # its recompute builds the mask's bias again, the block's gradient waiting
            live = {**live, "backward_temporaries": attn_masked + dt.residual * d * n}
            if sum(live.values()) > sum(worst.values()):
                worst = live
    phases["block backward"] = worst
    embed_trains = full_ft
    if embed_trains:  # last of backward: the embedding's gradient (V, d), summed with a tied head's waiting one
        own = V * d * dt.trainable_weight
        in_bwd = setup.optimizer in IN_BACKWARD
        grads = (own + (head_w_grad if cfg.tie_embeddings else 0) if in_bwd
                 else max(prior_grads, grads_total) + (own if cfg.tie_embeddings else 0))
        phases["backward end (embedding)"] = {
            **base, "gradients": int(grads), "activations": embed_saved,
            "optimizer_temporaries": _in_backward_temp(setup, V * d, dt.trainable_weight) if in_bwd else 0}
    largest = _largest_trainable(cfg, setup)
    opt_temp = 0
    if setup.optimizer == "adamw" and not setup.offload_optimizer:
        if setup.optimizer_impl == "foreach":
            opt_temp = states["gradients"]  # sqrt(v) of every parameter at once
        elif setup.optimizer_impl == "for-loop":
            opt_temp = 2 * 4 * largest
    elif setup.optimizer in ("badam", "galore"):  # lmforge's own Adam step, one parameter at a time, in fp32
        biggest = (max(li.in_features * li.out_features for li in layer_linears(cfg)) if setup.optimizer == "badam"
                   else largest)  # GaLore: the embedding and head take the plain step; projected ones ~ as much
        opt_temp = PLAIN_ADAM_BYTES * biggest
    clip = 0
    badam = setup.method == "full" and setup.optimizer == "badam"
    if setup.grad_clip and dt.trainable_weight != 4 and (full_ft or badam):
        # clipping reads a half-precision gradient as fp32 and squares it: two fp32 copies of the largest one
        block_max = max(li.in_features * li.out_features for li in layer_linears(cfg))
        clip = 8 * (block_max if badam else largest)
    phases["optimizer step"] = {**base, "gradients": grads_total, "optimizer_temporaries": max(opt_temp, clip)}

    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak_phase = max(totals, key=totals.get)
    breakdown = {k: int(v) for k, v in phases[peak_phase].items() if v}
    notes = []
    if kind == "eager" and cfg.attn_logit_softcap is not None:
        notes.append("soft-capped attention (attn_logit_softcap) runs eagerly off packed data: each block keeps its "
                     "(B, H, T, T) scores; packed data takes flex_attention with a score_mod instead")
    if kind == "masked" and not ckpt and prefixed:
        notes.append("each block keeps a bf16 bias of the (T, n + T) mask its prefix keys take (prefix tuning never "
                     "runs causal or flex attention): activation checkpointing keeps one block's")
    elif kind == "masked" and not ckpt:
        notes.append("each block keeps a bf16 copy of the (B, T, T) training mask; packed data uses flex_attention "
                     "on CUDA and keeps none")
    return Estimate(peak=sum(breakdown.values()), phase=peak_phase, breakdown=breakdown,
                    phases={k: int(v) for k, v in totals.items()}, host=host, notes=notes)


def max_micro_batch(cfg: ModelConfig, setup: TrainSetup, budget: int, overheads: Overheads | None = None,
                    limit: int = 4096) -> int:
    """Largest micro-batch whose predicted peak (plus overheads) fits `budget` bytes; 0 if even 1 does not."""
    ov = overheads or Overheads()

    def fits(b: int) -> bool:
        s = TrainSetup(**{**setup.__dict__, "micro_batch": b})
        return ov.reserve(train_memory(cfg, s).peak) <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# -------------------------------------------------------------------------------------------- inference memory


def param_bytes(n_params: float, dtype: str = "bf16", quant: Quant = "none") -> float:
    """Bytes of `n_params` weights stored in `dtype` (or quantized): 6e9 in fp16 -> 12e9, 7e9 in fp32 -> 28e9."""
    return n_params * (QUANT_BYTES[quant] if quant != "none" else DTYPE_BYTES[dtype])


def weight_bytes(cfg: ModelConfig, dtype: str = "bf16", quant: Quant = "none") -> int:
    """Bytes of the weights: embeddings/norms in `dtype`, block linears quantized if `quant` is set."""
    b = DTYPE_BYTES[dtype]
    total = cfg.num_params()
    if quant == "none":
        return int(total * b)
    lin = cfg.n_layers * sum(li.in_features * li.out_features for li in layer_linears(cfg))
    return int(param_bytes(lin, dtype, quant) + (total - lin) * b)


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str = "bf16") -> int:
    """K and V of every layer for one token of one sequence (MLA: its latent and shared RoPE key)."""
    return cfg.n_layers * cfg.cache_values_per_token * DTYPE_BYTES[dtype]


def inference_memory(cfg: ModelConfig, batch: int, context: int, prompt_len: int | None = None,
                     dtype: str = "bf16", quant: Quant = "none", kv_dtype: str | None = None) -> Estimate:
    """Peak bytes of `generate()` for `batch` sequences of `context` tokens (prompt + new): weights, the static KV
    cache, and the prefill's transients (the prompt's logits and one block's activations)."""
    P = prompt_len or context
    a = DTYPE_BYTES[dtype]
    w = weight_bytes(cfg, dtype, quant)
    kv = kv_cache_bytes_per_token(cfg, kv_dtype or dtype) * batch * context
    logits = batch * P * cfg.vocab_size * a  # generate() runs the head over the whole prompt
    block = batch * P * a * (3 * cfg.d_model + 3 * cfg.d_ff) + batch * P * context  # + the boolean mask
    breakdown = {"weights": w, "kv_cache": kv, "prefill_temporaries": max(logits, block),
                 "workspace": Overheads().workspace}
    peak = sum(breakdown.values())
    return Estimate(peak=peak, phase="prefill", breakdown=breakdown, phases={"prefill": peak})


def max_concurrent_sequences(cfg: ModelConfig, budget: int, context: int, dtype: str = "bf16",
                             quant: Quant = "none", kv_dtype: str | None = None,
                             overheads: Overheads | None = None) -> int:
    """How many sequences of `context` tokens fit next to the weights (decode with prefill one at a time)."""
    ov = overheads or Overheads()
    free = budget - ov.cuda_context - ov.workspace - weight_bytes(cfg, dtype, quant)
    one = inference_memory(cfg, 1, context, dtype=dtype, quant=quant, kv_dtype=kv_dtype)
    free -= one.breakdown["prefill_temporaries"]
    per_seq = kv_cache_bytes_per_token(cfg, kv_dtype or dtype) * context * (1 + ov.fragmentation)
    return max(0, int(free // per_seq))


def max_context(cfg: ModelConfig, budget: int, batch: int = 1, dtype: str = "bf16", quant: Quant = "none",
                kv_dtype: str | None = None, overheads: Overheads | None = None) -> int:
    """Longest context (tokens) `batch` sequences can each hold, prefill transients included."""
    ov = overheads or Overheads()
    lo, hi = 0, 1
    while ov.reserve(inference_memory(cfg, batch, hi, dtype=dtype, quant=quant, kv_dtype=kv_dtype).peak) <= budget:
        lo, hi = hi, hi * 2
        if hi > 1 << 24:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = ov.reserve(inference_memory(cfg, batch, mid, dtype=dtype, quant=quant, kv_dtype=kv_dtype).peak) <= budget
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo
