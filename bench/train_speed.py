"""Training speed and memory: lmforge vs transformers+peft and transformers+peft+Liger, same shapes, same run.

Every (configuration, variant) runs in its own subprocess, so one variant's allocator state or compiled graphs never
touch the next one's peak memory. Weights are the same in every variant: each worker builds the `transformers`
model from seed 0 on the GPU, and lmforge workers convert that model's tensors into the native model.

Configurations (the issue's): LoRA r=16 all-linear on Llama-3.2-1B, 4 x 2048; full fine-tuning of the same model
(fp32 master weights, bf16 autocast); LoRA on the Llama-3-8B shape, 2 x 2048. Activation checkpointing on for the
references (gradient checkpointing); lmforge variants say their policy. AdamW (fused), lr 1e-4 (LoRA) / 1e-5 (full);
LoRA clips the gradient norm at 1.0 everywhere; full fine-tuning runs without clipping everywhere (lmforge's
`adamw_backward` updates each weight inside backward, where no global norm exists yet).

Prints one JSON line per run: tokens/s, step time, peak `max_memory_allocated`, MFU (model FLOPs: forward + backward,
no recompute) and HFU (recompute counted), last loss. `--loss-steps N` adds the loss-curve check: N steps on real
text (UTF-8 bytes of tinyshakespeare as token ids) for lmforge and the references, max |loss difference| reported.

    python bench/train_speed.py --out docs/train_speed_h100.jsonl
    python bench/train_speed.py --configs lora-1b --variants hf,lmforge --steps 2 --warmup 1 --n-layers 2   # smoke
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"

CONFIGS = {
    "lora-1b": dict(preset="llama-3.2-1b", batch=4, seq=2048, method="lora", lr=1e-4, clip=1.0),
    "full-1b": dict(preset="llama-3.2-1b", batch=4, seq=2048, method="full", lr=1e-5, clip=None),
    "lora-8b": dict(preset="llama-3-8b", batch=2, seq=2048, method="lora", lr=1e-4, clip=1.0),
    # today's families: the same LoRA recipe on their published shapes
    "lora-qwen3-8b": dict(preset="qwen3-8b", batch=2, seq=2048, method="lora", lr=1e-4, clip=1.0),
    "lora-gemma3-4b": dict(preset="gemma-3-4b", batch=2, seq=2048, method="lora", lr=1e-4, clip=1.0),
}
# lmforge variants: name -> trainer settings (compile each block, blocks recomputed, optimizer)
LMFORGE = {
    "lmforge-eager": dict(compile=False),
    "lmforge": dict(compile=True),
    "lmforge-flash": dict(compile=True, sdpa="flash"),
    "lmforge-ckpt15": dict(compile=True, checkpoint_blocks=15),
    "lmforge-ckpt14": dict(compile=True, checkpoint_blocks=14),
    "lmforge-ckpt12": dict(compile=True, checkpoint_blocks=12),
    "lmforge-ckpt8": dict(compile=True, checkpoint_blocks=8),
    "lmforge-ckpt4": dict(compile=True, checkpoint_blocks=4),
    "lmforge-nockpt": dict(compile=True, checkpointing=False),
    "lmforge-flash-nockpt": dict(compile=True, checkpointing=False, sdpa="flash"),
    "lmforge-optbwd": dict(compile=True, optimizer="adamw_backward"),
    "lmforge-optbwd-ckpt8": dict(compile=True, optimizer="adamw_backward", checkpoint_blocks=8),
    "lmforge-optbwd-ckpt14": dict(compile=True, optimizer="adamw_backward", checkpoint_blocks=14),
    "lmforge-optbwd-ckpt12": dict(compile=True, optimizer="adamw_backward", checkpoint_blocks=12),
    "lmforge-optbwd-ckpt10": dict(compile=True, optimizer="adamw_backward", checkpoint_blocks=10),
    "lmforge-optbwd-nockpt": dict(compile=True, optimizer="adamw_backward", checkpointing=False),
    # the whole step as one CUDA graph (train.cuda_graphs)
    "lmforge-graph": dict(compile=True, cuda_graphs=True),
    "lmforge-graph-ckpt15": dict(compile=True, cuda_graphs=True, checkpoint_blocks=15),
    "lmforge-graph-nockpt": dict(compile=True, cuda_graphs=True, checkpointing=False),
    "lmforge-optbwd-graph": dict(compile=True, optimizer="adamw_backward", cuda_graphs=True),
    "lmforge-optbwd-ckpt14-graph": dict(compile=True, optimizer="adamw_backward", checkpoint_blocks=14,
                                        cuda_graphs=True),
    "lmforge-optbwd-ckpt12-graph": dict(compile=True, optimizer="adamw_backward", checkpoint_blocks=12,
                                        cuda_graphs=True),
    "lmforge-optbwd-ckpt13-graph": dict(compile=True, optimizer="adamw_backward", checkpoint_blocks=13,
                                        cuda_graphs=True),
}
DEFAULT_VARIANTS = {
    "lora-1b": "hf,hf-liger,lmforge,lmforge-graph",
    "full-1b": "hf,hf-liger,lmforge-optbwd-ckpt14,lmforge-optbwd-ckpt14-graph,lmforge-optbwd-ckpt13-graph",
    "lora-8b": "hf,hf-liger,lmforge,lmforge-graph,lmforge-nockpt",
    "lora-qwen3-8b": "hf,hf-liger,lmforge,lmforge-graph",
    "lora-gemma3-4b": "hf,hf-liger,lmforge,lmforge-graph",
}
# Liger's patch for each architecture: its apply function; only the keyword arguments it takes are passed
LIGER = {"LlamaForCausalLM": "apply_liger_kernel_to_llama", "Qwen3ForCausalLM": "apply_liger_kernel_to_qwen3",
         "Gemma3ForCausalLM": "apply_liger_kernel_to_gemma3_text"}
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16


def model_config(conf: dict, n_layers: int | None):
    from lmforge.models import preset_config

    return preset_config(conf["preset"], **({"n_layers": n_layers} if n_layers else {}))


def flops_per_token(cfg, method: str, seq: int, recompute_fraction: float) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs incl. recompute) per trained token. Linear layers: 2 FLOPs per weight forward;
    backward is 2x forward for trained weights (input + weight gradients), 1x for frozen ones (input gradient only);
    causal attention 2*S*H*hd per token forward (QK^T and AV, half the keys on average), 2x that in backward."""
    hd = cfg.dim_per_head
    per_layer = (cfg.d_model * (cfg.n_heads + 2 * cfg.kv_heads) * hd + cfg.n_heads * hd * cfg.d_model
                 + (3 if cfg.mlp != "gelu" else 2) * cfg.d_model * cfg.d_ff)
    linear_fwd = 2 * (cfg.n_layers * per_layer + cfg.vocab_size * cfg.d_model)
    block_fwd = 2 * cfg.n_layers * per_layer
    attn_fwd = cfg.n_layers * 2 * seq * cfg.n_heads * hd
    linear_bwd = (2 if method == "full" else 1) * linear_fwd
    model = linear_fwd + linear_bwd + 3 * attn_fwd
    return model, model + recompute_fraction * (block_fwd + attn_fwd)


def batches(conf: dict, vocab: int, n: int, text: Path | None) -> list[torch.Tensor]:
    """n batches (B, T): random token ids, or consecutive windows of a real text's UTF-8 bytes."""
    B, T = conf["batch"], conf["seq"]
    if text is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab, (B, T), generator=g) for _ in range(n)]
    data = torch.frombuffer(bytearray(text.read_bytes()), dtype=torch.uint8).long()
    need = n * B * T
    data = data.repeat(need // len(data) + 1)[:need]
    return list(data.view(n, B, T))


def build_hf(cfg, conf: dict, liger: bool, device):
    import transformers

    from lmforge.models.hf import hf_config_dict

    if liger:
        import inspect

        import liger_kernel.transformers as lk

        apply = getattr(lk, LIGER[cfg.arch])
        wanted = dict(rope=True, rms_norm=True, swiglu=True, geglu=True, cross_entropy=False,
                      fused_linear_cross_entropy=True)
        accepted = inspect.signature(apply).parameters
        apply(**{k: v for k, v in wanted.items() if k in accepted})
    dtype = torch.float32 if conf["method"] == "full" else torch.bfloat16
    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(**hf_config_dict(cfg, dtype))
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def hf_worker(cfg, conf, args, liger: bool, data: list[torch.Tensor], device):
    import peft
    from _common import hf_lm_step

    model = build_hf(cfg, conf, liger, device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if conf["method"] == "lora":
        model.enable_input_require_grads()
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                           task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=conf["lr"], fused=True)
    model.train()
    losses = []
    on_device = (b.to(device, non_blocking=True) for b in itertools.cycle(data))  # the profiler's steps wrap around
    return hf_lm_step(model, on_device, params, opt, conf["clip"], losses), losses, 1.0  # every block recomputed


def lmforge_worker(cfg, conf, args, settings: dict, data: list[torch.Tensor], device):
    from lmforge.data import DataConfig
    from lmforge.models import Transformer
    from lmforge.models.converters import converter_for
    from lmforge.peft.methods import build_method
    from lmforge.train import Trainer, TrainConfig
    from lmforge.train.config import ModelSection, OptimSection, TrainSection

    if settings.get("sdpa"):  # pin SDPA's backend for the whole run (default: PyTorch's own priority order)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION}[settings["sdpa"]]
        sdpa_kernel(backend).__enter__()
    hf = build_hf(cfg, conf, False, device)  # the same seed-0 weights the references start from
    dtype = torch.float32 if conf["method"] == "full" else torch.bfloat16
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype).to_empty(device=device)
    params, conv = dict(model.named_parameters()), converter_for(cfg.arch)
    with torch.no_grad():
        for hf_name, tensor in hf.state_dict().items():
            for name, t in conv.to_native(hf_name, tensor, cfg):
                if name in params:
                    params[name].copy_(t)
    model.reset_buffers()
    del hf, params
    torch.cuda.empty_cache()
    method = build_method(conf["method"], **({"r": 16, "alpha": 32, "target_modules": "all-linear"}
                                             if conf["method"] == "lora" else {}))
    method.apply(model)
    checkpointing = settings.get("checkpointing", True)
    tcfg = TrainConfig(
        model=ModelSection(tokenizer="unused"), data=DataConfig(path="unused"),
        optim=OptimSection(name=settings.get("optimizer", "adamw"), lr=conf["lr"]),
        train=TrainSection(precision="bf16", micro_batch_size=conf["batch"], max_steps=10**6,
                           grad_clip=conf["clip"], activation_checkpointing=checkpointing,
                           checkpoint_blocks=settings.get("checkpoint_blocks"), compile=settings.get("compile", False),
                           cuda_graphs=settings.get("cuda_graphs", False), progress=False, tensorboard=False, output_dir=str(args.tmp)))
    rows = [{"tokens": b[i].tolist(), "labels": b[i, 1:].tolist() + [-100], "positions": list(range(b.shape[1]))}
            for b in data for i in range(b.shape[0])]
    trainer = Trainer(model, method, rows, None, tcfg, pad_id=0, device=device)
    order = itertools.cycle(range(len(rows)))  # in order (the profiler's extra steps wrap around)
    trainer.sampler.take = lambda n: [next(order) for _ in range(n)]
    losses = []
    blocks = cfg.n_layers
    recomputed = 0 if not checkpointing else min(blocks, settings.get("checkpoint_blocks") or blocks)
    return (lambda: losses.append(trainer.train_step()["loss"])), losses, recomputed / blocks


def worker(args) -> dict:
    from _common import mem_reset, peak_gib, sync

    conf = {**CONFIGS[args.config], **{k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v}}
    cfg = model_config(conf, args.n_layers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = args.loss_steps if args.text else args.warmup + args.steps
    data = batches(conf, cfg.vocab_size, n, Path(args.text) if args.text else None)
    mem_reset()
    graphed = LMFORGE.get(args.variant, {}).get("cuda_graphs", False)
    if args.variant in ("hf", "hf-liger"):
        step, losses, recompute = hf_worker(cfg, conf, args, args.variant == "hf-liger", data, device)
    else:
        step, losses, recompute = lmforge_worker(cfg, conf, args, LMFORGE[args.variant], data, device)
    out = {"config": args.config, "variant": args.variant}
    if args.text:  # loss curve on real text
        for _ in range(n):
            step()
        return {**out, "mode": "loss_curve", "losses": [round(x, 5) for x in losses]}
    t_start = time.perf_counter()
    for i in range(args.warmup):
        step()
        # Peak from the steady state on: optimizer states exist, compile caches are warm. A graph replay allocates
        # nothing (its working set sits in the graph's pool), so graphed variants count from the capture (step 2),
        # whose allocations are exactly that working set.
        if device.type == "cuda" and i + 1 == (1 if graphed else args.warmup):
            sync()
            torch.cuda.reset_peak_memory_stats()
    sync()
    warmup_s = time.perf_counter() - t_start
    times = []
    for _ in range(args.steps):  # each step ends in a host sync anyway (the loss value), so timing each costs nothing
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    seconds = sum(times) / len(times)
    tokens = conf["batch"] * conf["seq"]
    model_f, hw_f = flops_per_token(cfg, conf["method"], conf["seq"], recompute)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    tok_s = tokens / seconds
    reserved = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else 0.0
    out.update(tokens_per_s=round(tok_s), step_s=round(seconds, 4), peak_mem_gib=round(peak_gib(), 2),
               peak_reserved_gib=round(reserved, 2),
               tokens_per_s_median=round(tokens / statistics.median(times)),
               step_s_min_max=[round(min(times), 4), round(max(times), 4)],
               mfu=round(model_f * tok_s / (peak * 1e12), 4) if peak else None,
               hfu=round(hw_f * tok_s / (peak * 1e12), 4) if peak else None,
               recomputed_fraction=recompute, warmup_s=round(warmup_s, 1), last_loss=round(losses[-1], 4),
               batch=conf["batch"], seq=conf["seq"], preset=conf["preset"], n_layers=cfg.n_layers, device=name,
               torch=torch.__version__, **versions())
    if args.profile and device.type == "cuda":
        out["profile_top"] = profile(step)
    return out


def versions() -> dict:
    out = {}
    for mod in ("transformers", "peft", "liger_kernel"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001 (not installed)
            out[mod] = None
    return out


def profile(step, n: int = 2) -> list[dict]:
    """Top kernels by CUDA time over n steps: where the time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    rows = sorted(p.key_averages(), key=lambda e: -getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)))
    total = sum(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) for e in rows) or 1
    top = [{"kernel": e.key[:90], "ms_per_step": round(getattr(e, "device_time_total", 0) / 1e3 / n, 2),
            "share": round(getattr(e, "device_time_total", 0) / total, 4), "calls": e.count // n} for e in rows[:25]]
    return [{"kernel": "(all kernels)", "ms_per_step": round(total / 1e3 / n, 2), "share": 1.0,
             "calls": sum(e.count for e in rows) // n}] + top


def run_worker(args, config: str, variant: str, text: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--config", config, "--variant", variant,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--loss-steps", str(args.loss_steps),
           "--tmp", str(args.tmp)]
    for flag in ("n_layers", "batch", "seq"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))] if getattr(args, flag) else []
    cmd += ["--text", text] if text else []
    cmd += ["--profile"] if args.profile and variant.startswith("lmforge") else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench"),
                                                        os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"config": config, "variant": variant, "error": f"timed out after {args.timeout}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"config": config, "variant": variant, "error": " | ".join(tail)[-600:]}
    return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
    out = ["| config | variant | tokens/s | peak GiB | MFU | HFU | vs hf-liger speed | vs hf-liger memory |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "tokens_per_s" not in r:
            continue
        ref = next((x for x in rows if x.get("config") == r["config"] and x.get("variant") == "hf-liger"
                    and "tokens_per_s" in x), None)
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        mem = f"{r['peak_mem_gib'] / ref['peak_mem_gib']:.2f}x" if ref else "-"
        pct = (lambda v: f"{100 * v:.1f}%" if v is not None else "-")
        out.append(f"| {r['config']} | {r['variant']} | {r['tokens_per_s']:,} | {r['peak_mem_gib']} | "
                   f"{pct(r['mfu'])} | {pct(r['hfu'])} | {speed} | {mem} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="lora-1b,full-1b,lora-8b")
    ap.add_argument("--variants", default=None, help="comma list for every config (default: per-config set)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--loss-steps", type=int, default=0, help="also compare loss curves over N steps of real text")
    ap.add_argument("--loss-variants", default="hf,hf-liger,lmforge")
    ap.add_argument("--text", default=None, help="real text for the loss curves (default: shared tinyshakespeare)")
    ap.add_argument("--n-layers", type=int, default=None, help="cut the model (smoke runs)")
    ap.add_argument("--batch", type=int, default=None, help="override the configs' batch (smoke runs)")
    ap.add_argument("--seq", type=int, default=None, help="override the configs' sequence length (smoke runs)")
    ap.add_argument("--profile", action="store_true", help="add the top CUDA kernels of lmforge variants")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--tmp", default="/tmp/lmforge_train_speed")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--md", default=None, help="write the markdown table here")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--config")
    ap.add_argument("--variant")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return

    rows = []

    def emit(r):
        rows.append(r)
        print(json.dumps(r), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")

    for config in args.configs.split(","):
        for variant in (args.variants or DEFAULT_VARIANTS[config]).split(","):
            emit(run_worker(args, config, variant))
    if args.loss_steps:
        text = args.text or str(DEFAULT_TEXT)
        config = args.configs.split(",")[0]
        curves = {}
        for variant in args.loss_variants.split(","):
            r = run_worker(args, config, variant, text)
            emit(r)
            if "losses" in r:
                curves[variant] = r["losses"]
        for a in curves:
            for b in curves:
                if a < b:
                    diff = max(abs(x - y) for x, y in zip(curves[a], curves[b]))
                    emit({"config": config, "mode": "loss_curve_diff", "a": a, "b": b, "steps": args.loss_steps,
                          "max_abs_diff": round(diff, 5), "first": [curves[a][0], curves[b][0]],
                          "last": [curves[a][-1], curves[b][-1]]})
    md = table(rows)
    print("\n" + md)
    if args.md:
        Path(args.md).write_text(md + "\n")


if __name__ == "__main__":
    main()
