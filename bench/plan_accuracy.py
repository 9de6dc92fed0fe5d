"""How well does `lmforge.plan` predict the peak memory and speed of lmforge's own training step?

Each cell builds the run the way `lmforge train` does (a `TrainConfig` with the method's section and `optim.<name>`,
random weights, random tokens, every token trained) and runs `Trainer.train_step`; the measured peak is
`torch.cuda.max_memory_allocated` over the steps (model construction excluded), the prediction is
`train_memory(cfg, setup_from_train(that TrainConfig))` — the planner reading the trainer's own config. Tokens/s is
measured over the steps after one warm-up step, beside `train_tokens_per_s`. One JSON line per cell (also to --out),
then a table.

    python bench/plan_accuracy.py                          # the original grid: full/LoRA/QLoRA x ckpt x 2 shapes
    python bench/plan_accuracy.py --grid issue --out plan_issue_h100.jsonl     # every method and optimizer the
        # planner claims, 1B and 8B shapes, seq 2048 and 8192, checkpointing on (about 8 minutes on an H100)

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


# --grid issue: (shape, method, optimizer, precision, seq, batch), checkpointing on, LoRA-family rank 16 on all linears,
# prefix tuning with its defaults (20 virtual tokens, no projection)
ISSUE_GRID = [
    *[("llama-3.2-1b", m, "adamw", "bf16", seq, 1) for m in ("full", "lora", "dora", "qlora", "prefix")
      for seq in (2048, 8192)],
    *[("llama-3.2-1b", "full", o, "bf16-pure", seq, 1) for o in ("adamw", "lomo", "adalomo", "badam", "galore")
      for seq in (2048, 8192)],
    *[("llama-3-8b", m, "adamw", "bf16", seq, 1) for m in ("lora", "qlora") for seq in (2048, 8192)],
]


def train_config(method: str, optimizer: str, precision: str, ckpt: bool, batch: int, rank: int):
    """The TrainConfig `lmforge train` would build for this cell (the planner reads the same object)."""
    from lmforge.data import DataConfig
    from lmforge.train import TrainConfig
    from lmforge.train.config import ModelSection, OptimSection, TrainSection

    sections = ({} if method == "full" else {"prefix": {}} if method == "prefix"  # prefix: its section's defaults
                else {method: {"r": rank, "alpha": 2 * rank, "target_modules": "all-linear"}})
    return TrainConfig(model=ModelSection(tokenizer="unused"), data=DataConfig(path="unused"), method=method,
                       optim=OptimSection(name=optimizer, lr=1e-5), **sections,
                       train=TrainSection(precision=precision, micro_batch_size=batch, max_steps=10**6,
                                          activation_checkpointing=ckpt, progress=False, tensorboard=False,
                                          grad_clip=None if optimizer in ("lomo", "adalomo") else 1.0))


def build(cfg, tcfg, device: torch.device):
    """Model + method as run_training builds them: full fine-tuning keeps fp32 master weights under bf16 autocast
    (bf16 weights for bf16-pure); adapter and prefix methods a frozen bf16 base (QLoRA: NF4 linears) and fp32
    adapters / prefix."""
    from lmforge.models import Transformer
    from lmforge.train.run import method_from_config

    torch.manual_seed(0)
    dtype = torch.bfloat16 if tcfg.train.precision == "bf16-pure" or tcfg.method != "full" else torch.float32
    with torch.device(device):
        model = Transformer(cfg).to(dtype)
    m = method_from_config(tcfg, 10**6)
    m.apply(model)
    if tcfg.method != "full":  # frozen base in bf16, as run_training does for adapters under bf16 autocast
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


def measure_cell(cfg, tcfg, seq, batch, steps, device):
    """(measured peak bytes of `steps` training steps, construction excluded; tokens/s after one warm-up step;
    the optimizer implementation the trainer picked)."""
    from lmforge.plan.measure import cpu_peak_bytes, tensor_bytes
    from lmforge.train import Trainer

    leftover = torch.cuda.memory_allocated() if device.type == "cuda" else 0  # anything an earlier cell leaked
    model, m = build(cfg, tcfg, device)
    rows = rows_for(cfg, batch * (steps + 1), seq)
    trainer = Trainer(model, m, rows, None, tcfg, pad_id=0, device=device)
    tps = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the step only: construction transients are not the step's
        trainer.train_step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps - 1):
            trainer.train_step()
        torch.cuda.synchronize()
        if steps > 1:
            tps = batch * seq * (steps - 1) / (time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() - leftover
    else:
        trainer.train_step()  # optimizer states exist from here on: measure a steady-state step
        state = [t for s in trainer.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        base = tensor_bytes([*model.parameters(), *model.buffers(), *state])
        deltas = [cpu_peak_bytes(trainer.train_step)[0] for _ in range(max(1, steps - 1))]
        peak = base + max(deltas)
    impl = "fused" if getattr(trainer.optimizer, "defaults", {}).get("fused") else \
        ("foreach" if device.type == "cuda" else "for-loop")
    if hasattr(trainer.optimizer, "remove_hooks"):
        trainer.optimizer.remove_hooks()
    del trainer, model, m
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return peak, tps, impl


def predict(cfg, tcfg, seq, impl, device):
    from dataclasses import replace

    from lmforge.plan import setup_from_train, train_memory, train_tokens_per_s

    setup = replace(setup_from_train(tcfg, seq, device=device.type), optimizer_impl=impl)
    return train_memory(cfg, setup), train_tokens_per_s(cfg, setup)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", choices=["default", "issue"], default="default",
                    help="issue: every method and optimizer the planner claims (ignores --shapes/--seqs/...)")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="presets, optionally preset:key=value,..., split by ';'")
    ap.add_argument("--seqs", default=DEFAULT_SEQS, help="seq_len:micro_batch pairs")
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--optimizers", default="adamw", help="for method full: adamw,lomo,adalomo,badam,galore")
    ap.add_argument("--precision", default="bf16", help="bf16 (autocast, fp32 masters) or bf16-pure")
    ap.add_argument("--checkpointing", default="off,on")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--n-layers", type=int, default=None, help="override every shape's layer count")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (profiler)",
           "torch": torch.__version__}
    if args.grid == "issue":
        cells = [(shape, m, o, p, True, seq, b) for shape, m, o, p, seq, b in ISSUE_GRID]
    else:
        shapes = args.shapes.split(";") if ";" in args.shapes or ":" in args.shapes else args.shapes.split(",")
        seqs = [tuple(int(x) for x in p.split(":")) for p in args.seqs.split(",")]
        cells = [(shape, m, o, args.precision, ck == "on", seq, b) for shape in shapes
                 for m in args.methods.split(",") for o in (args.optimizers.split(",") if m == "full" else ["adamw"])
                 for ck in args.checkpointing.split(",") for seq, b in seqs]
    results = []
    out = open(args.out, "w") if args.out else None
    for spec, method, optim, precision, ckpt, seq, batch in cells:
        cfg = parse_shape(spec)
        if args.n_layers:
            cfg = cfg.model_copy(update={"n_layers": args.n_layers})
        row = {"shape": spec, "method": method, "optimizer": optim, "precision": precision, "checkpointing": ckpt,
               "seq": seq, "batch": batch}
        tcfg = train_config(method, optim, precision, ckpt, batch, args.rank)
        t0 = time.perf_counter()
        try:
            measured, tps, impl = measure_cell(cfg, tcfg, seq, batch, args.steps, device)
        except torch.OutOfMemoryError:
            measured, tps, impl = None, None, "fused"
        except Exception as e:  # noqa: BLE001 - one broken cell must not cost the rest of the grid
            print(json.dumps({**row, "error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
            continue
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        est, pred_tps = predict(cfg, tcfg, seq, impl, device)
        from lmforge.plan import Overheads

        row.update(predicted_gib=round(est.peak / 2**30, 3), phase=est.phase,
                   measured_gib=None if measured is None else round(measured / 2**30, 3),
                   error_pct=None if measured is None else round(100 * (est.peak - measured) / measured, 1),
                   fit_check_gib=round(Overheads().reserve(est.peak) / 2**30, 3),
                   predicted_tokens_per_s=round(pred_tps), measured_tokens_per_s=None if tps is None else round(tps),
                   optimizer_impl=impl, seconds=round(time.perf_counter() - t0, 1), **env)
        results.append(row)
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()
    print(f"\n{'shape':22} {'method':6} {'optim':8} {'prec':9} {'ckpt':4} {'seq×B':>8} {'pred GiB':>9} "
          f"{'meas GiB':>9} {'err %':>7} {'pred tok/s':>10} {'meas tok/s':>10}  phase")
    for r in results:
        meas = "OOM" if r["measured_gib"] is None else f"{r['measured_gib']:.3f}"
        err = "-" if r["error_pct"] is None else f"{r['error_pct']:+.1f}"
        mt = "-" if r["measured_tokens_per_s"] is None else f"{r['measured_tokens_per_s']:,}"
        print(f"{r['shape'][:22]:22} {r['method']:6} {r['optimizer']:8} {r['precision']:9} "
              f"{'on' if r['checkpointing'] else 'off':4} {r['seq']}×{r['batch']:<3} {r['predicted_gib']:>9.3f} "
              f"{meas:>9} {err:>7} {r['predicted_tokens_per_s']:>10,} {mt:>10}  {r['phase']}")
    errs = [r["error_pct"] for r in results if r["error_pct"] is not None]
    if errs:
        print(f"\ncells {len(errs)}, worst under {min(errs):+.1f}%, worst over {max(errs):+.1f}%, "
              f"mean |error| {sum(map(abs, errs)) / len(errs):.1f}%, within -5%..+15%: "
              f"{sum(-5 <= e <= 15 for e in errs)}/{len(errs)}")


if __name__ == "__main__":
    main()
