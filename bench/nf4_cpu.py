"""NF4 matmuls on the CPU: dense weights vs NF4Linear's table dequantization vs per-nibble float32 dequantization.

One input row (decode), one thread, CPU milliseconds (best of --repeats, so a busy machine distorts it less):
`F.linear` on the dense weight, `NF4Linear.forward` (byte -> level-pair table in the compute dtype, what lmforge
runs off CUDA), and `F.linear(x, NF4Tensor.dequantize())` (index the float32 levels per nibble, then cast).

    python bench/nf4_cpu.py [--out nf4_cpu.jsonl]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.quant import NF4Linear


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return round(best * 1e3, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1536x576,576x1536,4096x4096", help="out x in of each weight")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        N, K = map(int, shape.split("x"))
        lin = torch.nn.Linear(K, N, bias=False)
        layer = NF4Linear.from_linear(lin)
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(1, K, dtype=dtype)
            dense = lin.weight.detach().to(dtype)
            row = {"shape": shape, "dtype": str(dtype).removeprefix("torch."),
                   "dense_ms": best_ms(lambda: F.linear(x, dense), args.repeats),
                   "nf4_table_ms": best_ms(lambda: layer(x), args.repeats),
                   "nf4_per_nibble_ms": best_ms(lambda: F.linear(x, layer.nf4.dequantize(dtype)), args.repeats),
                   "torch": torch.__version__}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
