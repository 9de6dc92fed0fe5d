"""`lmforge plan MODEL --gpu-mem 24GiB [--gpus N] [training config]`: what fits, what does not and why, how fast.

- `setup_from_train(TrainConfig)` reads the memory-relevant choices of a training config;
- `check_fits(...)` is the one-line refusal the trainer raises before starting a run predicted not to fit;
- `recommend(...)` searches method x precision x checkpointing x ZeRO stage for the fastest configuration that fits
  and says, for every other one, why it does not;
- throughput comes from FLOPs (6 N per trained token, 2 N per generated token, plus attention) and a device
  efficiency (share of peak bf16 FLOP/s reached; 0.2 is what lmforge's LoRA step reached on an H100).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..config import Section, load_config
from ..errors import ConfigError, LmforgeError, did_you_mean
from ..models.config import ModelConfig
from .memory import METHODS as MODELLED_METHODS, OPTIMIZERS as MODELLED_OPTIMIZERS
from .memory import ADAPTERS
from .memory import (GiB, Estimate, Overheads, TrainSetup, inference_memory, kv_cache_bytes_per_token, max_context,
                     max_concurrent_sequences, max_micro_batch, train_memory, weight_bytes, zero_table)

# name: (peak dense bf16 TFLOP/s, HBM GB/s, memory GiB)
GPUS: dict[str, tuple[float, float, float]] = {
    "h200": (989, 4800, 141), "h100": (989, 3350, 80), "h100-pcie": (756, 2000, 80), "a100-80g": (312, 2039, 80),
    "a100-40g": (312, 1555, 40), "l40s": (362, 864, 48), "l4": (121, 300, 24), "a10g": (70, 600, 24),
    "rtx4090": (165, 1008, 24), "rtx3090": (71, 936, 24), "v100": (125, 900, 32), "t4": (65, 320, 16),
}


class OutOfMemoryPrediction(LmforgeError):
    """The planner predicts that a run will not fit in device memory."""


def parse_bytes(text: str | int | float) -> int:
    """'24GiB', '80GB', '512MiB', '24' (GiB) -> bytes."""
    if isinstance(text, (int, float)):
        return int(text * GiB) if text < 4096 else int(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", str(text), re.I)
    if not m:
        raise ConfigError(f"memory size '{text}' must look like 24GiB, 80GB or 512MiB")
    unit = (m.group(2) or "GiB").upper().rstrip("B") or "B"
    scale = {"B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30,
             "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def load_model_config(model: str, overrides: dict | None = None) -> ModelConfig:
    """A ModelConfig from a checkpoint directory (config.json) or a preset name."""
    from ..models import PRESETS, config_from_hf, preset_config

    from ..hub import is_hub_id, resolve_model

    if Path(model).exists() or is_hub_id(model):
        cfg = config_from_hf(resolve_model(model))
        return cfg.model_copy(update=overrides) if overrides else cfg
    if model.lower() in PRESETS:
        return preset_config(model, **(overrides or {}))
    raise ConfigError(f"model '{model}' is neither a checkpoint directory nor a preset"
                      f"{did_you_mean(model.lower(), PRESETS)}; presets: {', '.join(PRESETS)}")


class NotModelled(ConfigError):
    """The planner has no memory model for something the run uses (one line: what, and what it does model)."""


_QUANT_OF_METHOD = {"int8": "int8", "int4": "int4", "rtn": "int4", "awq": "int4", "gptq": "int4", "nf4": "nf4"}


def checkpoint_quant(model: str | Path | None) -> str | None:
    """The weight format of a local quantized checkpoint directory, from its config.json's quantization_config:
    'int8', 'int4' or 'nf4' (what the planner models), another name (bitnet, ...) where it models none; None for
    full-precision checkpoints, presets and anything else."""
    config = Path(model) / "config.json" if model is not None else None
    if config is None or not config.is_file():
        return None
    q = json.loads(config.read_text()).get("quantization_config") or {}
    if not q:
        return None
    method = str(q.get("method") if q.get("quant_method") == "lmforge" else q.get("quant_method"))
    if method in ("qat", "gptq", "awq") and q.get("bits") in (4, 8):  # QAT and other tools' formats name their bits
        return f"int{q['bits']}"
    return _QUANT_OF_METHOD.get(method, method)


def _refuse_quantized_training(model: str | Path | None) -> None:
    quant = checkpoint_quant(model)
    if quant is not None:
        raise NotModelled(f"the planner does not model training on a quantized checkpoint ('{model}' holds {quant} "
                          f"weights); it models {', '.join(MODELLED_METHODS)} from full-precision weights: plan "
                          "the full-precision checkpoint (method=qlora for adapters over 4-bit weights)")


# methods that are another modelled method in memory: P-Tuning v2 is prefix tuning without the reparameterisation
PLANNED_AS = {"ptuning_v2": "prefix"}


def setup_from_train(train_cfg, seq_len: int | None = None, device: str = "cuda") -> TrainSetup:
    """The TrainSetup of a `lmforge.train.TrainConfig`, read from the trainer's own config sections (the chosen
    method's options, `optim.<name>`, `train`); precision auto = bf16 on a GPU. Raises NotModelled for what the
    memory model does not cover instead of guessing."""
    t, name = train_cfg.train, train_cfg.method
    _refuse_quantized_training(train_cfg.model.path)
    name = PLANNED_AS.get(name, name)
    if name not in MODELLED_METHODS:
        raise NotModelled(f"the planner does not model method '{name}' (it models {', '.join(MODELLED_METHODS)})")
    if train_cfg.optim.name not in MODELLED_OPTIMIZERS:
        raise NotModelled(f"the planner does not model optimizer '{train_cfg.optim.name}' (it models "
                          f"{', '.join(MODELLED_OPTIMIZERS)})")
    if train_cfg.trainable.params != "all":
        raise NotModelled(f"the planner does not model trainable.params={train_cfg.trainable.params} (only 'all')")
    par = train_cfg.parallel
    if par.tensor > 1 or par.pipeline > 1:
        raise NotModelled("the planner does not model tensor or pipeline parallelism (parallel.tensor / "
                          "parallel.pipeline)")
    o = train_cfg.method_options()  # lora / dora / qlora / prefix section
    method = {}
    if name == "prefix":
        method = dict(prefix_tokens=o.num_virtual_tokens, prefix_projection=o.prefix_projection,
                      prefix_hidden=o.encoder_hidden_size)
    elif o is not None:
        method = dict(lora_r=max([o.r, *o.rank_pattern.values()]), lora_dropout=o.dropout,
                      lora_targets=o.target_modules)
    g = train_cfg.optim.galore
    return TrainSetup(
        micro_batch=t.micro_batch_size, seq_len=seq_len or train_cfg.data.max_seq_len, method=name,
        precision="bf16" if t.precision == "auto" else t.precision, activation_checkpointing=t.activation_checkpointing,
        checkpoint_blocks=t.checkpoint_blocks, grad_accum=t.grad_accum, optimizer=train_cfg.optim.name,
        momentum=train_cfg.optim.momentum, packing=train_cfg.data.packing, galore_rank=g.rank,
        galore_min_dim=g.min_dim, grad_clip=t.grad_clip is not None, device=device, **method)


def describe_setup(s: TrainSetup) -> str:
    detail = (f" r={s.lora_r}" if s.method in ADAPTERS else f" n={s.prefix_tokens}" if s.method == "prefix" else "")
    parts = [s.method + detail, s.precision,
             f"micro-batch {s.micro_batch} x seq {s.seq_len}",
             "checkpointing on" if s.activation_checkpointing else "checkpointing off", s.optimizer]
    if s.gpus > 1:
        parts.append(f"ZeRO-{s.zero_stage} over {s.gpus} GPUs")
    if s.offload_optimizer:
        parts.append("optimizer offloaded")
    return ", ".join(parts)


def format_estimate(est: Estimate, budget: int | None = None, overheads: Overheads | None = None) -> str:
    """A readable breakdown of the peak, the phases and the verdict."""
    ov = overheads or Overheads()
    lines = [f"peak {gib(est.peak)} allocated, at {est.phase}:"]
    width = max(len(k) for k in est.breakdown)
    for k, v in sorted(est.breakdown.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {k.replace('_', ' '):{width}}  {gib(v):>11}  {100 * v / max(est.peak, 1):5.1f}%")
    lines.append("phases: " + ", ".join(f"{k} {gib(v)}" for k, v in est.phases.items()))
    if est.host:
        lines.append(f"host memory: {gib(est.host)} (offloaded optimizer states)")
    need = ov.reserve(est.peak)
    lines.append(f"with CUDA context ({gib(ov.cuda_context)}), {ov.fragmentation:.0%} allocator slack and a "
                 f"{ov.margin:.0%} safety margin: {gib(need)}")
    if budget is not None:
        lines.append(f"verdict: FITS in {gib(budget)} ({gib(budget - need)} left)" if need <= budget else
                     f"verdict: DOES NOT FIT in {gib(budget)} ({gib(need - budget)} short)")
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


ZERO_STAGES = ("0 (DDP)", "1 (optim)", "2 (+grads)", "3 (+weights)")


def format_zero_table(rows: list[dict], precision: str) -> str:
    """The ZeRO table: per-GPU weights / gradients / optimizer states for each stage, the paper's accounting beside
    lmforge's for this run's dtypes."""
    r0 = rows[0]
    cols = ("weights", "gradients", "optimizer_states", "total")
    cell = lambda v: f"{v / GiB:9.2f}"  # noqa: E731
    head = "".join(f"{c:>9}" for c in ("weights", "grads", "optim", "total"))
    lines = [f"ZeRO model states per GPU over {r0['gpus']} GPUs, GiB (Ψ = {r0['trainable_params'] / 1e9:.3f} B "
             f"trainable parameters):",
             f"  {'stage':12} | {'paper: 2Ψ + 2Ψ + 12Ψ (Adam)':36} | lmforge {precision}",
             f"  {'':12} | {head} | {head}"]
    for r in rows:
        host = f"  (+{r['lmforge']['host'] / GiB:.2f} on the host)" if r["lmforge"]["host"] else ""
        lines.append(f"  {ZERO_STAGES[r['stage']]:12} | {''.join(cell(r['paper'][c]) for c in cols)} | "
                     f"{''.join(cell(r['lmforge'][c]) for c in cols)}{host}")
    return "\n".join(lines)


def check_fits(model_cfg: ModelConfig, setup: TrainSetup, budget: int, overheads: Overheads | None = None) -> Estimate:
    """Raise OutOfMemoryPrediction (one line: prediction, biggest parts, the fix) when `setup` will not fit in
    `budget` bytes; return the estimate otherwise. What `lmforge train` calls before building the model."""
    ov = overheads or Overheads()
    est = train_memory(model_cfg, setup)
    need = ov.reserve(est.peak)
    if need <= budget:
        return est
    top = sorted(est.breakdown.items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{k.replace('_', ' ')} {gib(v)}" for k, v in top)
    fixes = []
    b = max_micro_batch(model_cfg, setup, budget, ov)
    if b:
        fixes.append(f"train.micro_batch_size={b} (with train.grad_accum={setup.grad_accum * -(-setup.micro_batch // b)}"
                     f" for the same step)")
    if not setup.activation_checkpointing:
        ck = replace(setup, activation_checkpointing=True)
        if ov.reserve(train_memory(model_cfg, ck).peak) <= budget:
            fixes.append("train.activation_checkpointing=true")
    if setup.method == "full":
        fixes.append("method=lora")
    elif setup.method in ("lora", "dora"):
        fixes.append("method=qlora")
    fix = "; try " + " or ".join(fixes[:2]) if fixes else "; no single change fits: see `lmforge plan`"
    raise OutOfMemoryPrediction(
        f"predicted peak {gib(need)} > {gib(budget)} device memory ({describe_setup(setup)}: {parts}){fix}; "
        "set train.force=true to run anyway")


def check_training_fits(train_cfg, model_cfg: ModelConfig, device, say=print) -> Estimate | None:
    """The trainer's pre-flight check: on a CUDA device, raise OutOfMemoryPrediction when the run described by
    `train_cfg` is predicted not to fit the device's memory (unless train.force); None on other devices, and (with a
    one-line note through `say`) for runs the planner does not model."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or train_cfg.train.force:
        return None
    try:
        setup = setup_from_train(train_cfg)
    except NotModelled as e:
        say(f"memory check skipped: {e}")
        return None
    _, total = torch.cuda.mem_get_info(device)
    return check_fits(model_cfg, setup, total)


# ------------------------------------------------------------------------------------------------- throughput


def train_flops_per_token(cfg: ModelConfig, setup: TrainSetup) -> float:
    """Forward 2N + backward 4N (2N for activation gradients only, when the weights are frozen) + recompute 2N,
    plus attention's 12 * layers * seq * d_model (causal half) per token."""
    n = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.d_model  # the head computes, embeddings don't
    attn = 6 * cfg.n_layers * setup.seq_len * cfg.n_heads * cfg.dim_per_head
    fwd = 2 * n + attn / 3
    bwd = 2 * fwd if setup.method == "full" else fwd  # frozen weights: activation gradients only
    recompute = fwd if setup.activation_checkpointing else 0
    return fwd + bwd + recompute + 2 * cfg.vocab_size * cfg.d_model  # + the chunked loss's head recompute


def train_tokens_per_s(cfg: ModelConfig, setup: TrainSetup, gpu: str = "h100", efficiency: float = 0.35) -> float:
    peak = GPUS[gpu][0] * 1e12
    # NF4 dequantization in every forward, recompute and backward: QLoRA on the Llama-3-8B shape ran 3,202 tokens/s
    # on an H100 (docs/peft.md, checkpointing, seq 2048), 1.26x below this estimate with a factor of 1.25
    slow = 1.6 if setup.method == "qlora" else 1.0
    return efficiency * peak * max(setup.gpus, 1) / train_flops_per_token(cfg, setup) / slow


def decode_tokens_per_s(cfg: ModelConfig, batch: int, context: int, gpu: str = "h100", dtype: str = "bf16",
                        quant: str = "none", efficiency: float = 0.6) -> float:
    """Decode is bound by reading the weights + KV cache each step (or by 2N FLOPs at large batches)."""
    _, bw, _ = GPUS[gpu]
    bytes_step = weight_bytes(cfg, dtype, quant) + kv_cache_bytes_per_token(cfg, dtype) * batch * context / 2
    mem_bound = efficiency * bw * 1e9 / bytes_step * batch
    compute_bound = efficiency * GPUS[gpu][0] * 1e12 / (2 * cfg.num_params())
    return min(mem_bound, compute_bound)


# ------------------------------------------------------------------------------------------------- recommend


@dataclass
class Candidate:
    setup: TrainSetup
    micro_batch: int  # largest that fits (0 = none)
    tokens_per_s: float
    peak_at_1: int  # predicted bytes (with overheads) at micro-batch 1

    @property
    def fits(self) -> bool:
        return self.micro_batch > 0


def recommend(cfg: ModelConfig, base: TrainSetup, budget: int, gpu: str = "h100", efficiency: float = 0.35,
              methods: list[str] | None = None, overheads: Overheads | None = None) -> list[Candidate]:
    """Every combination of method x precision x checkpointing (x ZeRO stage on several GPUs), fastest first among
    those that fit; each with its largest micro-batch (capped at the requested one) and estimated tokens/s."""
    ov = overheads or Overheads()
    out = []
    for method in methods or ["full", "lora", "qlora"]:
        for precision in (["bf16", "bf16-pure"] if method == "full" else ["bf16"]):
            for ckpt in (False, True):
                # ZeRO matters for full fine-tuning; adapters' states are small, plain data parallel suffices
                for stage in ([0, 1, 2, 3] if base.gpus > 1 and method == "full" else [0]):
                    s = replace(base, method=method, precision=precision, activation_checkpointing=ckpt,
                                zero_stage=stage, micro_batch=1)
                    b = min(max_micro_batch(cfg, s, budget, ov, limit=max(base.micro_batch, 1)), base.micro_batch)
                    s = replace(s, micro_batch=max(b, 1))
                    # communication: ZeRO-2 reduce-scatters gradients, ZeRO-3 also gathers weights twice per step
                    tps = train_tokens_per_s(cfg, s, gpu, efficiency) * (1.0, 0.99, 0.97, 0.9)[stage]
                    if b and b < base.micro_batch:
                        tps *= 0.85 + 0.15 * b / base.micro_batch  # smaller GEMMs, more steps
                    out.append(Candidate(s, b, tps, ov.reserve(train_memory(cfg, replace(s, micro_batch=1)).peak)))
    return sorted(out, key=lambda c: (not c.fits, -c.tokens_per_s if c.fits else c.peak_at_1))


def format_recommendation(cands: list[Candidate], budget: int) -> str:
    lines = [f"configurations for {gib(budget)} per GPU, fastest first:"]
    best = next((c for c in cands if c.fits), None)
    for c in cands:
        s = c.setup
        name = f"{s.method}/{s.precision}/ckpt {'on' if s.activation_checkpointing else 'off'}" + \
               (f"/ZeRO-{s.zero_stage}" if s.gpus > 1 else "")
        if c.fits:
            mark = "→" if c is best else " "
            lines.append(f" {mark} {name:34} micro-batch {c.micro_batch:<4} ~{c.tokens_per_s:,.0f} tokens/s")
        else:
            lines.append(f"   {name:34} does not fit: needs {gib(c.peak_at_1)} at micro-batch 1")
    if best is None:
        lines.append("nothing fits: use more GPUs (ZeRO-3), a shorter sequence, or a smaller model")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- CLI


class PlanConfig(Section):
    model: str = Field(description="checkpoint directory or preset name (see `lmforge info`)")
    gpu_mem: str | None = None
    """Memory per GPU, e.g. 24GiB or 80GB; default: the --gpu's memory."""
    gpus: int = Field(1, ge=1)
    """GPUs for ZeRO sharding (data parallel)."""
    gpu: str = "h100"
    """GPU kind for throughput: h100, h200, a100-80g, a100-40g, l40s, l4, a10g, rtx4090, rtx3090, v100, t4."""
    efficiency: float = Field(0.35, gt=0, le=1)
    """Share of the GPU's peak bf16 FLOP/s a training step reaches (measure yours: lmforge train logs tokens/s)."""
    train_config: str | None = None
    """A training YAML (lmforge train's config): plan exactly that run (other fields here override it)."""
    mode: Literal["train", "infer"] = "train"
    """train: memory and speed of a training run; infer: weights + KV cache, concurrency and decode speed."""
    method: Literal[MODELLED_METHODS] | None = None
    """full, lora, dora, qlora or prefix (the methods the planner models; a training config with another one is
    refused)."""
    precision: Literal["fp32", "bf16", "fp16", "bf16-pure"] | None = None
    """train.precision of the run (default: the training config's, else bf16)."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Sequences per micro-batch (default: the training config's, else 4)."""
    seq_len: int | None = Field(None, ge=2)
    """Tokens per sequence (default: the training config's data.max_seq_len, else 2048)."""
    activation_checkpointing: bool | None = None
    """Recompute block activations in backward (default: the training config's, else off)."""
    optimizer: Literal[MODELLED_OPTIMIZERS] | None = None
    """optim.name of the run (default: the training config's, else adamw)."""
    zero_stage: int = Field(0, ge=0, le=3)
    """ZeRO stage across the gpus (with gpus > 1): 1 shards optimizer states, 2 also gradients, 3 also weights."""
    offload_optimizer: bool = False
    """Keep optimizer states (and fp32 master weights) in CPU memory (parallel.cpu_offload)."""
    lora_r: int = Field(16, ge=1)
    """LoRA rank without a training config (with one, its method section's r)."""
    recommend: bool = True
    """Also list every method/precision/checkpointing combination and the fastest that fits."""
    # inference
    batch: int = Field(1, ge=1)
    """infer: concurrent sequences."""
    context: int | None = Field(None, ge=1)
    """infer: tokens per sequence (prompt + generated); default the model's max_seq_len."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """infer: dtype of the weights that are not quantized (and of the KV cache by default)."""
    quant: Literal["none", "int8", "int4", "nf4"] = "none"
    """infer: weight format of the served linears (lmforge quantize's methods)."""
    kv_dtype: Literal["bf16", "fp16", "fp32", "fp8"] | None = None
    """infer: KV cache dtype (default: dtype)."""


def _train_setup(cfg: PlanConfig) -> TrainSetup:
    if cfg.train_config:
        from ..train.config import TrainConfig

        setup = setup_from_train(load_config(TrainConfig, cfg.train_config), cfg.seq_len)
    else:
        setup = TrainSetup(micro_batch=4, seq_len=2048, method="full", lora_r=cfg.lora_r, lora_targets="all-linear")
    fields = {"method": cfg.method, "precision": cfg.precision, "micro_batch": cfg.micro_batch_size,
              "seq_len": cfg.seq_len, "activation_checkpointing": cfg.activation_checkpointing,
              "optimizer": cfg.optimizer}
    setup = replace(setup, **{k: v for k, v in fields.items() if v is not None})
    return replace(setup, gpus=cfg.gpus, zero_stage=cfg.zero_stage if cfg.gpus > 1 else 0,
                   offload_optimizer=cfg.offload_optimizer)


def run_plan(cfg: PlanConfig) -> dict:
    """Print the plan; return it as a dict (for --json / tests)."""
    if cfg.gpu not in GPUS:
        raise ConfigError(f"unknown gpu '{cfg.gpu}'{did_you_mean(cfg.gpu, GPUS)}; known: {', '.join(GPUS)}")
    from ..hub import is_hub_id, resolve_model

    model_cfg = load_model_config(cfg.model)
    local = Path(cfg.model) if Path(cfg.model).exists() else None
    if local is None and is_hub_id(cfg.model):
        local = resolve_model(cfg.model)  # in the cache already: load_model_config read its config.json
    budget = parse_bytes(cfg.gpu_mem) if cfg.gpu_mem else int(GPUS[cfg.gpu][2] * GiB)
    header = (f"{cfg.model}: {model_cfg.num_params() / 1e9:.3f} B parameters, {model_cfg.n_layers} layers, "
              f"d_model {model_cfg.d_model}, vocab {model_cfg.vocab_size:,}; budget {gib(budget)} x {cfg.gpus} GPU(s)")
    print(header)
    stored = checkpoint_quant(local)
    if cfg.mode == "infer":
        quant = cfg.quant
        if stored is not None and quant == "none":  # a quantized checkpoint is served in its own format
            if stored not in ("int8", "int4", "nf4"):
                raise NotModelled(f"the planner does not model {stored} weights ('{cfg.model}'); it models quant="
                                  "int8, int4 and nf4")
            quant = stored
        context = cfg.context or model_cfg.max_seq_len
        est = inference_memory(model_cfg, cfg.batch, context, dtype=cfg.dtype, quant=quant, kv_dtype=cfg.kv_dtype)
        note = "" if quant == "none" else f" ({quant}, the checkpoint's)" if quant == stored else f" ({quant})"
        print(f"inference: {cfg.batch} sequence(s) x {context:,} tokens, weights {cfg.dtype}{note}")
        print(format_estimate(est, budget))
        kv = kv_cache_bytes_per_token(model_cfg, cfg.kv_dtype or cfg.dtype)
        conc = max_concurrent_sequences(model_cfg, budget, context, cfg.dtype, quant, cfg.kv_dtype)
        longest = max_context(model_cfg, budget, cfg.batch, cfg.dtype, quant, cfg.kv_dtype)
        tps = decode_tokens_per_s(model_cfg, cfg.batch, context, cfg.gpu, cfg.dtype, quant)
        print(f"KV cache {kv / 1024:.1f} KiB per token; {conc} concurrent sequences of {context:,} tokens fit; "
              f"longest context at batch {cfg.batch}: {longest:,} tokens; decode ~{tps:,.0f} tokens/s on {cfg.gpu}")
        return {"estimate": est.__dict__, "kv_bytes_per_token": kv, "max_concurrent": conc, "max_context": longest,
                "decode_tokens_per_s": tps, "budget": budget}
    _refuse_quantized_training(local)
    setup = _train_setup(cfg)
    est = train_memory(model_cfg, setup)
    print(f"training: {describe_setup(setup)}")
    print(format_estimate(est, budget))
    b = max_micro_batch(model_cfg, setup, budget)
    tps = train_tokens_per_s(model_cfg, setup, cfg.gpu, cfg.efficiency)
    print(f"largest micro-batch that fits: {b}" + ("" if b else " (none: see below)")
          + f"; throughput ~{tps:,.0f} tokens/s ({cfg.efficiency:.0%} of {cfg.gpu} peak, x{cfg.gpus} GPUs)")
    out = {"estimate": est.__dict__, "max_micro_batch": b, "tokens_per_s": tps, "budget": budget,
           "fits": Overheads().reserve(est.peak) <= budget}
    n = cfg.gpus if cfg.gpus > 1 else 8  # one GPU shards nothing: show what 8 would hold (--gpus N to change)
    out["zero_table"] = zero_table(model_cfg, setup, n)
    print(format_zero_table(out["zero_table"], setup.precision)
          + ("" if cfg.gpus > 1 else "\n  (one GPU shards nothing; the table assumes 8: --gpus N to change)"))
    if cfg.recommend:
        chosen = [setup.method] if cfg.method or cfg.train_config else None  # keep a method the user picked...
        cands = recommend(model_cfg, setup, budget, cfg.gpu, cfg.efficiency, methods=chosen)
        if not any(c.fits for c in cands) and chosen:  # ...unless nothing with it fits
            cands = recommend(model_cfg, setup, budget, cfg.gpu, cfg.efficiency)
        print(format_recommendation(cands, budget))
        out["recommendation"] = [{"setup": describe_setup(c.setup), "micro_batch": c.micro_batch,
                                  "tokens_per_s": c.tokens_per_s, "peak_at_1": c.peak_at_1} for c in cands]
    return out


def split_plan_args(args: list[str]) -> tuple[str | None, list[str]]:
    """`MODEL [TRAIN_YAML] [--gpu-mem 24GiB --gpus N key=value ...]` -> (config path, overrides) for `load_config`:
    the first bare argument is the model, a second one the training config to plan."""
    from ..args import split_args

    bare = [a for i, a in enumerate(args) if not a.startswith("-") and "=" not in a
            and not (i and args[i - 1].startswith("--") and "=" not in args[i - 1])]
    rest = [a for a in args if a not in bare[:2]]
    config, overrides = split_args(rest)
    extra = [f"model={bare[0]}"] if bare else []
    if len(bare) > 1:
        extra.append(f"train_config={bare[1]}")
    return config, extra + overrides
