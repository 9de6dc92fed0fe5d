"""FSDP2 on one GPU: full fine-tuning of a 1B-shaped model with and without CPU offload, peak GPU memory and step time.

World size 1 (no torchrun needed): `fully_shard` per block with `CPUOffloadPolicy` keeps parameters, gradients and
AdamW state in CPU memory and streams each block to the GPU for its forward/backward. bf16 autocast, fp32 master
weights, activation checkpointing, batch × seq random tokens. Prints one JSON line per variant, then a table.

    python bench/fsdp_offload.py --preset llama-3.2-1b --batch 2 --seq 2048 --steps 3
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def run(args, offload: bool | None) -> dict:
    from lmforge.data import DataConfig
    from lmforge.models import Transformer, preset_config
    from lmforge.peft.methods import build_method
    from lmforge.train import Trainer, TrainConfig
    from lmforge.train.config import ModelSection, TrainSection
    from lmforge.train.distributed import DistState, ParallelSection, init_distributed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = preset_config(args.preset, **({"n_layers": args.n_layers} if args.n_layers else {}))
    parallel = ParallelSection(zero=3, cpu_offload=bool(offload)) if offload is not None else ParallelSection()
    ds = init_distributed(parallel, device) if offload is not None else DistState()
    torch.manual_seed(0)
    with torch.device("cpu" if offload else device):
        model = Transformer(cfg)
    method = build_method("full")
    method.apply(model)
    g = torch.Generator().manual_seed(0)
    rows = [{"tokens": (t := torch.randint(0, cfg.vocab_size, (args.seq,), generator=g).tolist()),
             "labels": t[1:] + [-100], "positions": list(range(args.seq))}
            for _ in range(args.batch * (args.steps + 1))]
    tcfg = TrainConfig(model=ModelSection(tokenizer="unused"), data=DataConfig(path="unused"), parallel=parallel,
                       train=TrainSection(precision="bf16" if device.type == "cuda" else "fp32",
                                          micro_batch_size=args.batch, max_steps=10**6, activation_checkpointing=True,
                                          progress=False, tensorboard=False))
    trainer = Trainer(model, method, rows, None, tcfg, pad_id=0, device=device, dist_state=ds)
    trainer.train_step()  # warm-up (allocations, optimizer state)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = trainer.train_step()["loss"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    name = {None: "plain (no FSDP)", False: "fsdp2 zero3", True: "fsdp2 zero3 + cpu offload"}[offload]
    return {"variant": name, "peak_gpu_gib": round(peak, 2), "step_s": round(seconds, 3),
            "tokens_per_s": round(args.batch * args.seq / seconds), "loss": round(loss, 4), "preset": args.preset,
            "batch": args.batch, "seq": args.seq, "params": cfg.num_params(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--n-layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for offload in (None, False, True):
        rows.append(run(args, offload))
        print(json.dumps(rows[-1]), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"\n{'variant':28} {'peak GPU GiB':>12} {'step s':>8} {'tokens/s':>9}")
    for r in rows:
        print(f"{r['variant']:28} {r['peak_gpu_gib']:>12} {r['step_s']:>8} {r['tokens_per_s']:>9}")


if __name__ == "__main__":
    main()
