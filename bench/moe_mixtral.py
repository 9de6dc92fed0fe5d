"""Mixtral-shaped MoE throughput: training step and decode, lmforge vs transformers, same random checkpoint, same run.

Default shape: the mixtral-8x7b preset cut to 4 layers (8 experts, top-2, d_model 4096, expert d_ff 14336, GQA 32/8;
6.07B parameters, 12.1 GB in bf16) so one GPU holds it with gradients. transformers writes the checkpoint (bf16),
lmforge loads it through the real HF loader, then each framework in turn (one model in memory at a time):

- decode: greedy `generate` of --new-tokens tokens per prompt, batch sizes --decode-batch, eager and compiled
  (lmforge `compile=True`: CUDA-graph decode step; transformers: static cache + its own compile);
- train: forward + backward + a plain SGD update (stateless, so memory is weights + grads + activations) on
  --batch x --seq-len random tokens, causal-LM loss + 0.02 x load-balancing loss in both (transformers:
  output_router_logits=True, router_aux_loss_coef=0.02).

Prints one JSON line per measurement, then a table. The step-0 training loss of both frameworks (same weights, same
batch) and the greedy-token agreement with transformers' eager decode are reported as a parity check.

    python bench/moe_mixtral.py                       # the GPU run (defaults)
    python bench/moe_mixtral.py --n-layers 2 --d-model 64 --d-ff 128 --n-heads 4 --n-kv-heads 2 --vocab-size 512 \
        --batch 2 --seq-len 64 --train-steps 2 --new-tokens 8 --decode-batch 1,2 --dtype float32   # CPU smoke
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import sync  # noqa: E402 (run as a script)

AUX_COEF = 0.02


def _timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds over `repeats` runs (after the caller's warm-up), and the last result."""
    times, out = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None


def model_config(args):
    from lmforge.models import preset_config

    overrides = {k: v for k, v in dict(n_layers=args.n_layers, d_model=args.d_model, d_ff=args.d_ff,
                                       n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, vocab_size=args.vocab_size,
                                       moe_experts=args.experts).items() if v is not None}
    return preset_config(args.preset, **overrides)


def write_checkpoint(cfg, path: Path, dtype: torch.dtype) -> None:
    import transformers

    from lmforge.models.hf import hf_config_dict

    hf_cfg = transformers.AutoConfig.for_model(**hf_config_dict(cfg, dtype))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    model.save_pretrained(path)
    del model
    _free()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mixtral-8x7b")
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=None, help="shape overrides for CPU smoke runs")
    ap.add_argument("--d-ff", type=int, default=None)
    ap.add_argument("--n-heads", type=int, default=None)
    ap.add_argument("--n-kv-heads", type=int, default=None)
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4, help="training micro-batch (sequences)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--train-steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--decode-batch", default="1,8", help="comma-separated decode batch sizes")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--skip-compile", action="store_true", help="eager decode only (both frameworks)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import transformers

    from lmforge.infer import SamplingParams, generate
    from lmforge.models import load_hf
    from lmforge.train.loss import causal_lm_loss_sum

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    compile_variants = [False] if args.skip_compile or device == "cpu" else [False, True]
    cfg = model_config(args)
    ckpt = Path(tempfile.mkdtemp()) / "moe"
    t0 = time.perf_counter()
    write_checkpoint(cfg, ckpt, dtype)
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "preset": args.preset, "n_layers": cfg.n_layers,
           "experts": cfg.moe_experts, "top_k": cfg.moe_top_k, "params": cfg.num_params(),
           "active_params": cfg.num_params(active=True), "dtype": args.dtype}
    print(json.dumps({"checkpoint_written_s": round(time.perf_counter() - t0, 1), **env}), flush=True)

    g = torch.Generator().manual_seed(0)
    train_tokens = torch.randint(100, cfg.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
    labels = torch.full_like(train_tokens, -100)
    labels[:, :-1] = train_tokens[:, 1:]  # lmforge labels are pre-shifted; transformers shifts `input_ids` itself
    n_targets = int((labels != -100).sum())
    batches = [int(b) for b in args.decode_batch.split(",")]
    prompts = {b: torch.randint(100, cfg.vocab_size, (b, args.prompt_len), generator=g).tolist() for b in batches}
    n = args.new_tokens
    rows, tokens = [], {}

    def record(kind, name, seconds, n_tokens, **extra):
        rows.append({"kind": kind, "variant": name, "tokens_per_s": round(n_tokens / seconds, 1),
                     "seconds": round(seconds, 3), **extra, **env})
        print(json.dumps(rows[-1]), flush=True)

    def bench_train(name, step):
        first = step()  # warm-up 1 (its loss: the same weights and batch in both frameworks)
        step()
        seconds, _ = _timed(lambda: [step() for _ in range(args.train_steps)], 1)
        record("train", name, seconds / args.train_steps, args.batch * args.seq_len, loss_step0=round(first, 4),
               peak_mem_gib=_peak_gib(), batch=args.batch, seq_len=args.seq_len)

    # ---------------------------------------------------------------- lmforge
    model = load_hf(ckpt, dtype=dtype, device=device, progress=False)
    params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    for b in batches:
        for compile in compile_variants:
            name = f"lmforge{'+compile' if compile else ''}"
            run = lambda: [c.token_ids for c in generate(model, prompts[b], params, compile=compile)]  # noqa: E731
            t0 = time.perf_counter()
            run()
            warm = time.perf_counter() - t0
            seconds, ids = _timed(run, args.repeats)
            tokens[(name, b)] = ids
            record("decode", name, seconds, b * n, batch=b, warmup_s=round(warm, 1))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)

    def lmforge_step() -> float:
        hidden = model.hidden_states(train_tokens)
        loss = causal_lm_loss_sum(model.logits, hidden, labels) / n_targets + AUX_COEF * model.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    _free()
    bench_train("lmforge", lmforge_step)
    del model, opt
    _free()

    # ---------------------------------------------------------------- transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    env["hf_experts_implementation"] = getattr(hf.config, "_experts_implementation", None)
    for b in batches:
        inp = torch.tensor(prompts[b], device=device)
        hf_kwargs = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        for compile in compile_variants:
            name, extra = ("transformers+static+compile", {"cache_implementation": "static"}) if compile else \
                ("transformers", {})
            run = lambda: hf.generate(inp, **hf_kwargs, **extra)[:, args.prompt_len:].tolist()  # noqa: E731
            t0 = time.perf_counter()
            run()
            warm = time.perf_counter() - t0
            seconds, ids = _timed(run, args.repeats)
            tokens[(name, b)] = ids
            record("decode", name, seconds, b * n, batch=b, warmup_s=round(warm, 1))
    hf.config.router_aux_loss_coef = hf.router_aux_loss_coef = AUX_COEF  # the model copies it at init
    hf.train()
    hf_opt = torch.optim.SGD(hf.parameters(), lr=1e-5)

    def hf_step() -> float:
        loss = hf(input_ids=train_tokens, labels=train_tokens, output_router_logits=True).loss
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        return loss.item()

    _free()
    bench_train("transformers", hf_step)

    for r in rows:  # how many greedy tokens each decode variant shares with transformers' eager decode (bf16 drifts)
        if r["kind"] == "decode":
            ref, got = tokens[("transformers", r["batch"])], tokens[(r["variant"], r["batch"])]
            r["same_tokens_as_transformers"] = min(
                next((i for i, (a, c) in enumerate(zip(x, y)) if a != c), len(y)) for x, y in zip(got, ref))
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"\n{'kind':7} {'variant':30} {'batch':>5} {'tokens/s':>10} {'peak GiB':>9} {'loss@0':>8} {'agree':>6}")
    for r in rows:
        print(f"{r['kind']:7} {r['variant']:30} {r['batch']:>5} {r['tokens_per_s']:>10} "
              f"{str(r.get('peak_mem_gib', '')):>9} {str(r.get('loss_step0', '')):>8} "
              f"{str(r.get('same_tokens_as_transformers', '')):>6}")


if __name__ == "__main__":
    main()
