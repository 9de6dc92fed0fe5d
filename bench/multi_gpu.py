"""Multi-GPU scaling on one node (issue 12): DDP / ZeRO-2 / FSDP2 (ZeRO-3) full fine-tuning of a Llama-3.2-1B-shaped
model and FSDP2 LoRA of a Llama-3-8B-shaped model against the single-GPU run of the same config (per-GPU peak memory,
tokens/s per GPU, scaling efficiency); TP=2 and PP=2 (1F1B) full fine-tuning of the 8B shape (bf16-pure: weights,
gradients and AdamW state in bf16, so the single-GPU reference fits on one H200) checked loss-for-loss against one
GPU. The planner's prediction (`lmforge.plan.train_memory`) sits beside every measured peak.

One driver, plain python: it launches `torchrun --standalone --nproc_per_node N` once per config, in sequence (each
config in its own processes: a failure or an OOM is recorded and the next config runs), prints one JSON line per
config, then a table. Every run starts from the same random weights (seeded on the device) and reads the same random
token rows, so single- and multi-GPU losses are comparable step for step.

    python bench/multi_gpu.py                                  # every config on all visible GPUs (x2 or x4 H200)
    python bench/multi_gpu.py --only 1b-ddp,8b-pp2 --out docs/multi_gpu_h200.jsonl
    python bench/multi_gpu.py --device cpu --tiny --steps 2    # CPU smoke test (gloo, 2 processes, tiny shapes)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# name -> what runs. nproc: 1 (the reference), "all" (every GPU: data parallel), or an exact count.
# ref: the single-GPU config it is compared with. global_batch: the same rows per step as the reference (TP/PP split
# the work of one batch) instead of the same rows per GPU (data parallel: weak scaling).
CONFIGS: dict[str, dict] = {
    "1b-single": dict(shape="1b", method="full", precision="bf16", parallel={}, nproc=1),
    "1b-ddp": dict(shape="1b", method="full", precision="bf16", parallel={}, nproc="all", ref="1b-single"),
    "1b-zero2": dict(shape="1b", method="full", precision="bf16", parallel={"zero": 2}, nproc="all", ref="1b-single"),
    "1b-zero3": dict(shape="1b", method="full", precision="bf16", parallel={"zero": 3}, nproc="all", ref="1b-single"),
    "8b-lora-single": dict(shape="8b", method="lora", precision="bf16", parallel={}, nproc=1),
    "8b-lora-fsdp": dict(shape="8b", method="lora", precision="bf16", parallel={"zero": 3}, nproc="all",
                         ref="8b-lora-single"),
    "8b-single": dict(shape="8b", method="full", precision="bf16-pure", parallel={}, nproc=1),
    "8b-tp2": dict(shape="8b", method="full", precision="bf16-pure", parallel={"tensor": 2}, nproc=2, ref="8b-single",
                   global_batch=True),
    "8b-pp2": dict(shape="8b", method="full", precision="bf16-pure",
                   parallel={"pipeline": 2, "pipeline_schedule": "1f1b"}, nproc=2, ref="8b-single", global_batch=True),
}
PRESETS = {"1b": "llama-3.2-1b", "8b": "llama-3-8b"}
TINY = dict(d_model=64, n_heads=4, n_kv_heads=2, head_dim=None, d_ff=128, vocab_size=512, max_seq_len=256)
LOSS_RTOL = 1e-2  # bf16: ~3 significant digits per op; TP/PP change reduction orders and matmul shapes


def model_config(shape: str, args):
    from lmforge.models import preset_config

    overrides = dict(TINY, n_layers=2 if shape == "1b" else 4) if args.tiny else {}
    if args.n_layers:
        overrides["n_layers"] = args.n_layers
    return preset_config(PRESETS[shape], **overrides)


def batch_shape(c: dict, args) -> tuple[int, int, int]:
    """(micro_batch per data-parallel rank, grad_accum, seq_len). 8B runs accumulate `accum_8b` micro-batches: the
    pipeline's 1F1B micro-batches, and the same rows for the single-GPU and TP references."""
    if c["shape"] == "1b":
        return args.batch, 1, args.seq
    return args.batch_8b, args.accum_8b, args.seq_8b


def planned_gib(c: dict, model_cfg, world: int, precision: str, args) -> tuple[float | None, float | None]:
    """The planner's (peak, model states) for one GPU of this run; TP has no planner model (None); PP is planned as
    one stage's layers (embedding and head counted on every stage: an upper bound)."""
    from lmforge.plan import TrainSetup, train_memory
    from lmforge.plan.memory import model_state_bytes

    p = c["parallel"]
    if p.get("tensor", 1) > 1:
        return None, None
    mb, accum, seq = batch_shape(c, args)
    cfg = model_cfg
    if p.get("pipeline", 1) > 1:
        cfg = model_cfg.model_copy(update={"n_layers": -(-model_cfg.n_layers // p["pipeline"])})
    dp = world // (p.get("tensor", 1) * p.get("pipeline", 1))
    setup = TrainSetup(micro_batch=mb, seq_len=seq, method=c["method"], precision=precision,
                       activation_checkpointing=True, lora_r=args.lora_r, lora_targets="all-linear",
                       gpus=dp, zero_stage=p.get("zero", 0) if dp > 1 else 0, device="cuda")
    states, _host = model_state_bytes(cfg, setup)
    return round(train_memory(cfg, setup).peak / 2**30, 2), round(sum(states.values()) / 2**30, 3)


# ----------------------------------------------------------------------------------------------- one config (worker)


def worker(args) -> None:
    """One config under torchrun: build, train warmup + steps, rank 0 writes one JSON record to args.result."""
    from lmforge.data import DataConfig
    from lmforge.models import Transformer
    from lmforge.peft.methods import build_method
    from lmforge.train import TrainConfig, Trainer
    from lmforge.train.config import ModelSection, OptimSection, ScheduleSection, TrainSection
    from lmforge.train.distributed import ParallelSection, init_distributed, local_device, per_rank

    c = CONFIGS[args.worker]
    device = local_device(torch.device(args.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    parallel = ParallelSection(**c["parallel"])
    ds = init_distributed(parallel, device)
    model_cfg = model_config(c["shape"], args)
    mb, accum, seq = batch_shape(c, args)
    precision = c["precision"] if device.type == "cuda" else "fp32"  # the CPU smoke test runs everything in fp32

    torch.manual_seed(0)  # the same weights on every rank and in every run (CUDA's generator ignores the device index)
    with torch.device(device):
        model = Transformer(model_cfg)
    if precision == "bf16-pure":
        model.to(torch.bfloat16)
    method = build_method(c["method"], **({"r": args.lora_r, "alpha": 2 * args.lora_r,
                                           "target_modules": "all-linear"} if c["method"] == "lora" else {}))
    method.apply(model)
    if c["method"] != "full" and precision == "bf16":  # frozen base in bf16, as run_training keeps it
        trainable = {id(p) for _, p in method.trainable_parameters(model)}
        for p in model.parameters():
            if id(p) not in trainable:
                p.data = p.data.to(torch.bfloat16)

    steps = args.warmup + args.steps
    rows_per_step = mb * accum * ds.dp
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(rows_per_step * steps):
        t = torch.randint(0, model_cfg.vocab_size, (seq + 1,), generator=g).tolist()
        rows.append({"tokens": t[:-1], "labels": t[1:], "positions": list(range(seq))})
    tcfg = TrainConfig(
        model=ModelSection(tokenizer="unused"), data=DataConfig(path="unused", max_seq_len=seq), parallel=parallel,
        optim=OptimSection(lr=1e-4 if c["method"] == "lora" else 1e-5), schedule=ScheduleSection(kind="constant"),
        train=TrainSection(precision=precision, micro_batch_size=mb,
                           grad_accum=accum, max_steps=steps, activation_checkpointing=True, progress=False,
                           tensorboard=False, seed=0))
    trainer = Trainer(model, method, rows, None, tcfg, pad_id=0, device=device, dist_state=ds)

    losses, seconds = [], 0.0
    for i in range(steps):
        if i == args.warmup:  # measure after the warm-up steps (allocations, optimizer state, NCCL communicators)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        losses.append(trainer.train_step()["loss"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    ranks = per_rank([peak, *(trainer.state_bytes.get(k, 0) / 2**30 for k in ("params", "grads", "optimizer"))],
                     ds, device)
    if ds.is_main:
        world = ds.world
        tokens = rows_per_step * seq
        rec = {"config": args.worker, "shape": PRESETS[c["shape"]] + (" (tiny)" if args.tiny else ""),
               "params": model_cfg.num_params(), "method": c["method"], "precision": tcfg.train.precision,
               "parallel": c["parallel"], "world": world, "micro_batch": mb, "grad_accum": accum, "seq": seq,
               "step_s": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
               "tokens_per_s_per_gpu": round(tokens / seconds / world, 1),
               "peak_gib_per_rank": [round(r[0], 2) for r in ranks],
               "model_state_gib_per_rank": [round(sum(r[1:]), 3) for r in ranks],
               **dict(zip(("planned_peak_gib", "planned_state_gib"),
                          planned_gib(c, model_cfg, world, precision, args), strict=True)),
               "losses": losses,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
        Path(args.result).write_text(json.dumps(rec))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------------- driver


def launch(name: str, nproc: int, args) -> dict:
    """Run one config in its own torchrun; its record, or the error it died with."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                       if k not in ("only", "out", "worker", "result", "tiny", "timeout", "nproc") and v is not None]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, "--worker", name, "--result", str(result), *passthrough, *(["--tiny"] if args.tiny else [])]
        env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"config": name, "world": nproc, "error": f"timed out after {args.timeout} s"}
        if proc.returncode or not result.exists():
            lines = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln]
            return {"config": name, "world": nproc, "error": (lines[-1] if lines else proc.stderr[-500:]).strip()}
        rec = json.loads(result.read_text())
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        return rec


def compare(rec: dict, ref: dict | None) -> dict:
    """Beside the reference: per-GPU throughput ratio (scaling efficiency) for data parallel, speed-up and the loss
    curve for TP/PP (same rows as the reference)."""
    if ref is None or "error" in ref or "error" in rec:
        return rec
    c = CONFIGS[rec["config"]]
    rec["ref"] = ref["config"]
    rec["scaling_efficiency"] = round(rec["tokens_per_s_per_gpu"] / ref["tokens_per_s_per_gpu"], 3)
    rec["speedup"] = round(rec["tokens_per_s"] / ref["tokens_per_s"], 3)
    rec["peak_vs_ref"] = round(max(rec["peak_gib_per_rank"]) / max(ref["peak_gib_per_rank"][0], 1e-9), 3)
    if c.get("global_batch"):
        diffs = [abs(a - b) for a, b in zip(rec["losses"], ref["losses"])]
        rec["loss_max_abs_diff"] = max(diffs)
        rec["loss_matches_ref"] = all(d <= LOSS_RTOL * abs(b) for d, b in zip(diffs, ref["losses"]))
    return rec


def table(records: list[dict]) -> str:
    head = (f"{'config':15} {'GPUs':>4} {'peak GiB/GPU':>12} {'planned':>8} {'states GiB':>10} {'planned':>8} "
            f"{'tok/s/GPU':>10} {'scaling':>8} {'loss vs 1 GPU':>14}")
    lines = [head, "-" * len(head)]
    for r in records:
        if "error" in r:
            lines.append(f"{r['config']:15} {r.get('world', ''):>4} ERROR: {r['error'][:90]}")
            continue
        planned = "-" if r["planned_peak_gib"] is None else f"{r['planned_peak_gib']:.2f}"
        planned_state = "-" if r["planned_state_gib"] is None else f"{r['planned_state_gib']:.3f}"
        loss = ("ok" if r["loss_matches_ref"] else "DIFFERS") + f" {r['loss_max_abs_diff']:.1e}" \
            if "loss_matches_ref" in r else ""
        lines.append(f"{r['config']:15} {r['world']:>4} {max(r['peak_gib_per_rank']):>12.2f} {planned:>8} "
                     f"{max(r['model_state_gib_per_rank']):>10.3f} {planned_state:>8} "
                     f"{r['tokens_per_s_per_gpu']:>10.0f} "
                     f"{r.get('scaling_efficiency', 1.0):>8.2f} {loss:>14}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="comma-separated configs: " + ", ".join(CONFIGS))
    ap.add_argument("--nproc", type=int, default=None, help="GPUs for data-parallel configs (default: all visible)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq", type=int, default=2048, help="1B: sequence length")
    ap.add_argument("--batch", type=int, default=4, help="1B: micro-batch per GPU")
    ap.add_argument("--seq-8b", type=int, default=1024)
    ap.add_argument("--batch-8b", type=int, default=1, help="8B: micro-batch per data-parallel rank")
    ap.add_argument("--accum-8b", type=int, default=4, help="8B: micro-batches per step (the pipeline's 1F1B ones)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after the warm-up); losses cover all")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--n-layers", type=int, default=None, help="override both shapes' layer count")
    ap.add_argument("--tiny", action="store_true", help="CPU-sized shapes (d_model 64, vocab 512) for a smoke test")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per config")
    ap.add_argument("--out", default=None, help="also write the JSON lines here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    available = torch.cuda.device_count() if args.device.startswith("cuda") else os.cpu_count() or 2
    args.nproc = args.nproc or (available if args.device.startswith("cuda") else 2)
    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    records: dict[str, dict] = {}
    for name in names:
        c = CONFIGS[name]
        nproc = args.nproc if c["nproc"] == "all" else c["nproc"]
        if nproc > 1 and args.device.startswith("cuda") and nproc > available:
            rec = {"config": name, "world": nproc, "error": f"needs {nproc} GPUs, {available} visible"}
        else:
            rec = launch(name, nproc, args)
        rec = compare(rec, records.get(c.get("ref")))
        records[name] = rec
        print(json.dumps(rec), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    print()
    print(table(list(records.values())))


if __name__ == "__main__":
    main()
