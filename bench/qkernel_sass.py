"""Instruction mix of lmforge's quantized GEMV kernels, compiled for a GPU without one: Triton builds each tile
variant for the target (default sm_90, an H100), the cuobjdump bundled with Triton disassembles it, and the machine
instructions are counted per weight. A GPU-free triage for kernel work while GPU time is scarce: a one-row matmul
that is not memory-bound is bound by the instructions it issues per weight (an H100 SM issues 128 thread-instructions
a clock and needs about 0.4 weights per thread-instruction at the 3.35 TB/s roofline for 4-bit codes); the count of
quarter-rate int-to-float conversions (I2F*) and of table loads (LDG without the evict-first hint) names the usual
bottleneck. Static counts per weight of one K step: exact where a program runs one step, otherwise the loop body
plus a prologue and epilogue that the run spreads over more steps (an overestimate).
Figures here are no substitute for `bench/qkernel_tiles.py` on the GPU.

    python bench/qkernel_sass.py                       # the default and the in-register variants, JSON lines
    python bench/qkernel_sass.py --format int4kn --tiles 256,32,2,1,1,1,0
    python bench/qkernel_sass.py --gemm                # the INT4 GEMM's K loop at 64 rows (batched decode)
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lmforge.quant import qkernel, qkernel_triton as kt

# format -> ((name, tiles), ...) compared by default: the plain loops and the in-register variants ("default" marks
# the tiles a layer runs with, `qkernel.GEMV_TILES`)
VARIANTS = {
    "int4kn": [("plain", (256, 32, 2, 1, 1, 0, 0)), ("magic", (256, 32, 2, 1, 1, 1, 0)),
               ("magic, 4 steps", (256, 128, 2, 4, 1, 1, 0)), ("shifted pairs", (256, 32, 2, 1, 1, 2, 0)),
               ("shifted pairs, 2 steps", (128, 32, 1, 2, 1, 2, 0)),
               ("shifted pairs, 4 steps", (256, 128, 2, 4, 1, 2, 0))],
    "nf4kn": [("pair table", (64, 32, 2, 1, 1, 1, 0)), ("pair table", (256, 32, 2, 1, 1, 1, 0)),
              ("byte permutes", (256, 32, 2, 1, 1, 2, 0)), ("byte permutes", (256, 64, 2, 1, 1, 2, 0))],
    "int8": [("plain", (2, 2048, 4, 0)), ("plain", (8, 1024, 4, 0)), ("magic", (8, 1024, 4, 1)),
             ("shifted bytes", (8, 1024, 4, 2))],
}
OP = re.compile(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.M)
INT_PIPE = ("LOP3", "SHF", "PRMT", "SGXT", "IADD3", "LEA", "MOV", "ISETP", "BFE", "SEL")


def _bin(tool: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


FUSE_ARGS = {"NW": "*bf16", "B": "*bf16", "R": "*bf16", "eps": "fp32", "norm_offset": "fp32"}  # (unfused here)
FUSE_OFF = {"SILU": False, "NORM": False, "BIAS": False, "RES": False, "NORM_BLOCK": 1024, "PDL": False}


def compile_gemv(fmt: str, tiles: tuple, arch: int):
    """The GEMV of `fmt` with `tiles` as `qkernel` launches it, compiled for sm_<arch> (ints divisible by 16, as the
    Llama shapes specialize at run time)."""
    if fmt == "int8":
        block_n, cols, warps, magic = (*tiles, 0)[:4]
        fn, warps_ = kt.int8_gemv_kernel, warps
        sig = {"X": "*bf16", "QW": "*i32" if magic else "*i8", "S": "*bf16", "Y": "*bf16", "N": "i32", "K": "i32",
               "stride_xm": "i32", "stride_ym": "i32", **FUSE_ARGS}
        const = {"BLOCK_N": block_n, "BLOCK_K": cols, "MAGIC": int(magic), **FUSE_OFF}
    else:
        block_n, block_k, warps_, steps, atomic, magic, flat = (*tiles, 0, 0, 0)[:7]
        nf4 = fmt == "nf4kn"
        fn = kt.q4kn_gemv_kernel
        sig = {"X": "*bf16", "QW": "*i32", "S": "*i8" if nf4 else "*bf16", "Z": "*u8", "SS": "*fp32", "Mean": "*fp32",
               "Lut": "*i64" if nf4 and magic == 1 else "*fp32", "Y": "*fp32" if atomic else "*bf16", "Cnt": "*i32",
               "Out": "*bf16", "N": "i32",
               "K": "i32", "stride_xm": "i32", "stride_ym": "i32", **FUSE_ARGS}
        const = {"GROUP": 64 if nf4 else 128, "NF4": nf4, "BLOCK_N": block_n, "BLOCK_K": block_k,
                 "STEPS": max(steps, 1), "ATOMIC": int(atomic), "DQ": nf4, "DQ_BLOCK": 256, "MAGIC": int(magic),
                 "FLAT": bool(flat), **FUSE_OFF}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items() if t != "fp32"}
    sig.update({k: "constexpr" for k in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps_, "num_stages": 1})


def mix(fmt: str, tiles: tuple, arch: int) -> dict:
    """Instructions per weight of one program (by opcode), registers and spill stack of `fmt`'s GEMV with `tiles`."""
    kernel = compile_gemv(fmt, tiles, arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    ops = collections.Counter(op.split(".")[0] for op in OP.findall(sass))
    warps = tiles[2]
    # one K step of a program: the disassembly holds the loop body once (plus the prologue and epilogue)
    weights = tiles[0] * (tiles[1] if fmt == "int8" else min(tiles[1], 64 if fmt == "nf4kn" else 128))
    per = weights / (32 * warps)  # weights per thread
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    return {"format": fmt, "tiles": list(tiles), "arch": f"sm_{arch}",
            "instructions_per_weight": round(sum(ops.values()) / per, 2),
            "int_pipe_per_weight": round(sum(n for o, n in ops.items() if o.startswith(INT_PIPE)) / per, 2),
            "conversions_per_weight": round(sum(n for o, n in ops.items() if o.startswith(("I2F", "F2F"))) / per, 2),
            "registers": int(regs.group(1)) if regs else None, "spill_stack": int(stack.group(1)) if stack else None,
            "top": {o: round(n / per, 2) for o, n in ops.most_common(8)}}


# the K-major INT4 GEMM at 64 rows (batched decode): (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, magic)
GEMM_VARIANTS = [("conversions", (64, 128, 128, 4, 2, 0)), ("exponent trick", (64, 128, 128, 4, 2, 1)),
                 ("16-bit pairs", (64, 128, 128, 4, 2, 2)), ("16-bit pairs", (64, 256, 128, 8, 3, 2))]
LINE = re.compile(r"^\s+/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", re.M)


def compile_gemm(tiles: tuple, arch: int):
    """The K-major INT4 GEMM with `tiles` (code words loaded once, as `qkernel` runs it), bf16 input."""
    block_m, block_n, block_k, warps, stages, magic = tiles
    fn = kt.q4kn_gemm_kernel
    sig = {"X": "*bf16", "QW": "*i32", "S": "*bf16", "Z": "*u8", "SS": "*fp32", "Mean": "*fp32", "Lut": "*fp32",
           "Y": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    const = {"GROUP": 128, "NF4": False, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "DQ": 0,
             "DQ_BLOCK": 256, "K_SPLIT": 0, "MAGIC": magic, "WORDS": True, "ASM": True}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items() if t != "fp32"}
    sig.update({k: "constexpr" for k in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def gemm_mix(tiles: tuple, arch: int) -> dict:
    """Machine instructions per weight in the GEMM's K loop (the longest backward branch's body: one BLOCK_K step of
    one thread), by opcode, and the kernel's registers."""
    kernel = compile_gemm(tiles, arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    ins = [(int(a, 16), op.split(".")[0], rest) for a, op, rest in LINE.findall(sass)]
    loops = [(int(m.group(1), 16), a) for a, op, rest in ins if op == "BRA"
             for m in [re.search(r"0x([0-9a-f]+)", rest)] if m and int(m.group(1), 16) < a]
    lo, hi = max(loops, key=lambda span: span[1] - span[0])
    ops = collections.Counter(op for a, op, _ in ins if lo <= a <= hi)
    per = tiles[1] * tiles[2] / (32 * tiles[3])  # weights per thread per step
    regs = re.search(r"REG:(\d+)", res)
    return {"format": "int4kn", "path": "gemm", "tiles": list(tiles), "arch": f"sm_{arch}",
            "instructions_per_weight": round(sum(ops.values()) / per, 2),
            "conversions_per_weight": round(sum(n for o, n in ops.items() if o.startswith(("I2F", "F2F"))) / per, 2),
            "mma": sum(n for o, n in ops.items() if o in ("HGMMA", "HMMA")),
            "registers": int(regs.group(1)) if regs else None,
            "top": {o: round(n / per, 2) for o, n in ops.most_common(8)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", choices=sorted(VARIANTS), default=None, help="one format (default: all)")
    ap.add_argument("--tiles", default=None, help="comma-separated GEMV tiles for --format (default: VARIANTS)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--gemm", action="store_true", help="the K-major INT4 GEMM's K loop instead (GEMM_VARIANTS)")
    args = ap.parse_args()
    if args.gemm:
        for name, tiles in GEMM_VARIANTS:
            print(json.dumps({"variant": name, **gemm_mix(tiles, args.arch)}), flush=True)
        return
    if args.tiles and not args.format:
        ap.error("--tiles needs --format")
    cases = [(args.format, ("forced", tuple(int(v) for v in args.tiles.split(","))))] if args.tiles else \
        [(f, v) for f in ([args.format] if args.format else VARIANTS) for v in VARIANTS[f]]
    for fmt, (name, tiles) in cases:
        default = tuple(qkernel.GEMV_TILES[fmt]) == tiles
        print(json.dumps({"variant": name, "default": default, **mix(fmt, tiles, args.arch)}), flush=True)


if __name__ == "__main__":
    main()
