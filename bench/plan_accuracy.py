"""How well does `lmforge.plan` predict the peak memory of lmforge's own training step?

Grid: method (full / LoRA / QLoRA) x activation checkpointing (off / on) x two sequence lengths x two model shapes,
random weights, random tokens, every token trained, bf16 autocast as `run_training` sets it up (full: fp32 master
weights; LoRA/QLoRA: frozen base in bf16 / NF4, adapters fp32), AdamW, grad clip 1.0. Each cell runs `Trainer.train_step`
a few times; the measured figure is `torch.cuda.max_memory_allocated` over those steps (set up excluded), the
prediction is `lmforge.plan.train_memory(...).peak`. Prints one JSON line per cell, then a table.

    python bench/plan_accuracy.py                       # the GPU grid (about 3 minutes on an H100)

Without CUDA it measures the same steps on the CPU with the profiler's allocation events (`lmforge.plan.measure`);
a CPU smoke run with small shapes:

    python bench/plan_accuracy.py --shapes "tinyllama-1.1b:n_layers=2,d_model=256,d_ff=704,vocab_size=4000" \\
        --seqs 128:2,256:1 --steps 2
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch

DEFAULT_SHAPES = "tinyllama-1.1b,qwen2.5-0.5b"  # 32k vocab untied GQA 32/4 | 152k vocab tied GQA 14/2, qkv bias
DEFAULT_SEQS = "1024:4,4096:1"  # seq_len:micro_batch (4096 tokens per step either way)


def parse_shape(spec: str):
    """'preset' or 'preset:key=value,key=value' -> ModelConfig."""
    from lmforge.config import _parse_value
    from lmforge.models import preset_config

    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        overrides[k.strip()] = _parse_value(v.strip())
    if "d_model" in overrides and "n_heads" not in overrides:  # keep the head dim, shrink the head counts
        base = preset_config(name)
        hd = base.dim_per_head
        heads = max(1, overrides["d_model"] // hd)
        group = base.n_heads // base.kv_heads
        while heads % group:
            group //= 2
        overrides.update(n_heads=heads, n_kv_heads=max(1, heads // group), head_dim=None if overrides[
            "d_model"] % heads == 0 and overrides["d_model"] // heads == hd else hd)
    return preset_config(name, **overrides)


def qlora_available() -> str | None:
    """Why QLoRA cannot run here, or None."""
    try:
        import lmforge.quant.nf4  # noqa: F401
    except ImportError as e:
        return f"lmforge.quant.nf4 not importable ({e})"
    return None


def build(cfg, method: str, rank: int, device: torch.device):
    """Model + method as run_training builds them for bf16 autocast."""
    from lmforge.models import Transformer
    from lmforge.peft.methods import METHODS, build_method

    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    if method == "full":
        m = build_method("full")
    elif method == "qlora" and "qlora" in METHODS:
        m = build_method("qlora", r=rank, alpha=2 * rank, target_modules="all-linear")
    else:
        if method == "qlora":  # NF4 base linears, then LoRA over them (what a qlora method does)
            from lmforge.peft.lora import _set_module, linear_modules, select_targets
            from lmforge.quant.nf4 import NF4Linear

            linears = linear_modules(model)
            for path in select_targets(list(linears), "all-linear"):
                _set_module(model, path, NF4Linear.from_linear(linears[path], dtype=torch.bfloat16))
        m = build_method("lora", r=rank, alpha=2 * rank, target_modules="all-linear")
    m.apply(model)
    if method != "full":  # frozen base in bf16, as run_training does for adapters under bf16 autocast
        trainable = {id(p) for _, p in m.trainable_parameters(model)}
        for p in model.parameters():
            if id(p) not in trainable and p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
    return model, m


def rows_for(cfg, n_rows: int, seq: int):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n_rows):
        tokens = torch.randint(0, cfg.vocab_size, (seq,), generator=g).tolist()
        rows.append({"tokens": tokens, "labels": tokens[1:] + [-100], "positions": list(range(seq))})
    return rows


def measure_cell(cfg, method, ckpt, seq, batch, args, device):
    """Measured peak bytes of `args.steps` training steps (set-up excluded)."""
    from lmforge.data import DataConfig
    from lmforge.plan.measure import cpu_peak_bytes, tensor_bytes
    from lmforge.train import Trainer, TrainConfig
    from lmforge.train.config import ModelSection, TrainSection

    leftover = torch.cuda.memory_allocated() if device.type == "cuda" else 0  # anything an earlier cell leaked
    model, m = build(cfg, method, args.rank, device)
    rows = rows_for(cfg, batch * (args.steps + 1), seq)
    tcfg = TrainConfig(model=ModelSection(tokenizer="unused"), data=DataConfig(path="unused"),
                       train=TrainSection(precision="bf16", micro_batch_size=batch, max_steps=10**6,
                                          activation_checkpointing=ckpt, progress=False, tensorboard=False))
    trainer = Trainer(model, m, rows, None, tcfg, pad_id=0, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.steps):
            trainer.train_step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - leftover
    else:
        trainer.train_step()  # optimizer states exist from here on: measure a steady-state step
        state = [t for s in trainer.optimizer.state.values() for t in s.values()]
        base = tensor_bytes([*model.parameters(), *model.buffers(), *state])
        deltas = [cpu_peak_bytes(trainer.train_step)[0] for _ in range(max(1, args.steps - 1))]
        peak = base + max(deltas)
    impl = "fused" if getattr(trainer.optimizer, "defaults", {}).get("fused") else \
        ("foreach" if device.type == "cuda" else "for-loop")
    del trainer, model, m
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return peak, impl


def predict(cfg, method, ckpt, seq, batch, rank, impl, device):
    from lmforge.plan import TrainSetup, train_memory

    setup = TrainSetup(micro_batch=batch, seq_len=seq, method=method, precision="bf16",
                       activation_checkpointing=ckpt, lora_r=rank, lora_targets="all-linear", optimizer_impl=impl,
                       device=device.type)
    return train_memory(cfg, setup)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-free list separated by ';' or ',' of presets")
    ap.add_argument("--seqs", default=DEFAULT_SEQS, help="seq_len:micro_batch pairs")
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--checkpointing", default="off,on")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--n-layers", type=int, default=None, help="override every shape's layer count")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [s for s in args.shapes.split(";")] if ";" in args.shapes or ":" in args.shapes else \
        args.shapes.split(",")
    seqs = [tuple(int(x) for x in p.split(":")) for p in args.seqs.split(",")]
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (profiler)",
           "torch": torch.__version__}
    qlora_skip = qlora_available()
    results = []
    for spec in shapes:
        cfg = parse_shape(spec)
        if args.n_layers:
            cfg = cfg.model_copy(update={"n_layers": args.n_layers})
        for method in args.methods.split(","):
            if method == "qlora" and qlora_skip:
                print(json.dumps({"shape": spec, "method": method, "skipped": qlora_skip}), flush=True)
                continue
            for ck in args.checkpointing.split(","):
                for seq, batch in seqs:
                    ckpt = ck == "on"
                    row = {"shape": spec, "method": method, "checkpointing": ckpt, "seq": seq, "batch": batch}
                    t0 = time.perf_counter()
                    try:
                        measured, impl = measure_cell(cfg, method, ckpt, seq, batch, args, device)
                    except torch.OutOfMemoryError:
                        measured, impl = None, "fused"
                    except Exception as e:  # noqa: BLE001 - one broken cell must not cost the rest of the grid
                        print(json.dumps({**row, "error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
                        continue
                    finally:
                        gc.collect()
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    est = predict(cfg, method, ckpt, seq, batch, args.rank, impl, device)
                    row.update(predicted_gib=round(est.peak / 2**30, 3), phase=est.phase,
                               measured_gib=None if measured is None else round(measured / 2**30, 3),
                               error_pct=None if measured is None else round(100 * (est.peak - measured) / measured, 1),
                               optimizer_impl=impl, seconds=round(time.perf_counter() - t0, 1), **env)
                    results.append(row)
                    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    print(f"\n{'shape':28} {'method':6} {'ckpt':5} {'seq×B':>8} {'pred GiB':>9} {'meas GiB':>9} {'err %':>7}  phase")
    for r in results:
        meas = "OOM" if r["measured_gib"] is None else f"{r['measured_gib']:.3f}"
        err = "-" if r["error_pct"] is None else f"{r['error_pct']:+.1f}"
        print(f"{r['shape'][:28]:28} {r['method']:6} {'on' if r['checkpointing'] else 'off':5} "
              f"{r['seq']}×{r['batch']:<3} {r['predicted_gib']:>9.3f} {meas:>9} {err:>7}  {r['phase']}")
    errs = [abs(r["error_pct"]) for r in results if r["error_pct"] is not None]
    if errs:
        print(f"\ncells {len(errs)}, max |error| {max(errs):.1f}%, mean |error| {sum(errs) / len(errs):.1f}%, "
              f"within 10%: {sum(e <= 10 for e in errs)}/{len(errs)}")


if __name__ == "__main__":
    main()
