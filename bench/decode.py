"""Batch-1 greedy decode throughput: lmforge vs transformers `generate`, same random checkpoint, same run.

Writes a Llama-3.2-1B-shaped random checkpoint with transformers (bf16), loads it with lmforge through the real HF
loader, and times 256 new tokens per variant (after a warm-up). Prints one JSON line per variant, then a table.

    python bench/decode.py --preset llama-3.2-1b --new-tokens 256 [--out results.jsonl]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import sync  # noqa: E402 (run as a script)


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


def write_checkpoint(preset: str, path: Path, dtype: torch.dtype, n_layers: int | None) -> None:
    import transformers

    from lmforge.models import preset_config
    from lmforge.models.hf import hf_config_dict

    cfg = preset_config(preset, **({"n_layers": n_layers} if n_layers else {}))
    hf_cfg = transformers.AutoConfig.for_model(**hf_config_dict(cfg, dtype))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    model.save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--n-layers", type=int, default=None, help="override the depth (CPU smoke runs)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--skip-hf-compile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import transformers

    from lmforge.infer import SamplingParams, generate
    from lmforge.models import load_hf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    ckpt = Path(tempfile.mkdtemp()) / args.preset
    write_checkpoint(args.preset, ckpt, dtype, args.n_layers)
    torch.manual_seed(0)
    prompt = torch.randint(100, 1000, (1, args.prompt_len)).tolist()
    n = args.new_tokens
    params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    rows, tokens = [], {}
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "preset": args.preset, "dtype": args.dtype,
           "prompt_len": args.prompt_len, "new_tokens": n}

    def record(name, seconds, ids):
        rows.append({"variant": name, "tokens_per_s": round(n / seconds, 1), "seconds": round(seconds, 3), **env})
        tokens[name] = ids
        print(json.dumps(rows[-1]), flush=True)

    model = load_hf(ckpt, dtype=dtype, device=device, progress=False)
    for compile in (False, True):
        name = "lmforge" + ("+compile" if compile else "")
        run = lambda: generate(model, prompt, params, compile=compile)[0].token_ids  # noqa: E731
        t0 = time.perf_counter()
        run()  # warm-up (compiles and captures the graph for the compiled variant)
        warm = time.perf_counter() - t0
        seconds, ids = _timed(run, args.repeats)
        record(name, seconds, ids)
        rows[-1]["warmup_s"] = round(warm, 1)
    del model
    torch.cuda.empty_cache() if device == "cuda" else None

    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    inp = torch.tensor(prompt, device=device)
    hf_kwargs = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    variants = [("transformers", {})]
    if not args.skip_hf_compile and device == "cuda":
        # transformers compiles the forward itself when the cache is static (its documented fast path)
        variants.append(("transformers+static+compile", {"cache_implementation": "static"}))
    for name, extra in variants:
        run = lambda: hf.generate(inp, **hf_kwargs, **extra)[0, args.prompt_len:].tolist()  # noqa: E731
        t0 = time.perf_counter()
        run()
        warm = time.perf_counter() - t0
        seconds, ids = _timed(run, args.repeats)
        record(name, seconds, ids)
        rows[-1]["warmup_s"] = round(warm, 1)

    ref = tokens["transformers"]
    for r in rows:  # how long each variant's greedy tokens agree with transformers' eager greedy (bf16 may drift)
        ids = tokens[r["variant"]]
        r["same_tokens_as_transformers"] = next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), len(ref))
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"\n{'variant':32} {'tokens/s':>10} {'warm-up s':>10} {'agree':>6}")
    for r in rows:
        print(f"{r['variant']:32} {r['tokens_per_s']:>10} {r.get('warmup_s', 0):>10} "
              f"{r['same_tokens_as_transformers']:>6}")


if __name__ == "__main__":
    main()
