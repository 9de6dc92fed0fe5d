"""Weight-only quantized serving speed: bf16 vs INT8 / INT4 / NF4 through lmforge's engine, same weights, same call.

For each variant a Llama-3-8B-shaped model (random weights, built on the GPU in bf16, seeded so every variant
starts from the same weights) has every block linear quantized (lm_head stays bf16, as AWQ/GPTQ checkpoints do;
a `+head8` variant quantizes it to INT8 too, as `lmforge quantize --lm-head int8`);
the quantized layers pick their kernels themselves (`lmforge.quant.qkernel`: Triton GEMV for decode rows, a
dequantize-in-registers GEMM for batches, each checked against the reference before first use). Two figures per
variant, each through the serving engine (paged KV cache, CUDA graphs):

- batch-1 decode: one request, `--prompt-len` prompt, `--new-tokens` generated, decode tokens/s after the first
  token, best of `--repeats` (`--compile` also torch.compiles the forward, as the bf16 figures in
  docs/benchmarks.md do), with the HBM roofline (weight bytes + average KV bytes per token over the bandwidth);
- throughput: `--concurrent` requests submitted at once (same prompt/output lengths), output tokens/s.

Every row carries the speedup over the bf16 row of the same call and the issue's goals (batch-1: INT4 >= 2.8x,
NF4 >= 2.5x, INT8 >= 1.7x; throughput >= 1.0x). A variant that fails is recorded with its error; the others go on.
`int4-tinygemm` uses PyTorch's `_weight_int4pack_mm` instead (prepare_fast_path), `int4-dq` sends INT4's batched
rows through one dequantizing pass + cuBLAS instead of the GEMM (as NF4 does; throughput only), `int4-nk` INT4's
row-major kernels (the buffers as quantized, not re-laid K-major by prepare_fast_path); `<kind>-ref` turns lmforge's
kernels off (dequantize + matmul: `engine.kernels.quant=false`); `--gemv-tiles` forces the quantized GEMV's tiles
(`engine.kernels.quant_gemv_tiles`, e.g. the best of bench/qkernel_tiles.py).

    python bench/quant_decode.py --variants bf16,int4,nf4 --new-tokens 128 --repeats 2 --out q1.jsonl
    python bench/quant_decode.py --variants bf16,int8,int4-tinygemm --new-tokens 128 --repeats 2 --out q2.jsonl
    python bench/quant_decode.py --variants bf16,int4 --gemv-tiles 8,1024,8 ...          # GEMV tiles to try
    python bench/quant_decode.py --preset llama-3.2-1b --n-layers 2 --new-tokens 8 --repeats 1 --concurrent 4 \\
        --prompt-len 16                                                          # CPU smoke run
"""
from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from pathlib import Path

import torch
from _common import decode_tokens_per_s, sync  # noqa: E402 (run as a script)

HBM_SPEC = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12,
            "A100": 1.555e12}
GOALS = {"int4": 2.8, "nf4": 2.5, "int8": 1.7}  # batch-1 decode speedup over bf16 (issue 29)


def build(preset: str, n_layers: int | None, device: str, seed: int = 0):
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


def kernel_options(variant: str, gemv_tiles: str | None):
    """The engine's kernel options for `variant`: lmforge's quantized kernels off for `<kind>-ref`, forced tiles."""
    from lmforge.infer.kernels.options import KernelOptions

    tiles = tuple(int(v) for v in gemv_tiles.split(",")) if gemv_tiles else None
    return KernelOptions(quant=not variant.endswith("-ref"), quant_gemv_tiles=tiles)


def quantize(model, variant: str, group_size: int, kernels) -> dict:
    """Quantize in place, the layers computing with `kernels` (a KernelOptions); returns what
    `prepare_fast_path` did (tinygemm only)."""
    from lmforge.quant import prepare_fast_path, quantize_model, set_kernels

    variant, _, head = variant.partition("+")  # "+head8": lm_head quantized to INT8 too (`lmforge quantize --lm-head`)
    kind = variant.removesuffix("-ref").removesuffix("-tinygemm").removesuffix("-nk").removesuffix("-dq")
    if kind == "bf16":
        return {}
    quantize_model(model, "int4" if kind == "int4" else kind, group_size=group_size,
                   lm_head={"": "keep", "head8": "int8"}[head])
    set_kernels(model, kernels.quant_kernels())  # before prepare_fast_path, which reports (and picks by) them
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if variant.endswith("-tinygemm"):  # PyTorch's _weight_int4pack_mm instead of lmforge's kernels
        from lmforge.quant import Int4Linear

        layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
        kernels = [m.prepare_fast_path(torch.bfloat16, aten=True) or "reference" for m in layers]
        return {k: kernels.count(k) for k in set(kernels)}
    if variant.endswith("-nk"):  # INT4's row-major kernels: the buffers as quantized, not re-laid K-major
        return {"triton int4 (row-major)": sum(1 for m in model.modules() if getattr(m, "kind", "") == "int4")}
    return prepare_fast_path(model, torch.bfloat16)  # what load_hf does: reports the kernels chosen


def bytes_per_token(model, context: float) -> int:
    """Bytes one decode step reads: every weight and quantization buffer once (an untied embedding one row) + KV."""
    cfg = model.cfg
    total = 0
    for name, t in model.state_dict().items():
        if name == "embed.weight" and not cfg.tie_embeddings:
            total += t.shape[1] * t.element_size()
        else:
            total += t.numel() * t.element_size()
    return int(total + 2 * cfg.n_layers * cfg.kv_heads * cfg.dim_per_head * 2 * context)


def batch1(model, args, kernels) -> dict:
    from lmforge.infer import LLM, EngineConfig, SamplingParams

    torch.manual_seed(1)
    prompt = torch.randint(100, model.cfg.vocab_size - 100, (args.prompt_len,)).tolist()
    n = args.new_tokens
    cfg = EngineConfig(max_model_len=args.prompt_len + n + 16, max_num_seqs=1, decode_steps=args.decode_steps,
                       compile=args.compile, enable_prefix_caching=False, num_blocks=args.num_blocks, kernels=kernels)
    llm = LLM(model, config=cfg)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    t0 = time.perf_counter()
    first_run = llm.generate([prompt], params)[0].token_ids  # warm-up: checks the kernels, captures the graph
    warmup = time.perf_counter() - t0
    best = 0.0
    for _ in range(args.repeats):
        rate = decode_tokens_per_s(engine, prompt, params)  # decode only: after the first token
        if rate == rate:
            best = max(best, rate)
    out = {"decode_tokens_per_s": round(best, 1), "warmup_s": round(warmup, 1), "first_tokens": first_run[:8]}
    if args.profile:
        out["profile"] = profile(engine, prompt, params, args.profile)
    del llm, engine
    return out


def profile(engine, prompt, params, top: int) -> dict:
    """GPU time per decoded token, kernel by kernel (torch.profiler over one more request; CUDA-graph replays
    are traced node by node): the `top` kernels by time, the rest summed, and the GPU-busy total. On CPU: the
    operators' own CPU time instead."""
    from torch.profiler import ProfilerActivity, profile as trace

    cuda = torch.cuda.is_available()
    with trace(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        engine.add_request(prompt, params)
        tokens = 0
        while engine.has_unfinished():
            tokens += sum(len(o.new_token_ids) for o in engine.step())
        sync()
    rows = [(e.key, (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)) if cuda
             else e.self_cpu_time_total, e.count) for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])
    per = lambda us: round(us / max(tokens, 1), 2)  # noqa: E731 -- microseconds per token
    kernels = [{"kernel": k[:90], "us_per_token": per(t), "launches_per_token": round(n / max(tokens, 1), 2)}
               for k, t, n in rows[:top]]
    return {"tokens": tokens, "busy_us_per_token": per(sum(r[1] for r in rows)),
            "rest_us_per_token": per(sum(r[1] for r in rows[top:])), "kernels": kernels}


def throughput(model, args, kernels) -> dict:
    from lmforge.infer import LLM, EngineConfig, SamplingParams

    torch.manual_seed(2)
    prompts = torch.randint(100, model.cfg.vocab_size - 100, (args.concurrent, args.prompt_len)).tolist()
    cfg = EngineConfig(max_model_len=args.prompt_len + args.new_tokens + 16, max_num_seqs=args.concurrent,
                       decode_steps=args.decode_steps, compile=False, num_blocks=args.num_blocks, kernels=kernels)
    llm = LLM(model, config=cfg)
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True)
    t0 = time.perf_counter()  # warm-up: the same requests, short answers, so every prefill chunk and batch size the
    # timed run meets has built and verified its kernel variants (a compile inside the timed run would count)
    llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=min(args.new_tokens, 2 * args.decode_steps + 2),
                                         ignore_eos=True))
    warmup = time.perf_counter() - t0
    sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync()
    seconds = time.perf_counter() - t0
    n_out = sum(len(o.token_ids) for o in outs)
    del llm
    return {"concurrent": args.concurrent, "output_tokens_per_s": round(n_out / seconds, 1),
            "output_tokens": n_out, "seconds": round(seconds, 2), "throughput_warmup_s": round(warmup, 1)}


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--variants", default="bf16,int8,int4,nf4",
                    help="bf16, int8, int4, nf4, int4-tinygemm, int4-nk, int4-dq, <kind>-ref (lmforge's kernels off; "
                         "<kind>+head8: lm_head INT8 too)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=None, help="override the depth (smoke runs)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--concurrent", type=int, default=64, help="requests at once for the throughput figure (0: skip)")
    ap.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (default: sized by the engine)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the batch-1 forward (default: on CUDA)")
    ap.add_argument("--gemv-tiles", default=None, metavar="ROWS,COLUMNS,WARPS",
                    help="force the quantized GEMV's tiles (engine.kernels.quant_gemv_tiles; default: by shape)")
    ap.add_argument("--kn-tiles", default=None, metavar="COLUMNS,STEP,WARPS,STEPS",
                    help="the K-major INT4 GEMV's default tiles for this run (qkernel.GEMV_TILES['int4kn'])")
    ap.add_argument("--nf4kn-tiles", default=None, metavar="COLUMNS,STEP,WARPS,STEPS",
                    help="the K-major NF4 GEMV's default tiles for this run (qkernel.GEMV_TILES['nf4kn'])")
    ap.add_argument("--int8-tiles", default=None, metavar="ROWS,COLUMNS,WARPS,MAGIC",
                    help="the INT8 GEMV's default tiles for this run (qkernel.GEMV_TILES['int8'])")
    ap.add_argument("--kn-gemm-magic", type=int, choices=(0, 1, 2), default=None,
                    help="the K-major INT4 GEMM's code words to weights: 0 conversions, 1 the exponent trick, 2 16-bit "
                         "pairs in registers (default: qkernel.KN_GEMM_MAGIC)")
    ap.add_argument("--kn-gemm-tiles", default=None,
                    help="the K-major INT4 GEMM's BLOCK_N (0: by shape),BLOCK_K,warps,K splits (-1: by shape),stages "
                         "(default: qkernel.KN_GEMM_TILES)")
    ap.add_argument("--kn-gemm-words", action=argparse.BooleanOptionalAction, default=None,
                    help="the K-major INT4 GEMM's code words loaded once, unpacked in registers "
                         "(default: qkernel.KN_GEMM_WORDS)")
    ap.add_argument("--profile", type=int, default=0, metavar="TOP",
                    help="also trace one more batch-1 request with torch.profiler: GPU time per token of the TOP "
                         "kernels (0: off)")
    ap.add_argument("--out", default=None, help="also write the JSON lines here (after every variant)")
    args = ap.parse_args()

    from lmforge.quant import qkernel

    for fmt, tiles in (("int4kn", args.kn_tiles), ("nf4kn", args.nf4kn_tiles), ("int8", args.int8_tiles)):
        if tiles:
            qkernel.GEMV_TILES[fmt] = tuple(int(v) for v in tiles.split(","))
    if args.kn_gemm_magic is not None:
        qkernel.KN_GEMM_MAGIC = args.kn_gemm_magic
    if args.kn_gemm_words is not None:
        qkernel.KN_GEMM_WORDS = args.kn_gemm_words
    if args.kn_gemm_tiles:
        bn, *rest = (int(v) for v in args.kn_gemm_tiles.split(","))
        qkernel.KN_GEMM_TILES = (bn or None, *rest)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compile is None:
        args.compile = device == "cuda"
    if device == "cpu" and args.num_blocks is None:
        args.num_blocks = 64
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    bandwidth = next((bw for key, bw in HBM_SPEC.items() if key in name), None)
    env = {"preset": args.preset, "n_layers": args.n_layers, "device": name, "torch": torch.__version__,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "group_size": args.group_size,
           "compile_batch1": args.compile, "decode_steps": args.decode_steps, "gemv_tiles": args.gemv_tiles,
           "kn_tiles": qkernel.GEMV_TILES["int4kn"], "nf4kn_tiles": qkernel.GEMV_TILES["nf4kn"],
           "int8_tiles": qkernel.GEMV_TILES["int8"], "kn_gemm_magic": qkernel.KN_GEMM_MAGIC,
           "kn_gemm_words": qkernel.KN_GEMM_WORDS, "kn_gemm_tiles": qkernel.KN_GEMM_TILES}
    rows: list[dict] = []
    base: dict[str, float] = {}
    default_dequant = qkernel.DEQUANT_GEMM
    for variant in args.variants.split(","):
        row: dict = {"variant": variant}
        model = None
        try:
            model = build(args.preset, args.n_layers, device)
            kernels = kernel_options(variant, args.gemv_tiles)
            row["fast_path"] = quantize(model, variant, args.group_size, kernels)
            per_token = bytes_per_token(model, args.prompt_len + args.new_tokens / 2)
            row["gb_per_token"] = round(per_token / 1e9, 3)
            dq = variant.endswith("-dq")  # batched K-major INT4 rows: dequantize + cuBLAS; batch-1 is int4's
            qkernel.DEQUANT_GEMM = {"nf4kn", "int4kn"} if dq else default_dequant
            if not dq:
                row.update(batch1(model, args, kernels))
            if bandwidth and not dq:
                roof = bandwidth / per_token
                row.update(roofline_tokens_per_s=round(roof, 1),
                           of_roofline=round(row["decode_tokens_per_s"] / roof, 3))
            free()  # the batch-1 engine's KV cache and graph pool go before the next engine sizes its own
            if args.concurrent:
                row.update(throughput(model, args, kernels))
            row["kernels"] = qkernel.kernel_status()
            if device == "cuda":
                row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        except Exception as e:  # noqa: BLE001 -- record it, go on with the next variant
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            row["traceback"] = traceback.format_exc()[-2000:]
            row["kernels"] = qkernel.kernel_status()
        finally:
            del model
            if args.compile:
                torch._dynamo.reset()
            free()
        if variant == "bf16" and "error" not in row:
            base = {"decode": row["decode_tokens_per_s"], "throughput": row.get("output_tokens_per_s")}
        kind = variant.split("-")[0].split("+")[0]
        if base and "error" not in row and variant != "bf16":
            if "decode_tokens_per_s" in row:  # int4-dq rows: throughput only
                row["decode_speedup_vs_bf16"] = round(row["decode_tokens_per_s"] / base["decode"], 2)
                if kind in GOALS:
                    row["decode_goal"] = GOALS[kind]
                    row["decode_goal_met"] = row["decode_speedup_vs_bf16"] >= GOALS[kind]
            if base["throughput"] and row.get("output_tokens_per_s"):
                row["throughput_vs_bf16"] = round(row["output_tokens_per_s"] / base["throughput"], 2)
        row.update(env)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        if args.out:
            Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))

    print(f"\n{'variant':14} {'decode tok/s':>12} {'x bf16':>7} {'goal':>5} {'of roof':>8} {'GB/tok':>7} "
          f"{'tput tok/s':>10} {'x bf16':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:14} ERROR {r['error']}")
            continue
        print(f"{r['variant']:14} {r.get('decode_tokens_per_s', '-'):>12} {r.get('decode_speedup_vs_bf16', '-'):>7} "
              f"{r.get('decode_goal', '-'):>5} {r.get('of_roofline', '-'):>8} {r['gb_per_token']:>7} "
              f"{r.get('output_tokens_per_s', '-'):>10} {r.get('throughput_vs_bf16', '-'):>7}")


if __name__ == "__main__":
    main()
