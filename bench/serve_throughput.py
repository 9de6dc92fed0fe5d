"""Serving throughput and latency: the lmforge engine vs transformers `generate`, same checkpoint, same run.

Writes a Llama-3.2-1B-shaped random checkpoint with transformers (bf16), then measures, one JSON line each:

1. engine      — 256 requests, prompt and output lengths uniform in [100, 1024], random token ids, ignore EOS, all
                 submitted at once to `LLM.generate` (continuous batching, paged KV cache, CUDA-graph decode):
                 output tokens/s.
2. hf_static   — the same requests through transformers `generate` in static left-padded batches of 64 (each batch
                 runs to its longest output; only the tokens each request asked for count): output tokens/s.
3. batch1      — one request decoding alone (CUDA graphs, and with `--compile` fused kernels inside them): decode
                 tokens/s vs the HBM roofline (weight + KV bytes per token / bandwidth, spec and measured).
4. server      — `python -m lmforge.serve` in a subprocess, 64 concurrent streaming clients over loopback:
                 TTFT / TPOT / end-to-end percentiles and output tokens/s.

    python bench/serve_throughput.py [--out results.jsonl]          # the GPU run (defaults)
    python bench/serve_throughput.py --tiny                           # CPU smoke run, tiny sizes
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import decode_tokens_per_s, sync  # noqa: E402 (run as a script)

HBM_SPEC = {  # bytes/s by device-name substring (first match wins)
    "H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "GH200": 4.0e12,
    "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100": 1.555e12, "L40S": 0.864e12, "L4": 0.3e12,
    "A10G": 0.6e12, "RTX 4090": 1.008e12,
}
TINY = dict(n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, d_ff=256, vocab_size=1024)


def _free_memory():
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_checkpoint(preset: str, path: Path, dtype: torch.dtype, overrides: dict) -> None:
    import transformers

    from lmforge.models import preset_config
    from lmforge.models.hf import hf_config_dict

    cfg = preset_config(preset, **overrides)
    hf_cfg = transformers.AutoConfig.for_model(**hf_config_dict(cfg, dtype))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    model.save_pretrained(path)
    del model
    _free_memory()


def make_requests(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(10, vocab - 10) for _ in range(rng.randint(lo, hi))], rng.randint(lo, hi))
            for _ in range(n)]


def percentiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"p50": round(pick(0.5) * 1e3, 2), "p90": round(pick(0.9) * 1e3, 2), "p99": round(pick(0.99) * 1e3, 2),
            "mean": round(sum(xs) / len(xs) * 1e3, 2)}


# ------------------------------------------------------------------------------------------------ measurements


def bench_engine(model, requests, args, attention: str) -> dict:
    from lmforge.infer import LLM, EngineConfig, SamplingParams

    cfg = EngineConfig(max_model_len=2 * args.max_len, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                       gpu_memory_utilization=args.gpu_memory_utilization, decode_steps=args.decode_steps,
                       compile=False, attention=attention)
    t0 = time.perf_counter()
    llm = LLM(model, config=cfg)
    graphs = llm.engine.runner.capture(contexts=[256, 512, 1024, 2 * args.max_len])
    warm = llm.generate([requests[0][0][:16]] * 4, SamplingParams(temperature=0, max_new_tokens=8))
    assert len(warm) == 4
    warmup = time.perf_counter() - t0
    params = [SamplingParams(temperature=0, max_new_tokens=out, ignore_eos=True) for _, out in requests]
    sync()
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in requests], params)
    sync()
    seconds = time.perf_counter() - t0
    n_out = sum(len(o.token_ids) for o in outs)
    assert n_out == sum(out for _, out in requests), "every request must produce exactly its output length"
    n_in = sum(len(p) for p, _ in requests)
    stats = llm.engine.stats()
    del llm
    _free_memory()
    return {"output_tokens_per_s": round(n_out / seconds, 1), "total_tokens_per_s": round((n_in + n_out) / seconds, 1),
            "seconds": round(seconds, 2), "output_tokens": n_out, "prompt_tokens": n_in, "warmup_s": round(warmup, 1),
            "cuda_graphs": graphs, "num_blocks": stats["num_blocks"], "preemptions": stats["preemptions"],
            "steps": stats["steps"], "attention": attention}


def bench_hf(ckpt: Path, requests, args, dtype, device) -> dict:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None  # ignore EOS
    pad = 0

    def run(batch, hf=hf):
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=device)
        n = max(out for _, out in batch)
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                          pad_token_id=pad)
        return out.shape[1] - width

    run([(requests[0][0][:16], 8)] * 2)  # warm-up
    sync()
    t0 = time.perf_counter()
    batches = [requests[i:i + args.hf_batch_size] for i in range(0, len(requests), args.hf_batch_size)]
    steps = [run(b) for b in batches]
    sync()
    seconds = time.perf_counter() - t0
    useful = sum(out for _, out in requests)
    del hf
    _free_memory()
    return {"output_tokens_per_s": round(useful / seconds, 1), "seconds": round(seconds, 2), "output_tokens": useful,
            "generated_incl_padding": sum(s * len(b) for s, b in zip(steps, batches)),
            "batch_size": args.hf_batch_size}


def measured_bandwidth(device) -> float | None:
    """Device-to-device copy bandwidth (bytes read + written per second), best of a few 1 GiB copies."""
    if device.type != "cuda":
        return None
    x = torch.empty(2**29, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(20):  # best of many: single copies vary by ~10% on a shared host
        sync()
        t0 = time.perf_counter()
        y.copy_(x)
        sync()
        best = min(best, time.perf_counter() - t0)
    del x, y
    return 2 * 2**30 / best


def bench_batch1(model, args, compile: bool, fast_decode: bool = True) -> dict:
    from lmforge.infer import LLM, EngineConfig, SamplingParams
    from lmforge.infer.kernels import gemv
    from lmforge.infer.kernels.decode_fusion import unpack_for_decode
    from lmforge.infer.kernels.options import KernelOptions

    if not fast_decode:
        unpack_for_decode(model, keep_gemv=False)  # an earlier engine packed the model

    prompt = make_requests(1, args.batch1_prompt, args.batch1_prompt, model.cfg.vocab_size, seed=1)[0][0]
    n = args.batch1_tokens
    cfg = EngineConfig(max_model_len=args.batch1_prompt + n + args.block_size, max_num_seqs=1,
                       block_size=args.block_size, decode_steps=args.batch1_decode_steps, compile=compile,
                       fast_decode=fast_decode, gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False,
                       kernels=KernelOptions(pdl=not args.no_pdl))
    llm = LLM(model, config=cfg)
    engine = llm.engine
    attention = "kernel" if engine.runner.paged_kernel else "gather"
    params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([prompt], params)  # warm-up: captures (and compiles) the decode graph
    warmup = time.perf_counter() - t0
    best = None
    for _ in range(args.repeats):
        rate = decode_tokens_per_s(engine, prompt, params)  # decode only: after the 1st token
        best = rate if best is None or rate > best else best
    cfg_m = model.cfg
    # bytes a decode step must read: every weight once (an untied input embedding only one row; a tied one is read
    # whole by the LM head) plus the K/V of the context, on average prompt + n/2 tokens
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights appear once
    if not cfg_m.tie_embeddings:
        weight_bytes -= model.embed.weight.numel() * model.embed.weight.element_size()
    kv_token = 2 * cfg_m.n_layers * cfg_m.kv_heads * cfg_m.dim_per_head * model.embed.weight.element_size()
    bytes_per_token = int(weight_bytes + kv_token * (args.batch1_prompt + n / 2))
    device = model.embed.weight.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    spec = next((bw for key, bw in HBM_SPEC.items() if key in name), None)
    measured = measured_bandwidth(device)
    if args.batch1_profile:
        profile_decode_graph(engine, Path(args.batch1_profile) / f"batch1_{'fast' if fast_decode else 'plain'}"
                             f"{'_compile' if compile else ''}.txt")
    row = {"decode_tokens_per_s": round(best, 1), "new_tokens": n, "prompt_len": args.batch1_prompt,
           "compile": compile, "fast_decode": fast_decode, "warmup_s": round(warmup, 1),
           "bytes_per_token": bytes_per_token, "attention": attention, "pdl": gemv.use_pdl(device, cfg.kernels.pdl)}
    if spec:
        row.update(roofline_spec_tokens_per_s=round(spec / bytes_per_token, 1),
                   pct_of_spec_roofline=round(100 * best * bytes_per_token / spec, 1))
    if measured:
        row.update(measured_bandwidth_gbs=round(measured / 1e9, 1),
                   roofline_measured_tokens_per_s=round(measured / bytes_per_token, 1),
                   pct_of_measured_roofline=round(100 * best * bytes_per_token / measured, 1))
    del llm, engine
    _free_memory()
    return row


def profile_decode_graph(engine, path: Path, replays: int = 20) -> None:
    """Kernel time of the captured batch-1 decode step: a table by total time and one replay's kernels in order."""
    from torch.profiler import ProfilerActivity, profile

    graph = next(iter(engine.runner.graphs.values()))
    step = graph.inputs["step"]  # a greedy graph's step counter: reset so its writes stay in bounds
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            step.zero_()
            graph.replay()
        sync()
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA" and "fill" not in e.name.lower()),
                     key=lambda e: e.time_range.start)
    per = len(kernels) // replays
    one = kernels[-per:]
    busy = sum(e.time_range.elapsed_us() for e in one)
    span = one[-1].time_range.end - one[0].time_range.start
    lines = [f"kernels per replay {per}, busy {busy:.1f} us, span {span:.1f} us", ""]
    lines += [f"{e.time_range.elapsed_us():9.2f}  {e.name[:110]}" for e in one]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30) + "\n" + "\n".join(lines))


# ------------------------------------------------------------------------------------------------ server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _client_load(url: str, requests, clients: int) -> tuple[list[dict], float]:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    records: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as http:
        async def worker():
            while not queue.empty():
                prompt, out = queue.get_nowait()
                body = {"model": "bench", "prompt": prompt, "max_tokens": out, "temperature": 0, "stream": True,
                        "ignore_eos": True, "return_token_ids": True}
                t0 = time.perf_counter()
                first = last = None
                n = 0
                async with http.stream("POST", url + "/v1/completions", json=body) as resp:
                    resp.raise_for_status()
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        got = sum(len(c.get("token_ids") or []) for c in json.loads(line[6:])["choices"])
                        if got:
                            now = time.perf_counter()
                            first = first or now
                            last = now
                            n += got
                if n != out:
                    raise RuntimeError(f"asked for {out} tokens, got {n}")
                records.append({"ttft": first - t0, "tpot": (last - first) / max(1, n - 1), "e2e": last - t0,
                                "tokens": n})

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return records, time.perf_counter() - t0


def bench_server(ckpt: Path, requests, args, device) -> dict:
    import httpx

    port = _free_port()
    util = max(0.1, args.gpu_memory_utilization - 0.05)  # this process keeps its CUDA context
    cmd = [sys.executable, "-m", "lmforge.serve", str(ckpt), "--port", str(port), "--served-model-name", "bench",
           "--device", str(device), "--dtype", args.dtype, "--log-level", "warning",
           f"engine.max_model_len={2 * args.max_len}", f"engine.max_num_seqs={args.max_num_seqs}",
           f"engine.max_num_batched_tokens={args.max_num_batched_tokens}", f"engine.block_size={args.block_size}",
           f"engine.decode_steps={args.decode_steps}", f"engine.gpu_memory_utilization={util}"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not come up in 10 minutes")
            time.sleep(0.5)
        asyncio.run(_client_load(url, requests[:min(len(requests), args.clients)], args.clients))  # warm-up
        records, seconds = asyncio.run(_client_load(url, requests, args.clients))
    finally:
        proc.terminate()
        proc.wait(60)
    n = sum(r["tokens"] for r in records)
    return {"clients": args.clients, "requests": len(records), "output_tokens_per_s": round(n / seconds, 1),
            "seconds": round(seconds, 2), "ttft_ms": percentiles([r["ttft"] for r in records]),
            "tpot_ms": percentiles([r["tpot"] for r in records]), "e2e_ms": percentiles([r["e2e"] for r in records])}


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--n-layers", type=int, default=None, help="override the depth")
    ap.add_argument("--tiny", action="store_true", help="tiny model and sizes for a CPU smoke run")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--batch1-prompt", type=int, default=128)
    ap.add_argument("--batch1-tokens", type=int, default=512)
    ap.add_argument("--batch1-decode-steps", type=int, default=16)
    ap.add_argument("--batch1-fast-decode", default="on", choices=["on", "off", "both"],
                    help="packed projections + Triton GEMV in the batch-1 runs (engine.fast_decode)")
    ap.add_argument("--batch1-profile", default=None, help="directory for kernel tables of the batch-1 decode graph")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled batch-1 variant")
    ap.add_argument("--no-pdl", action="store_true", help="batch 1 without programmatic dependent launch")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--server-requests", type=int, default=256)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: engine,hf,batch1,server")
    ap.add_argument("--attention", default="auto", choices=["auto", "both", "kernel", "gather"],
                    help="engine decode attention: auto = the Triton kernel where it runs, else gather + SDPA")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.tiny:
        args.dtype = "float32"
        for k, v in dict(num_requests=8, min_len=8, max_len=32, hf_batch_size=4, max_num_seqs=8,
                         max_num_batched_tokens=64, batch1_prompt=8, batch1_tokens=24, repeats=1, clients=4,
                         server_requests=8, no_compile=True).items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    skip = set(filter(None, args.skip.split(",")))
    if args.tiny:  # tiny matmuls: one thread is as fast and immune to other jobs on the cores
        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")

    import transformers

    from lmforge.models import load_hf

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    overrides = dict(TINY) if args.tiny else {}
    if args.n_layers:
        overrides["n_layers"] = args.n_layers
    ckpt = Path(tempfile.mkdtemp()) / args.preset
    write_checkpoint(args.preset, ckpt, dtype, overrides)
    model = load_hf(ckpt, dtype=dtype, device=device, progress=False)
    vocab = model.cfg.vocab_size
    requests = make_requests(args.num_requests, args.min_len, args.max_len, vocab, args.seed)
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "preset": args.preset, "dtype": args.dtype,
           "n_layers": model.cfg.n_layers, "requests": len(requests), "len_range": [args.min_len, args.max_len]}
    rows = []

    def record(name: str, row: dict) -> None:
        rows.append({"bench": name, **row, **env})
        print(json.dumps(rows[-1]), flush=True)

    if "engine" not in skip:
        from lmforge.infer.kernels.paged_attention import kernel_available
        from lmforge.infer.engine.paged_cache import model_calls_cache_attend

        kernel = kernel_available(device) and model_calls_cache_attend(model)  # needs the model hook (docs/serving.md)
        modes = {"auto": ["kernel"] if kernel else ["gather"], "both": (["kernel"] if kernel else []) + ["gather"],
                 "kernel": ["kernel"], "gather": ["gather"]}[args.attention]
        for attention in modes:
            record("engine" if attention == "gather" and not kernel else f"engine[{attention}]",
                   bench_engine(model, requests, args, attention))
    if "batch1" not in skip:
        variants = {"on": [True], "off": [False], "both": [False, True]}[args.batch1_fast_decode]
        for fast in variants:  # plain first: fast_decode packs the model in place
            suffix = "" if args.batch1_fast_decode == "on" else ("[fast]" if fast else "[plain]")
            record("batch1" + suffix, bench_batch1(model, args, compile=False, fast_decode=fast))
            if not args.no_compile:
                record("batch1+compile" + suffix, bench_batch1(model, args, compile=True, fast_decode=fast))
    del model
    _free_memory()
    if "hf" not in skip:
        record("hf_static", bench_hf(ckpt, requests, args, dtype, device))
    if "server" not in skip:
        server_requests = make_requests(args.server_requests, args.min_len, args.max_len, vocab, args.seed + 1)
        record("server", bench_server(ckpt, server_requests, args, device))

    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    by = {r["bench"]: r for r in rows}
    engines = [r for r in rows if r["bench"].startswith("engine")]
    if engines:
        by["engine"] = max(engines, key=lambda r: r["output_tokens_per_s"])
    print(f"\n{'measurement':34} {'value':>14}  note")
    for e in engines:
        print(f"{e['bench'] + ' output tokens/s':34} {e['output_tokens_per_s']:>14}  {e['seconds']} s, "
              f"{e['output_tokens']} tokens, {e['preemptions']} preemptions, attention={e['attention']}")
    if "hf_static" in by:
        h = by["hf_static"]
        print(f"{'HF generate (batches of %d) tok/s' % h['batch_size']:34} {h['output_tokens_per_s']:>14}  "
              f"{h['seconds']} s")
        if "engine" in by:
            print(f"{'engine / HF':34} {round(by['engine']['output_tokens_per_s'] / h['output_tokens_per_s'], 2):>14}"
                  "  goal >= 10")
    for b in rows:
        name = b["bench"]
        if name.startswith("batch1"):
            pct = b.get("pct_of_spec_roofline", b.get("pct_of_measured_roofline", "n/a"))
            print(f"{name + ' decode tokens/s':34} {b['decode_tokens_per_s']:>14}  {pct}% of roofline "
                  f"({b.get('roofline_spec_tokens_per_s', 'n/a')} tok/s spec), goal >= 80%, attention={b['attention']}")
    if "server" in by:
        s = by["server"]
        print(f"{'server output tokens/s':34} {s['output_tokens_per_s']:>14}  {s['clients']} clients")
        print(f"{'server TTFT p50/p90/p99 ms':34} {'':>14}  {s['ttft_ms']['p50']} / {s['ttft_ms']['p90']} / "
              f"{s['ttft_ms']['p99']}")
        print(f"{'server TPOT p50/p90/p99 ms':34} {'':>14}  {s['tpot_ms']['p50']} / {s['tpot_ms']['p90']} / "
              f"{s['tpot_ms']['p99']}")


if __name__ == "__main__":
    main()
