"""Batch-1 decode tokens/s of bf16 vs INT8 vs INT4 weight-only models, with the HBM roofline beside each figure.

For each preset shape (random weights, built directly on the GPU in bf16, seeded so every variant starts from the
same weights) and each variant, quantizes every linear in the blocks (lm_head stays bf16, as AWQ/GPTQ checkpoints
do), converts to PyTorch's fused kernels where they verify (`prepare_fast_path`: aten._weight_int8pack_mm /
_weight_int4pack_mm), and times greedy decoding with lmforge's `generate(compile=True)` (static KV cache, CUDA-graph
decode step), median of `--repeats` runs after a warm-up.

Roofline: a decode step reads every weight once (quantized codes + scales + zero points, the bf16 head and norms,
one embedding row) plus the KV cache up to the current position; tokens/s can be at most
HBM bandwidth / bytes-per-token. `-ref` variants force the dequantize-then-matmul path (compiled by inductor).

    python bench/quant_decode.py                                  # Llama-3.2-1B and Llama-3-8B shapes, H100/H200
    python bench/quant_decode.py --presets llama-3.2-1b --n-layers 2 --new-tokens 8 --repeats 1 --no-compile  # CPU
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HBM_TBPS = {"H200": 4.8, "H100 PCIe": 2.0, "H100 NVL": 3.9, "H100": 3.35, "A100-SXM4-80GB": 2.04, "A100": 1.55}


def hbm_bandwidth(override: float | None) -> float | None:
    """Bytes/s of the visible GPU's memory (spec sheet), or `override` TB/s."""
    if override:
        return override * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tbps in HBM_TBPS.items():
        if all(part in name for part in key.split()):
            return tbps * 1e12
    return None


def build(preset: str, n_layers: int | None, device: str, seed: int):
    from lmforge.models import Transformer, preset_config

    cfg = preset_config(preset, **({"n_layers": n_layers} if n_layers else {}))
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def bytes_per_token(model, context: int) -> int:
    """Weight bytes one decode step reads (one embedding row unless tied) + KV cache bytes at `context`."""
    cfg = model.cfg
    total = 0
    for name, t in model.state_dict().items():
        if name == "embed.weight" and not cfg.tie_embeddings:
            total += t.shape[1] * t.element_size()  # one row gathered
        else:
            total += t.numel() * t.element_size()
    kv = 2 * cfg.n_layers * cfg.kv_heads * cfg.dim_per_head * context * 2  # bf16 K and V
    return total + kv


def quantize(model, variant: str, group_size: int) -> dict:
    from lmforge.quant import prepare_fast_path, quantize_model

    kind = variant.removesuffix("-ref")
    if kind == "bf16":
        return {}
    quantize_model(model, "int8" if kind == "int8" else "int4", group_size=group_size)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {} if variant.endswith("-ref") else prepare_fast_path(model, torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="llama-3.2-1b,llama-3-8b")
    ap.add_argument("--variants", default="bf16,int8,int4", help="bf16, int8, int4, int8-ref, int4-ref")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=None, help="override the depth (smoke runs)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="eager decode (CPU smoke runs)")
    ap.add_argument("--hbm-tbps", type=float, default=None, help="memory bandwidth in TB/s (default: by GPU name)")
    ap.add_argument("--out", default=None, help="also write the JSON lines here")
    args = ap.parse_args()

    from lmforge.infer import SamplingParams, generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = hbm_bandwidth(args.hbm_tbps)
    compile = not args.no_compile and device == "cuda"
    n = args.new_tokens
    params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "prompt_len": args.prompt_len, "new_tokens": n, "compile": compile, "group_size": args.group_size,
           "hbm_tbps": bandwidth / 1e12 if bandwidth else None}
    rows = []
    for preset in args.presets.split(","):
        torch.manual_seed(1)
        prompt = torch.randint(100, 1000, (1, args.prompt_len)).tolist()
        ref_logits = None
        for variant in args.variants.split(","):
            model = build(preset, args.n_layers, device, seed=0)
            kernels = quantize(model, variant, args.group_size)
            probe = torch.tensor(prompt, device=device)
            with torch.no_grad():
                logits = model(probe).float()
            if variant == "bf16":
                ref_logits = logits
            rel_err = None if ref_logits is None else round(
                ((logits - ref_logits).norm() / ref_logits.norm()).item(), 4)
            run = lambda: generate(model, prompt, params, compile=compile)  # noqa: E731
            t0 = time.perf_counter()
            run()
            warm = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                run()
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            seconds = sorted(times)[len(times) // 2]
            per_token = bytes_per_token(model, args.prompt_len + n // 2)
            roofline = bandwidth / per_token if bandwidth else None
            row = {"preset": preset, "variant": variant, "tokens_per_s": round(n / seconds, 1),
                   "roofline_tokens_per_s": round(roofline, 1) if roofline else None,
                   "of_roofline": round(n / seconds / roofline, 3) if roofline else None,
                   "gb_per_token": round(per_token / 1e9, 3), "kernels": kernels, "logits_rel_err_vs_bf16": rel_err,
                   "warmup_s": round(warm, 1), "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)
                   if device == "cuda" else None, **env}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
            if compile:
                torch._dynamo.reset()  # a fresh compile per variant (and no stale CUDA graphs holding memory)
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"\n{'preset':14} {'variant':9} {'tok/s':>8} {'roofline':>9} {'of roof':>8} {'GB/token':>9} "
          f"{'rel err':>8}  kernels")
    for r in rows:
        roof = r["roofline_tokens_per_s"]
        print(f"{r['preset']:14} {r['variant']:9} {r['tokens_per_s']:>8} {roof if roof else '-':>9} "
              f"{r['of_roofline'] if roof else '-':>8} {r['gb_per_token']:>9} "
              f"{r['logits_rel_err_vs_bf16'] if r['logits_rel_err_vs_bf16'] is not None else '-':>8}  "
              f"{','.join(f'{k}:{v}' for k, v in r['kernels'].items()) or 'dense'}")


if __name__ == "__main__":
    main()
