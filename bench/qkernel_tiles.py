"""Tile sweep for lmforge's weight-only INT8 / INT4 / NF4 Triton matmuls on a Llama-3-8B's linear shapes.

For each format and shape: every GEMV tile (rows per program, input columns per step, warps) at one input row, and
every GEMM tile (BLOCK_M, BLOCK_N) at 64 rows (4-bit GEMV tiles also name the inner-loop variant, see
`qkernel_triton.q4_gemv_kernel`'s MAGIC / LATE), timed inside a CUDA graph (as decode runs them), checked against
dequantize-then-matmul, beside bf16 `F.linear` from the same call. One JSON line per (format, shape, path, tiles)
with GB/s of weight traffic and the share of the HBM roofline; the last lines name the fastest tiles per shape.
"default" marks the tiles a layer runs with no forced tiles (`QuantKernels()`); a GEMV's winner is tried in the
engine with `engine.kernels.quant_gemv_tiles=[ROWS,COLUMNS,WARPS]` (bench/quant_decode.py --gemv-tiles).

    python bench/qkernel_tiles.py --out qkernel_tiles.jsonl
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from lmforge.quant import QuantKernels, qkernel
from lmforge.quant.nf4 import quantize_nf4

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
GEMV_GRID = [(bn, cols, w) for bn, cols, w in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048, 4096),
                                                                 (2, 4, 8)) if bn * cols <= 16384]
QUICK_GEMV_GRID = [(bn, cols, w) for bn, cols, w in itertools.product((2, 4, 8, 16), (1024, 2048, 4096), (4, 8))
                   if bn * cols <= 16384]
# GEMV inner loops, appended to the tiles: (MAGIC nibble conversion, LATE reduction); NF4 looks levels up
VARIANTS = {"int4": [(0, 0), (1, 0), (0, 1), (1, 1)], "nf4": [(0, 0), (0, 1)], "int8": [(0,), (1,), (2,)]}
GEMM_GRID = list(itertools.product((16, 32, 64), (32, 64, 128, 256)))
# K-major 4-bit kernels ("int4kn", "nf4kn": the layout prepare_fast_path repacks into): GEMV (columns per program,
# input columns per step, warps, steps per program; 0 = all of K, else K split over programs whose fp32 partial sums
# one more kernel adds, or with atomic=1 the programs add into a zeroed buffer; magic=1: INT4 nibbles to float by
# the exponent trick, NF4 levels a byte at a time from a 256-entry pair table),
# GEMM (BLOCK_M, BLOCK_N, BLOCK_K, warps, K splits)
KN_GEMV_GRID = [(bn, bk, w, st, at, mg) for bn, bk, w, st, at, mg in
                itertools.product((64, 128, 256), (64, 128), (2, 4), (1, 4, 0), (0, 1), (0, 1))
                if bn * bk <= 256 * 32 * w and not (st == 0 and at) and not (at and mg)]  # + atomic, magic
# --quick: the region the full sweeps found on an H100 (short K slices, many programs, as gemlite's GEMV): INT4 and
# NF4 in registers (magic=2: shifted nibble pairs / byte permutes), their sums atomic into a memset buffer (1) or into
# a persistent one the last split writes out (2), beside magic=1 and the pair table for reference
KN_QUICK_GEMV_GRID = {
    "int4kn": [(bn, bk, w, st, at, 2, 0) for (bn, bk, w, st), at in
               itertools.product(((128, 32, 1, 2), (128, 64, 1, 1), (128, 32, 1, 1), (256, 64, 2, 1), (512, 64, 4, 1),
                                  (256, 32, 2, 1)), (1, 2))] + [(128, 64, 1, 1, 1, 1, 0), (256, 32, 2, 1, 1, 1, 0)],
    "nf4kn": [(bn, bk, w, st, at, 2, 0) for (bn, bk, w, st), at in
              itertools.product(((256, 64, 2, 1), (512, 64, 4, 1), (256, 32, 2, 1), (128, 64, 1, 1)), (1, 2))]
    + [(64, 32, 2, 1, 1, 1, 0)]}  # the pair table's best
KN_DEQUANT_GRID = [(8, 128, 4), (4, 256, 4), (16, 64, 4), (8, 256, 8)]  # code words, columns, warps
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, K splits (-1: by shape), magic (INT4: 1 exponent trick, 2 16-bit pairs),
# words (each code word loaded once))
KN_GEMM_GRID = list(itertools.product((16, 64), (64, 128), (128,), (4,), (-1, 4), (0, 1), (0, 1)))
# --quick: words=1 (the default), wide column tiles (at 64 rows a narrow tile re-reads the whole input from L2 for
# few weights: 8x the weight bytes at 32 columns), warps, conversions against 16-bit pairs (magic 0 / 2) and pipeline
# stages (8th field)
KN_QUICK_GEMM_GRID = list(itertools.product((64,), (128, 256), (128,), (4, 8), (-1,), (0, 2), (1,), (2, 3)))


def timed(fn, reps: int = 50) -> float:
    """Seconds per call, replaying `reps` calls captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3 / reps)
    return best


def weights(fmt: str, N: int, K: int, dev):
    w = torch.randn(N, K, device=dev) * 0.02
    if fmt == "int8":
        s = w.abs().amax(1) / 127
        q = (w / s[:, None]).round().clamp(-127, 127).to(torch.int8)
        s = s.to(torch.bfloat16)
        return (q, s), q.numel() + s.numel() * 2, lambda: q.float() * s.float()[:, None]
    if fmt == "int4":
        G = 128
        wg = w.view(N, K // G, G)
        lo, hi = wg.amin(-1), wg.amax(-1)
        s = ((hi - lo) / 15).clamp(min=1e-8)
        z = (-lo / s).round().clamp(0, 15)
        q = (wg / s[..., None] + z[..., None]).round().clamp(0, 15).to(torch.uint8).view(N, K)
        packed = (q[:, 0::2] << 4) | q[:, 1::2]
        s, z = s.to(torch.bfloat16), z.to(torch.uint8)
        return (packed, s, z), packed.numel() + s.numel() * 2 + z.numel(), None
    if fmt in ("int4kn", "int4-tinygemm"):
        (packed, s, z), nbytes, _ = weights("int4", N, K, dev)
        codes = torch.stack([packed >> 4, packed & 15], -1).view(N, K)
        if fmt == "int4-tinygemm":
            zero_f = (8 - z.float()) * s.float()
            sz = torch.stack([s.float().T, zero_f.T], -1).to(torch.bfloat16).contiguous()
            return (torch.ops.aten._convert_weight_to_int4pack(packed, 8), sz, (packed, s, z)), nbytes, None
        return (qkernel.pack_kn(codes), s.T.contiguous(), z.T.contiguous(), (packed, s, z)), nbytes, None
    t = quantize_nf4(w, 64, True, 256)
    if fmt == "nf4kn":
        from lmforge.quant.nf4 import unpack_nibbles

        a = t.absmax.view(N, K // 64).T.contiguous()  # int8, double-quantized as NF4Linear stores it
        codes = unpack_nibbles(t.codes).view(-1)[: N * K].view(N, K)
        return (qkernel.pack_kn(codes), a, None, t), codes.numel() // 2 + a.numel() + t.absmax_scale.numel() * 4, None
    nbytes = t.codes.numel() + t.absmax.numel() + t.absmax_scale.numel() * 4
    return (t,), nbytes, None


def launch(fmt: str, parts, x, N: int, path: str, tiles):
    if fmt.endswith("kn"):
        if fmt == "nf4kn":
            t = parts[3]
            return qkernel._launch_q4kn(x, *parts[:3], N, 64, True, path, tiles, t.absmax_scale, t.absmax_mean, 256)
        return qkernel._launch_q4kn(x, *parts[:3], N, 128, False, path, tiles)
    if fmt == "int4-tinygemm":
        return torch.ops.aten._weight_int4pack_mm(x, parts[0], 128, parts[1])
    if fmt == "int8":
        return qkernel._launch_int8(x, *parts, path, tiles)
    if fmt == "int4":
        qw, s, z = parts
        return qkernel._launch_q4(x, qw, s, z, None, None, N, 128, False, 0, path, tiles)
    (t,) = parts
    return qkernel._launch_q4(x, t.codes, t.absmax, None, t.absmax_scale, t.absmax_mean, N, 64, True, 256, path,
                              tiles)


def reference(fmt: str, parts, x, N: int):
    if fmt in ("int4kn", "nf4kn"):
        return reference(fmt[:-2], parts[3:] if fmt == "nf4kn" else parts[3], x, N)
    if fmt == "int4-tinygemm":
        return reference("int4", parts[2], x, N)
    if fmt == "int8":
        q, s = parts
        return qkernel.int8_reference(x, q, s)
    if fmt == "int4":
        return qkernel.int4_reference(x, *parts)
    (t,) = parts
    return F.linear(x, t.dequantize(x.dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="int4,nf4,int8")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--gemm-rows", type=int, default=64)
    ap.add_argument("--paths", default="gemv,gemm", help="gemv (one row) and/or gemm (--gemm-rows rows)")
    ap.add_argument("--quick", action="store_true",
                    help="a smaller GEMV tile grid (every inner-loop variant; K-major: KN_QUICK_GEMV_GRID)")
    ap.add_argument("--hbm-gbps", type=float, default=None, help="roofline (default: 3350 on H100, 4800 on H200)")
    ap.add_argument("--out", default="qkernel_tiles.jsonl")
    args = ap.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    hbm = args.hbm_gbps or (4800.0 if "H200" in name else 3350.0)
    rows, best = [], {}
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        N, K = SHAPES[shape]
        w16 = (torch.randn(N, K, device=dev) * 0.02).to(torch.bfloat16)
        for M, path in ((1, "gemv"), (args.gemm_rows, "gemm")):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            t = timed(lambda: F.linear(x, w16))
            rows.append({"format": "bf16", "shape": shape, "N": N, "K": K, "M": M, "path": "cublas", "us": t * 1e6,
                         "gbps": N * K * 2 / t / 1e9, "roofline": N * K * 2 / t / 1e9 / hbm})
            print(json.dumps(rows[-1]), flush=True)
        del w16
        for fmt in args.formats.split(","):
            parts, nbytes, _ = weights(fmt, N, K, dev)
            if fmt.endswith("kn"):
                gemv = KN_QUICK_GEMV_GRID[fmt] if args.quick else KN_GEMV_GRID
                gemm = [(*t, "dequant") for t in KN_DEQUANT_GRID]
                gemm += [t for t in KN_QUICK_GEMM_GRID if t[5] == 2] if fmt == "nf4kn" else \
                    KN_QUICK_GEMM_GRID if args.quick else KN_GEMM_GRID  # NF4: its level pairs against dequantizing
            elif fmt == "int4-tinygemm":
                gemv, gemm = [()], [()]
            else:
                gemv = [(*t, *v) for t in (QUICK_GEMV_GRID if args.quick else GEMV_GRID) for v in VARIANTS[fmt]]
                gemm = GEMM_GRID
            for M, path, grid in ((1, "gemv", gemv), (args.gemm_rows, "gemm", gemm)):
                if path not in args.paths.split(","):
                    continue
                x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                want = reference(fmt, parts, x, N).float()
                default = tuple(qkernel._tiles(fmt, path, M, N, dev, QuantKernels().gemv_tiles)) \
                    if fmt in VARIANTS else None
                if path == "gemv" and default:
                    default = (*default, 0, 0)[:4 if fmt == "int8" else 5]
                for tiles in grid:
                    kind = tiles[-1] if tiles and tiles[-1] == "dequant" else path  # K-major: the dequantizing pass
                    tiles = tiles[:-1] if kind == "dequant" else tiles
                    row = {"format": fmt, "shape": shape, "N": N, "K": K, "M": M, "path": kind,
                           "tiles": list(tiles), "default": tuple(tiles) == tuple(default or ())}
                    try:
                        got = launch(fmt, parts, x, N, kind, tiles).float()
                        err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
                        if not err < 2e-2:
                            raise ValueError(f"relative error {err:.3g}")
                        t = timed(lambda: launch(fmt, parts, x, N, kind, tiles))
                        row.update(us=t * 1e6, gbps=nbytes / t / 1e9, roofline=nbytes / t / 1e9 / hbm)
                    except Exception as e:  # noqa: BLE001 -- a tile that does not compile or fit is a result too
                        row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    key = (fmt, shape, kind)
                    if "us" in row and (key not in best or row["us"] < best[key]["us"]):
                        best[key] = row
            del parts
    summary = []
    for (fmt, shape, path), row in sorted(best.items()):
        d = next((r for r in rows if r["format"] == fmt and r["shape"] == shape and r["path"] == path
                  and r.get("default") and "us" in r), None)
        summary.append({"best": True, "format": fmt, "shape": shape, "path": path, "tiles": row["tiles"],
                        "us": row["us"], "roofline": row["roofline"], "default_us": d and d["us"],
                        "default_roofline": d and d["roofline"], "device": name, "torch": torch.__version__})
        print(json.dumps(summary[-1]), flush=True)
    with open(args.out, "w") as f:
        for r in rows + summary:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
