"""One-row matmuls (batch-1 decode) on the GPU: cuBLAS `F.linear` vs lmforge's Triton GEMV, per weight shape.

Each variant runs 100 back-to-back calls inside one CUDA graph (no launch overhead in the figure, as in the decode
graph), best of 5 replays, cycling through enough copies of the weight (>= 512 MiB) that none is read from L2 (a
decode step reads ~2.5 GB of weights once; a 12 MB matrix reread back to back would sit in the 50 MB L2); prints one JSON line per shape with microseconds per call and achieved GB/s (weight bytes
read / time), plus the device copy bandwidth for scale.

    python bench/gemv.py [--out gemv.jsonl]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from lmforge.infer.kernels import gemv

SHAPES = {  # (out, in) of the Llama-3.2-1B and Llama-3.1-8B projections; packed = q/k/v and gate/up in one matrix
    "1b.q": (2048, 2048), "1b.kv": (512, 2048), "1b.qkv_packed": (3072, 2048), "1b.o": (2048, 2048),
    "1b.gate": (8192, 2048), "1b.gate_up_packed": (16384, 2048), "1b.down": (2048, 8192), "1b.head": (128256, 2048),
    "8b.qkv_packed": (6144, 4096), "8b.o": (4096, 4096), "8b.gate_up_packed": (28672, 4096), "8b.down": (4096, 14336),
}


def time_graph(fn, calls: int = 100, repeats: int = 5) -> float:
    """Seconds per call of `fn()`, replayed from a CUDA graph of `calls` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # autotune / warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def cycling(fn, weights: list[torch.Tensor]):
    """A no-argument call of fn(w) that takes the next weight each time (captured into the graph in turn)."""
    turn = iter(range(10**9))
    return lambda: fn(weights[next(turn) % len(weights)])


def copy_bandwidth() -> float:
    x = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    t = time_graph(lambda: y.copy_(x), calls=5)
    return 2 * x.numel() * 2 / t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    bw = copy_bandwidth()
    rows = []
    for name, (N, K) in SHAPES.items():
        copies = max(1, -(-2**29 // (N * K * 2)))
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, 1, K, device="cuda", dtype=torch.bfloat16)
        w = ws[0]
        err = (gemv.gemv(x, w, None).float() - F.linear(x.float(), w.float())).abs().max().item()
        t_blas = time_graph(cycling(lambda w: F.linear(x, w), ws))
        t_gemv = time_graph(cycling(lambda w: gemv.gemv(x, w, None), ws))
        nbytes = N * K * 2
        row = {"shape": name, "out": N, "in": K, "cublas_us": round(t_blas * 1e6, 2), "gemv_us": round(t_gemv * 1e6, 2),
               "cublas_gbs": round(nbytes / t_blas / 1e9, 1), "gemv_gbs": round(nbytes / t_gemv / 1e9, 1),
               "speedup": round(t_blas / t_gemv, 3), "max_abs_err_vs_fp32": round(err, 4),
               "copy_bandwidth_gbs": round(bw / 1e9, 1), "device": torch.cuda.get_device_name(),
               "torch": torch.__version__}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del w, ws
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
