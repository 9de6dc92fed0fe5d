"""Triton kernels behind `lmforge.quant.qkernel` (see there): weight-only INT8 / INT4 / NF4 matmuls that read the
packed codes and dequantize in registers. Imported on first use, like the other Triton kernels.

Layouts (the quantized linears' own buffers, no repacking):

- INT8: qweight int8 (N, K), scale (N,): ``W = q * scale``.
- INT4: qweight uint8 (N, K / 2) with column 2j in the high nibble, scale (N, K / GROUP) (any float dtype),
  zero uint8 (N, K / GROUP): ``W = (q - zero) * scale``.
- NF4 (K a multiple of the block): codes uint8 (N * K / 2,) packed as INT4's qweight, so row n / byte j is
  ``codes[n * K / 2 + j]``; one absmax per block of GROUP elements of a row, block b = n * K / GROUP + g: fp32, or
  with double quantization int8 read as ``absmax[b] * absmax_scale[b // DQ_BLOCK] + absmax_mean``;
  ``W = NF4_LEVELS[code] * absmax`` (the 16 levels from a 64-byte table: one cache line, so each lookup is one
  L1 access for the whole warp).

Each 4-bit kernel walks whole groups: the codes of BLOCK_G groups x GROUP / 2 bytes are one contiguous run per row,
the even and odd input columns are loaded apart (no interleave in registers). The GEMV keeps INT4's zero point out of
the inner loop: per group, ``sum (q - z) s x = s (sum q x - z sum x)``.
"""
import torch
import triton
import triton.language as tl

from .nf4 import NF4_LEVELS

try:  # programmatic dependent launch (Hopper+), as the bf16 GEMV (`lmforge.infer.kernels.gemv_kernel`)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older triton: PDL is never requested (`qkernel.pdl_options`)
    gdc_launch_dependents = gdc_wait = None


def nf4_prmt_tables(dtype: torch.dtype = torch.bfloat16) -> tuple[list[int], list[int]]:
    """The NF4 levels in `dtype` (bf16 or fp16) as byte tables for PTX ``prmt``: four int32 words of high bytes (byte
    j of word i: level 4i + j) and four of low bytes. Two ``prmt`` pick among levels 0-7 and 8-15 for four 3-bit
    indices at once, a third keeps the half each index's bit 3 names (`_nf4_prmt`)."""
    bits = [b & 0xFFFF for b in NF4_LEVELS.to(dtype).view(torch.int16).tolist()]
    word = lambda vals: sum(v << (8 * j) for j, v in enumerate(vals))  # noqa: E731
    hi = [word([b >> 8 for b in bits[4 * i:4 * i + 4]]) for i in range(4)]
    lo = [word([b & 0xFF for b in bits[4 * i:4 * i + 4]]) for i in range(4)]
    return hi, lo


def _nf4_prmt_asm() -> str:
    """PTX: one K-major code word ($8) and the tables ($9..$12 high bytes, $13..$16 low bytes) -> the bf16 NF4 levels
    of its 8 input columns as fp32 bits ($0..$7)."""
    half = ("and.b32 s7, {w}, 0x7777; shr.b32 sb, {w}, 1; and.b32 sb, sb, 0x4444; or.b32 sb, sb, 0x3210; "
            "prmt.b32 a, $9, $10, s7; prmt.b32 b, $11, $12, s7; prmt.b32 hb, a, b, sb; "
            "prmt.b32 a, $13, $14, s7; prmt.b32 b, $15, $16, s7; prmt.b32 lb, a, b, sb; "
            "prmt.b32 p, lb, hb, 0x5140; shl.b32 ${o0}, p, 16; and.b32 ${o1}, p, 0xFFFF0000; "
            "prmt.b32 p, lb, hb, 0x7362; shl.b32 ${o2}, p, 16; and.b32 ${o3}, p, 0xFFFF0000; ")
    return ("{ .reg .b32 s7, sb, a, b, hb, lb, p, i; " + half.format(w="$8", o0=0, o1=1, o2=2, o3=3)
            + "shr.b32 i, $8, 16; " + half.format(w="i", o0=4, o1=5, o2=6, o3=7) + "}")


def _nf4_pairs_asm(bf16: bool) -> str:
    """PTX: one K-major NF4 code word ($8), the level tables ($9..$16, `nf4_prmt_tables` of the dtype) and the block
    scale as a 16-bit pair ($17) -> the dequantized 16-bit weights of its 8 input columns ($0..$7): the byte permutes
    of `_nf4_prmt_asm` leave two levels a register, each pair then one packed multiply."""
    t = "bf16x2" if bf16 else "f16x2"
    half = ("and.b32 s7, {w}, 0x7777; shr.b32 sb, {w}, 1; and.b32 sb, sb, 0x4444; or.b32 sb, sb, 0x3210; "
            "prmt.b32 a, $9, $10, s7; prmt.b32 b, $11, $12, s7; prmt.b32 hb, a, b, sb; "
            "prmt.b32 a, $13, $14, s7; prmt.b32 b, $15, $16, s7; prmt.b32 lb, a, b, sb; "
            f"prmt.b32 p, lb, hb, 0x5140; fma.rn.{t} p, p, $17, nzero; " "mov.b32 {{${o0}, ${o1}}}, p; "
            f"prmt.b32 p, lb, hb, 0x7362; fma.rn.{t} p, p, $17, nzero; " "mov.b32 {{${o2}, ${o3}}}, p; ")
    return ("{ .reg .b32 s7, sb, a, b, hb, lb, p, i, nzero; mov.b32 nzero, 0x80008000; "
            + half.format(w="$8", o0=0, o1=1, o2=2, o3=3) + "shr.b32 i, $8, 16; "
            + half.format(w="i", o0=4, o1=5, o2=6, o3=7) + "}")


NF4_PRMT_ASM: tl.constexpr = tl.constexpr(_nf4_prmt_asm())
NF4_BF16X2_ASM: tl.constexpr = tl.constexpr(_nf4_pairs_asm(True))
NF4_F16X2_ASM: tl.constexpr = tl.constexpr(_nf4_pairs_asm(False))
_signed = [t - (1 << 32) if t >= 1 << 31 else t for t in sum(nf4_prmt_tables(), [])]
NF4_H0, NF4_H1, NF4_H2, NF4_H3, NF4_L0, NF4_L1, NF4_L2, NF4_L3 = (tl.constexpr(t) for t in _signed)
_signed = [t - (1 << 32) if t >= 1 << 31 else t for t in sum(nf4_prmt_tables(torch.float16), [])]
NF4F_H0, NF4F_H1, NF4F_H2, NF4F_H3, NF4F_L0, NF4F_L1, NF4F_L2, NF4F_L3 = (tl.constexpr(t) for t in _signed)


@triton.jit
def _nf4_absmax(S, SS, Mean, block, mask, DQ: tl.constexpr, DQ_BLOCK: tl.constexpr):
    """fp32 block scales of NF4 blocks `block` (int64), decoding the double-quantized form where DQ."""
    a = tl.load(S + block, mask=mask, other=0).to(tl.float32)
    if DQ:
        a = a * tl.load(SS + block // DQ_BLOCK, mask=mask, other=0.0) + tl.load(Mean)
    return a


@triton.jit
def _nibble_f32(q, MAGIC: tl.constexpr):
    """int32 values 0..15 -> fp32. MAGIC: OR them into the mantissa of 2^23 and subtract 2^23 (an integer OR and a
    float subtract, both full rate) instead of an int-to-float conversion (quarter rate on recent GPUs)."""
    if MAGIC:
        return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return q.to(tl.float32)


@triton.jit
def _q4_pair_fma(part, v, xrow, xo, K3: tl.constexpr, K4: tl.constexpr, m3, m4, NW, K, norm_offset,
                 SILU: tl.constexpr, NORM: tl.constexpr):
    """part (words, columns) += (2048 + q3) x[K3] + (128 + q4) x[K4], q3 / q4 the nibbles at bits 12-15 / 16-19 of
    the uint32 code words v under the exponents 138 / 134 (exact: 2048 + q and 128 + q keep every bit of q), x the
    (fused) inputs at row offsets xo + K3 / K4; also returns the two (words,) inputs, whose constants' share the
    caller subtracts once per column."""
    x3 = _x_in(xrow, xo + K3, NW, K, norm_offset, SILU, NORM)
    x4 = _x_in(xrow, xo + K4, NW, K, norm_offset, SILU, NORM)
    part += ((v & m3) | 0x45000000).to(tl.float32, bitcast=True) * x3[:, None]  # two statements: two FMAs
    part += ((v & m4) | 0x43000000).to(tl.float32, bitcast=True) * x4[:, None]
    return part, x3, x4


@triton.jit
def _nf4_prmt(w, opaque_zero):
    """int32 K-major NF4 code words -> 8 tensors: the (bf16) levels of input columns 8i + j, j = 0..7, as fp32 bits.
    Byte permutes from registers (`nf4_prmt_tables`): no memory lookups. CUDA only (inline PTX). The tables are
    offset by a zero the compiler cannot fold, so they stay in registers (not rematerialized at every permute)."""
    return tl.inline_asm_elementwise(
        NF4_PRMT_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
        [w, opaque_zero + NF4_H0, opaque_zero + NF4_H1, opaque_zero + NF4_H2, opaque_zero + NF4_H3,
         opaque_zero + NF4_L0, opaque_zero + NF4_L1, opaque_zero + NF4_L2, opaque_zero + NF4_L3],
        dtype=(tl.int32,) * 8, is_pure=True, pack=1)


def _q4_half2_asm(bf16: bool) -> str:
    """PTX: one K-major INT4 code word ($8), the pair -(m + z) ($9) and the scale pair ($10) as two 16-bit floats
    each -> the dequantized 16-bit weights (q - z) * s of its 8 input columns ($0..$7). Two nibbles a register
    (j and j + 4) masked under the exponent of m (bf16 128 / fp16 1024, exact for 0..15) by one LOP3, then per pair
    an exact add of -(m + z) and one rounded multiply: the result of rounding the exact product once, as
    ``((q - z) * s).to(dtype)`` in fp32."""
    t = "bf16x2" if bf16 else "f16x2"
    one, magic = ("0x3F803F80", "0x43004300") if bf16 else ("0x3C003C00", "0x64006400")
    lanes = "".join(f"shr.u32 t, $8, {4 * j}; lop3.b32 v{j}, t, 0x000F000F, {magic}, 0xEA; "
                    f"fma.rn.{t} v{j}, v{j}, one, $9; fma.rn.{t} v{j}, v{j}, $10, nzero; " for j in range(4))
    return ("{ .reg .b32 t, v0, v1, v2, v3, one, nzero; " f"mov.b32 one, {one}; mov.b32 nzero, 0x80008000; " + lanes
            + "mov.b32 {$0, $4}, v0; mov.b32 {$1, $5}, v1; mov.b32 {$2, $6}, v2; mov.b32 {$3, $7}, v3; }")


Q4_BF16X2_ASM: tl.constexpr = tl.constexpr(_q4_half2_asm(True))
Q4_F16X2_ASM: tl.constexpr = tl.constexpr(_q4_half2_asm(False))


@triton.jit
def _pair16(v):
    """16-bit floats -> int32 words holding the value in both halves (a packed-pair operand)."""
    b = v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return b | (b << 16)


@triton.jit
def _q4_lane(w, SHIFT: tl.constexpr, z, s, DT: tl.constexpr):
    return ((((w >> SHIFT) & 0xF).to(tl.float32) - z) * s).to(DT)


@triton.jit
def _q4_half2(w, z, s, DT: tl.constexpr, ASM: tl.constexpr):
    """int32 K-major INT4 code words (words, columns) with each column's zero point z (fp32) and scale s (DT) -> 8
    tensors of DT: the weights (q - z) * s of input columns 8i + j, j = 0..7. ASM (CUDA): packed 16-bit pairs in
    registers (`_q4_half2_asm`, 2 instructions a weight); else the same values by fp32 arithmetic (the Triton
    interpreter)."""
    if ASM:  # the pair -(m + z): m = 128 (bf16) or 1024 (fp16), exact either way
        nz = _pair16((-(z + (128.0 if DT == tl.bfloat16 else 1024.0))).to(DT))[None, :]
        v = tl.inline_asm_elementwise(Q4_BF16X2_ASM if DT == tl.bfloat16 else Q4_F16X2_ASM,
                                      "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [w, nz, _pair16(s)[None, :]],
                                      dtype=(s.dtype,) * 8, is_pure=True, pack=1)
    else:
        sf, zf = s.to(tl.float32)[None, :], z[None, :]
        v = (_q4_lane(w, 0, zf, sf, DT), _q4_lane(w, 4, zf, sf, DT), _q4_lane(w, 8, zf, sf, DT),
             _q4_lane(w, 12, zf, sf, DT), _q4_lane(w, 16, zf, sf, DT), _q4_lane(w, 20, zf, sf, DT),
             _q4_lane(w, 24, zf, sf, DT), _q4_lane(w, 28, zf, sf, DT))
    return v


@triton.jit
def _nf4_half2(w, a, Lut, opaque_zero, DT: tl.constexpr, ASM: tl.constexpr):
    """int32 K-major NF4 code words (words, columns) with each column's fp32 block scale a -> 8 tensors of DT: the
    weights level(q) * a of input columns 8i + j. ASM (CUDA): the levels by byte permutes from register tables, two
    a register, times the scale pair (`_nf4_pairs_asm`); else by the level table `Lut` (the Triton interpreter)."""
    if ASM:
        if DT == tl.bfloat16:
            v = _nf4_pairs(w, a.to(tl.bfloat16), opaque_zero, NF4_BF16X2_ASM, NF4_H0, NF4_H1, NF4_H2, NF4_H3,
                           NF4_L0, NF4_L1, NF4_L2, NF4_L3)
        else:
            v = _nf4_pairs(w, a.to(tl.float16), opaque_zero, NF4_F16X2_ASM, NF4F_H0, NF4F_H1, NF4F_H2, NF4F_H3,
                           NF4F_L0, NF4F_L1, NF4F_L2, NF4F_L3)
    else:
        a = a[None, :]
        v = (_nf4_lane(w, 0, Lut, a, DT), _nf4_lane(w, 4, Lut, a, DT), _nf4_lane(w, 8, Lut, a, DT),
             _nf4_lane(w, 12, Lut, a, DT), _nf4_lane(w, 16, Lut, a, DT), _nf4_lane(w, 20, Lut, a, DT),
             _nf4_lane(w, 24, Lut, a, DT), _nf4_lane(w, 28, Lut, a, DT))
    return v


@triton.jit
def _nf4_pairs(w, a, oz, ASM: tl.constexpr, H0: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr, H3: tl.constexpr,
               L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr):
    """`_nf4_pairs_asm` on words w with the 16-bit scales a (one a column) and their dtype's tables (offset by the
    opaque zero oz)."""
    return tl.inline_asm_elementwise(ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r,r",
                                     [w, oz + H0, oz + H1, oz + H2, oz + H3, oz + L0, oz + L1, oz + L2, oz + L3,
                                      _pair16(a)[None, :]], dtype=(a.dtype,) * 8, is_pure=True, pack=1)


@triton.jit
def _nf4_lane(w, SHIFT: tl.constexpr, Lut, a, DT: tl.constexpr):
    return (tl.load(Lut + ((w >> SHIFT) & 0xF)) * a).to(DT)


@triton.jit
def q4_gemv_kernel(X, QW, S, Z, SS, Mean, Lut, Y, N, K, stride_xm, stride_ym,
                   GROUP: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                   NF4: tl.constexpr, DQ: tl.constexpr = False, DQ_BLOCK: tl.constexpr = 256,
                   MAGIC: tl.constexpr = False, LATE: tl.constexpr = False):
    """Y[m, rows] = X[m] @ W[rows].T for BLOCK_N rows per program (grid: input rows x row blocks), fp32 accumulation.

    Per iteration a (BLOCK_N, BLOCK_G, GROUP / 2) tile of code bytes: high nibbles meet the even input columns, low
    nibbles the odd ones. LATE: scale every product and keep a (BLOCK_N, BLOCK_G, GROUP / 2) accumulator, reduced
    once at the end, instead of reducing each group across threads in every iteration."""
    m = tl.program_id(0).to(tl.int64)  # input rows vary fastest: neighbouring programs read the same weight tile
    pid = tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    n_groups = K // GROUP
    g_off = tl.arange(0, BLOCK_G)
    b_off = tl.arange(0, HALF)
    x_row = X + m * stride_xm
    if LATE:
        acc = tl.zeros([BLOCK_N, BLOCK_G, HALF], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    for g0 in range(0, n_groups, BLOCK_G):
        g = g0 + g_off  # (BLOCK_G,)
        g_ok = g < n_groups
        col = g[:, None] * GROUP + 2 * b_off[None, :]  # (BLOCK_G, HALF) even input columns
        xe = tl.load(x_row + col, mask=g_ok[:, None], other=0.0).to(tl.float32)
        xo = tl.load(x_row + col + 1, mask=g_ok[:, None], other=0.0).to(tl.float32)
        byte = rows64[:, None, None] * (K // 2) + (g[None, :, None] * HALF + b_off[None, None, :])
        ok = row_ok[:, None, None] & g_ok[None, :, None]
        q = tl.load(QW + byte, mask=ok, other=0, eviction_policy="evict_first")  # (BLOCK_N, BLOCK_G, HALF) uint8
        hi = (q >> 4).to(tl.int32)
        lo = (q & 15).to(tl.int32)
        blk = rows64[:, None] * n_groups + g[None, :]  # (BLOCK_N, BLOCK_G) group / block index
        blk_ok = row_ok[:, None] & g_ok[None, :]
        if NF4:
            wh = tl.load(Lut + hi)
            wl = tl.load(Lut + lo)
            a = _nf4_absmax(S, SS, Mean, blk, blk_ok, DQ, DQ_BLOCK)
            if LATE:
                acc += a[:, :, None] * (wh * xe[None, :, :] + wl * xo[None, :, :])
            else:
                acc += tl.sum(wh * xe[None, :, :] + wl * xo[None, :, :], axis=2) * a  # (BLOCK_N, BLOCK_G)
        else:
            s = tl.load(S + blk, mask=blk_ok, other=0.0).to(tl.float32)
            z = tl.load(Z + blk, mask=blk_ok, other=0).to(tl.float32)
            dot = _nibble_f32(hi, MAGIC) * xe[None, :, :] + _nibble_f32(lo, MAGIC) * xo[None, :, :]
            if LATE:
                acc += s[:, :, None] * (dot - z[:, :, None] * (xe + xo)[None, :, :])
            else:
                xsum = tl.sum(xe + xo, axis=1)  # (BLOCK_G,)
                acc += s * (tl.sum(dot, axis=2) - z * xsum[None, :])
    if LATE:
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
    else:
        y = tl.sum(acc, axis=1)
    tl.store(Y + m * stride_ym + rows, y.to(Y.dtype.element_ty), mask=row_ok)


@triton.jit
def q4_gemm_kernel(X, QW, S, Z, SS, Mean, Lut, Y, M, N, K, stride_xm, stride_ym,
                   GROUP: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   NF4: tl.constexpr, DQ: tl.constexpr = False, DQ_BLOCK: tl.constexpr = 256):
    """Y = X @ W.T for a (BLOCK_M, BLOCK_N) output tile per program, one group of K per step: the group's codes
    are dequantized to X's dtype in registers and fed to two tensor-core dots (even and odd columns)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    h = tl.arange(0, HALF)
    n_groups = K // GROUP
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    cols = tl.arange(0, GROUP)
    for g in range(0, n_groups):
        # one contiguous (BLOCK_M, GROUP) load (pipelined like any dot operand), split into even / odd columns
        x = tl.load(X + offs_m64[:, None] * stride_xm + (g * GROUP + cols)[None, :], mask=m_ok[:, None], other=0.0)
        xe, xo = tl.split(tl.reshape(x, [BLOCK_M, HALF, 2]))  # (BLOCK_M, HALF) each
        q = tl.load(QW + offs_n64[None, :] * (K // 2) + g * HALF + h[:, None], mask=n_ok[None, :], other=0)
        hi = (q >> 4).to(tl.int32)  # (HALF, BLOCK_N)
        lo = (q & 15).to(tl.int32)
        blk = offs_n64 * n_groups + g  # (BLOCK_N,)
        if NF4:
            a = _nf4_absmax(S, SS, Mean, blk, n_ok, DQ, DQ_BLOCK)[None, :]
            we = (tl.load(Lut + hi) * a).to(xe.dtype)
            wo = (tl.load(Lut + lo) * a).to(xe.dtype)
        else:
            s = tl.load(S + blk, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            z = tl.load(Z + blk, mask=n_ok, other=0).to(tl.float32)[None, :]
            we = ((hi.to(tl.float32) - z) * s).to(xe.dtype)
            wo = ((lo.to(tl.float32) - z) * s).to(xe.dtype)
        acc += tl.dot(xe, we)
        acc += tl.dot(xo, wo)
    y_ptr = Y + offs_m64[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def int8_gemv_kernel(X, QW, S, Y, N, K, stride_xm, stride_ym, NW, B, R, eps, norm_offset,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAGIC: tl.constexpr = False,
                     SILU: tl.constexpr = False, NORM: tl.constexpr = False, BIAS: tl.constexpr = False,
                     RES: tl.constexpr = False, NORM_BLOCK: tl.constexpr = 1024, PDL: tl.constexpr = False):
    """Y[m, rows] = (X[m] @ q[rows].T) * scale[rows]; grid: input rows x row blocks. MAGIC: QW read as int32 words
    (N, K / 4; byte i = input column 4c + i), offset into 0..255 by one XOR per word, byte i of each half word
    masked in place under the exponent 150 - 8i (reads as 2^(23 - 8i) + code + 128): one LOP3, one FADD and one
    FMA per weight instead of a byte extraction and a (quarter-rate) int-to-float conversion. MAGIC=2: byte i
    shifted to bits 8-15 and read as 32768 + code + 128 straight into the FMA, the constant taken off each row once
    (no float subtract per weight). SILU, NORM, BIAS, RES: the decode fusions (`_x_in`, `_epilogue`; NORM's sum of
    squares taken in the loop, which walks all of K, not re-read from L2 at the end). PDL: programmatic dependent
    launch (the wait comes first: loading a weight tile ahead cost registers and instructions per weight here)."""
    m = tl.program_id(0).to(tl.int64)  # input rows vary fastest: neighbouring programs read the same weight tile
    pid = tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x_row = X + m * stride_xm
    sq = tl.zeros([NORM_BLOCK], dtype=tl.float32)  # NORM: the input row's squares, NORM_BLOCK-wide partial sums
    sq_off = tl.arange(0, NORM_BLOCK)
    if MAGIC:
        words = tl.arange(0, BLOCK_K // 4)
        w_rows = QW + rows.to(tl.int64)[:, None] * (K // 4)
        opaque_zero = K >> 30  # 0 (K < 2^30) the compiler cannot fold: keeps the byte masks in registers
        acc = tl.zeros([BLOCK_N, BLOCK_K // 4], dtype=tl.float32)
        sx = tl.zeros([BLOCK_K // 4], dtype=tl.float32)
        _pdl_wait(PDL)
        for k in range(0, K, BLOCK_K):
            c_ok = (k // 4 + words) < K // 4
            w = tl.load(w_rows + k // 4 + words[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0,
                        eviction_policy="evict_first") ^ -2139062144  # bytes + 128 (0x80808080)
            xo = k + words * 4  # (BLOCK_K / 4,) each word's first input column
            sq += _squares(x_row, k, BLOCK_K, sq_off, K, NORM)
            if MAGIC == 2:  # byte i moved to bits 8-15 under exponent 142: reads 32768 + code + 128, into the FMA
                for i in tl.static_range(4):
                    xi = _x_in_masked(x_row, xo + i, c_ok, NW, K, norm_offset, SILU, NORM)
                    sx += xi
                    v = (w << 8) if i == 0 else w if i == 1 else (w >> (8 * i - 8))
                    acc += ((v & (0xFF00 + opaque_zero)) | 0x47000000).to(tl.float32, bitcast=True) * xi[None, :]
            else:
                hi = w >> 16  # bytes 2, 3 at bits 0..15
                for i in tl.static_range(2):
                    mask = (0xFF << (8 * i)) + opaque_zero
                    xl = _x_in_masked(x_row, xo + i, c_ok, NW, K, norm_offset, SILU, NORM)
                    xh = _x_in_masked(x_row, xo + 2 + i, c_ok, NW, K, norm_offset, SILU, NORM)
                    bias = 2.0 ** (23 - 8 * i) + 128
                    ql = ((w & mask) | ((150 - 8 * i) << 23)).to(tl.float32, bitcast=True) - bias
                    qh = ((hi & mask) | ((150 - 8 * i) << 23)).to(tl.float32, bitcast=True) - bias
                    acc += ql * xl[None, :]  # two statements: two FMAs, no extra add
                    acc += qh * xh[None, :]
    else:
        cols = tl.arange(0, BLOCK_K)
        w_rows = QW + rows.to(tl.int64)[:, None] * K
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        _pdl_wait(PDL)
        for k in range(0, K, BLOCK_K):
            k_ok = (k + cols) < K
            w = tl.load(w_rows + k + cols[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0,
                        eviction_policy="evict_first")
            x = _x_in_masked(x_row, k + cols, k_ok, NW, K, norm_offset, SILU, NORM)
            acc += w.to(tl.float32) * x[None, :]
            sq += _squares(x_row, k, BLOCK_K, sq_off, K, NORM)
    s = tl.load(S + rows, mask=row_ok, other=0.0).to(tl.float32)
    out = tl.sum(acc, axis=1)
    if MAGIC == 2:
        out -= 32896.0 * tl.sum(sx, axis=0)  # the constant 32768 + 128 of every code, times each input once
    out = out * s
    if NORM:
        out = out * tl.rsqrt(tl.sum(sq, axis=0) / K + eps)
    out = _epilogue(out, x_row, K, eps, rows, row_ok, B, R + m * stride_ym, False, BIAS, RES, NORM_BLOCK)
    tl.store(Y + m * stride_ym + rows, out.to(Y.dtype.element_ty), mask=row_ok)


@triton.jit
def int8_gemm_kernel(X, QW, S, Y, M, N, K, stride_xm, stride_ym,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_SPLIT: tl.constexpr = 0):
    """Y = (X @ q.T) * scale: int8 codes converted to X's dtype (exact) in registers, scale in the epilogue.
    K_SPLIT > 0: K_SPLIT input columns per program (grid axis 2), fp32 partial sums to a (splits, M, N) workspace."""
    k_lo = tl.program_id(2) * K_SPLIT
    k_hi = k_lo + K_SPLIT if K_SPLIT > 0 else K
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptr = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptr = QW + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N): W transposed
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        k_ok = (k + offs_k) < k_hi
        x = tl.load(x_ptr + k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + k, mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc += tl.dot(x, w.to(x.dtype))
    s = tl.load(S + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    Y += tl.program_id(2).to(tl.int64) * M * stride_ym  # the workspace slice of this split (0 without a split)
    y_ptr = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptr, (acc * s[None, :]).to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ------------------------------------------------------------------------------------------------ decode fusions
# The one-row GEMVs fold a pre-norm block's other kernels in (`QuantLinear.fused`): the input is the residual stream
# scaled by the RMSNorm weight (NORM; its 1 / rms factor, one scalar per row, multiplies the finished sums), or the
# packed gate/up output as silu(gate) * up (SILU: rows of 2K); the output gets the bias and the residual added (BIAS,
# RES). In fp32 throughout: not rounded where the separate ops round (within the bf16 output's rounding of them).


@triton.jit
def _x_in(xrow, off, NW, K, norm_offset, SILU: tl.constexpr, NORM: tl.constexpr):
    """fp32 inputs at offsets `off` of one row: X, silu(gate) * up (SILU), times (norm_offset + NW) (NORM)."""
    return _x_in_masked(xrow, off, True, NW, K, norm_offset, SILU, NORM)  # (a constant mask: no predicate)


@triton.jit
def _x_in_masked(xrow, off, ok, NW, K, norm_offset, SILU: tl.constexpr, NORM: tl.constexpr):
    """`_x_in` where `ok`, else 0."""
    x = tl.load(xrow + off, mask=ok, other=0.0).to(tl.float32)
    if SILU:
        x = x / (1.0 + tl.exp(-x)) * tl.load(xrow + K + off, mask=ok, other=0.0).to(tl.float32)
    if NORM:
        x = x * (norm_offset + tl.load(NW + off, mask=ok, other=0.0).to(tl.float32))
    return x


@triton.jit
def _epilogue(y, xrow, K, eps, cols, col_ok, B, res_row, NORM: tl.constexpr, BIAS: tl.constexpr, RES: tl.constexpr,
              NORM_BLOCK: tl.constexpr):
    """The fused GEMV's finished fp32 sums `y` (columns `cols`): times 1 / rms of the input row (NORM: its sum of
    squares read here, from L2), + bias, + the residual row (rounded to the output dtype first, as the ops)."""
    if NORM:
        sq = tl.zeros((NORM_BLOCK,), dtype=tl.float32)
        ks = tl.arange(0, NORM_BLOCK)
        for k in range(0, K, NORM_BLOCK):
            v = tl.load(xrow + k + ks, mask=(k + ks) < K, other=0.0).to(tl.float32)
            sq += v * v
        y = y * tl.rsqrt(tl.sum(sq, axis=0) / K + eps)
    if BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    if RES:
        y = y.to(res_row.dtype.element_ty).to(tl.float32) + tl.load(res_row + cols, mask=col_ok, other=0.0).to(
            tl.float32)
    return y


@triton.jit
def _squares(xrow, k, BLOCK_K: tl.constexpr, off, K, NORM: tl.constexpr):
    """NORM: the squares of input columns k .. k + BLOCK_K folded into a (NORM_BLOCK,) partial sum (L1 hits: the
    loop loads these columns anyway); else 0."""
    if NORM:
        acc = tl.zeros(off.shape, dtype=tl.float32)
        for j in tl.static_range(0, BLOCK_K, off.shape[0]):
            v = tl.load(xrow + k + j + off, mask=(k + j + off) < tl.minimum(K, k + BLOCK_K), other=0.0)
            acc += v.to(tl.float32) * v.to(tl.float32)
        return acc
    return tl.zeros(off.shape, dtype=tl.float32)


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    """Under programmatic dependent launch: let the next kernel launch, then wait for the previous one's output
    (the caller loads only weights before this)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


# ------------------------------------------------------------------------------------------------ K-major 4-bit
# The decode layout `prepare_fast_path` repacks INT4 / NF4 into on CUDA (GPTQ's qweight order): codes int32
# (K / 8, N), input column 8i + j of output n in bits 4j..4j+3 of word [i, n]; per group of GROUP input columns a
# scale (K / GROUP, N) and, for INT4, a zero point uint8 (K / GROUP, N): ``W[n, k] = (q - z) * s`` (NF4:
# ``LEVELS[q] * absmax``, absmax (K / GROUP, N) as stored, fp32 or int8 double-quantized with the block scales of the
# row layout: block g of row n is scaled by absmax_scale[(n K / GROUP + g) // DQ_BLOCK]). The buffers of `Int4Linear`
# and `NF4Linear` in their "kn" layout. Threads own output columns: loads are 16-byte runs along N, and the reduction
# over K stays inside a thread (no cross-thread sum per step), which the row-major kernels above cannot avoid.


@triton.jit
def _kn_absmax(S, SS, Mean, g, cols, col_ok, n_groups, N, DQ: tl.constexpr, DQ_BLOCK: tl.constexpr):
    """fp32 NF4 scales of group g for output columns `cols` (K-major absmax, double quantization decoded; DQ=2: one
    mean per double-quantization block, as packed layers hold them)."""
    a = tl.load(S + g * N + cols, mask=col_ok, other=0).to(tl.float32)
    if DQ:
        dq = (cols.to(tl.int64) * n_groups + g) // DQ_BLOCK
        if DQ == 2:
            a = a * tl.load(SS + dq, mask=col_ok, other=0.0) + tl.load(Mean + dq, mask=col_ok, other=0.0)
        else:
            a = a * tl.load(SS + dq, mask=col_ok, other=0.0) + tl.load(Mean)
    return a


@triton.jit
def _level_times_x(v, xrow, xo, j: tl.constexpr, NW, K, norm_offset, SILU: tl.constexpr, NORM: tl.constexpr):
    """(words, columns) NF4 levels v (fp32 bits) times the (fused, `_x_in`) inputs at row offsets xo + j."""
    return v.to(tl.float32, bitcast=True) * _x_in(xrow, xo + j, NW, K, norm_offset, SILU, NORM)[:, None]


@triton.jit
def q4kn_gemv_kernel(X, QW, S, Z, SS, Mean, Lut, Y, Cnt, Out, N, K, stride_xm, stride_ym, NW, B, R, eps, norm_offset,
                     GROUP: tl.constexpr, NF4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     STEPS: tl.constexpr, ATOMIC: tl.constexpr, DQ: tl.constexpr = False,
                     DQ_BLOCK: tl.constexpr = 256, MAGIC: tl.constexpr = False, FLAT: tl.constexpr = False,
                     SILU: tl.constexpr = False, NORM: tl.constexpr = False, BIAS: tl.constexpr = False,
                     RES: tl.constexpr = False, NORM_BLOCK: tl.constexpr = 1024, PDL: tl.constexpr = False):
    """Y[m, cols] (+)= X[m, ks] @ W[ks, cols] over STEPS x BLOCK_K input columns per program (grid: input rows x
    column blocks x K splits). With more than one split, Y is an fp32 workspace (splits, M, N) of partial sums that
    `splitk_sum_kernel` adds up, or with ATOMIC a zeroed fp32 (M, N) the splits add into (order-dependent);
    ATOMIC=2: Y is a persistent zeroed fp32 workspace and Cnt zeroed int32 (M, column blocks) counters: the split
    that finishes a column block last (acquire on its counter) writes Out in x's dtype and leaves Y and Cnt zeroed
    again, so a call is one kernel (no memset, no cast kernel: each costs a launch in a CUDA graph). MAGIC:
    INT4 nibble j of each half word masked in place under the exponent 150 - 4j, which reads as 2^(23 - 4j) + q:
    one LOP3, one FADD and one FMA per weight, no shift and no int-to-float conversion (quarter rate: it bounds the
    plain loop near half the HBM roofline on an H100); FLAT then uses `_nibble_f32`'s exponent trick. MAGIC=2 (INT4):
    shifted copies of each word put two nibbles at bits 12-19, read under two exponents as 2048 + q and 128 + q,
    straight into the FMA (`_q4_pair_fma`): no float subtract per weight; the constants' share comes off each
    column once (fp32 sums of ~2048 x, some 1e-5 relative error, far below the bf16 output's). NF4: levels a
    byte at a time from the 256-entry pair table (`Lut` then int64: half the table loads of the 16-level one);
    MAGIC=2 (NF4, CUDA): the bf16 levels by byte permutes in registers (`_nf4_prmt`), no table loads.
    FLAT: a (BLOCK_K, BLOCK_N) tile whose every code word is loaded by the 8 input columns it holds (L1 hits),
    unpacked by a per-row shift: two-dimensional throughout, NF4 from the 16-level table.
    SILU, NORM, BIAS, RES: the decode fusions (see `_x_in`, `_epilogue`), applied by the program that writes the
    output (one split, or ATOMIC=2's last). PDL: the first code words are loaded before waiting for the previous
    kernel (each step's words are loaded one step ahead)."""
    m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    k_first = tl.program_id(2) * (STEPS * BLOCK_K)
    words = tl.arange(0, BLOCK_K // 8)
    nib = tl.arange(0, 8)
    shift = (nib * 4)[None, :, None]  # (1, 8, 1)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    kk = tl.arange(0, BLOCK_K)
    opaque_zero = K >> 30  # 0 (K < 2^30) the compiler cannot fold: keeps MAGIC's nibble masks in registers
    xrow = X + m * stride_xm
    w_next = tl.load(QW + ((k_first // 8 + words).to(tl.int64) * N)[:, None] + cols[None, :], mask=col_ok[None, :],
                     other=0, eviction_policy="evict_first")  # (BLOCK_K / 8, BLOCK_N) int32: the first step's words
    _pdl_wait(PDL)
    for i in range(STEPS):
        k0 = k_first + i * BLOCK_K
        if FLAT:
            w = tl.load(QW + (((k0 + kk) // 8).to(tl.int64) * N)[:, None] + cols[None, :], mask=col_ok[None, :],
                        other=0, eviction_policy="evict_first")  # (BLOCK_K, BLOCK_N) int32, words repeated
            q = (w >> ((kk % 8) * 4)[:, None]) & 0xF
            x = _x_in(xrow, k0 + kk, NW, K, norm_offset, SILU, NORM)  # (BLOCK_K,)
            if NF4:
                a = _kn_absmax(S, SS, Mean, k0 // GROUP, cols, col_ok, K // GROUP, N, DQ, DQ_BLOCK)
                acc += tl.sum(tl.load(Lut + q) * x[:, None], axis=0) * a
            else:
                g = (k0 // GROUP) * N
                s = tl.load(S + g + cols, mask=col_ok, other=0).to(tl.float32)
                z = tl.load(Z + g + cols, mask=col_ok, other=0).to(tl.float32)
                acc += (tl.sum(_nibble_f32(q, MAGIC) * x[:, None], axis=0) - tl.sum(x, axis=0) * z) * s
        else:
            w = w_next
            w_next = tl.load(QW + ((k0 // 8 + BLOCK_K // 8 + words).to(tl.int64) * N)[:, None] + cols[None, :],
                             mask=col_ok[None, :] & (i + 1 < STEPS), other=0, eviction_policy="evict_first")
            # codes and inputs as (words, 8, columns) for the 16-level table and the plain INT4 loop (the other
            # branches read neither: the compiler drops them there)
            q = (w[:, None, :] >> shift) & 0xF  # (BLOCK_K / 8, 8, BLOCK_N)
            x = _x_in(xrow, k0 + words[:, None] * 8 + nib[None, :], NW, K, norm_offset, SILU, NORM)  # (BK / 8, 8)
            if NF4 and MAGIC == 2:  # levels by byte permutes in registers (bf16 levels, as bitsandbytes' kernels)
                v0, v1, v2, v3, v4, v5, v6, v7 = _nf4_prmt(w, opaque_zero)  # 8 x (BLOCK_K / 8, BLOCK_N)
                xo = k0 + words * 8  # (BLOCK_K / 8,)
                part = _level_times_x(v0, xrow, xo, 0, NW, K, norm_offset, SILU, NORM)
                part += _level_times_x(v1, xrow, xo, 1, NW, K, norm_offset, SILU, NORM)
                part += _level_times_x(v2, xrow, xo, 2, NW, K, norm_offset, SILU, NORM)
                part += _level_times_x(v3, xrow, xo, 3, NW, K, norm_offset, SILU, NORM)
                part += _level_times_x(v4, xrow, xo, 4, NW, K, norm_offset, SILU, NORM)
                part += _level_times_x(v5, xrow, xo, 5, NW, K, norm_offset, SILU, NORM)
                part += _level_times_x(v6, xrow, xo, 6, NW, K, norm_offset, SILU, NORM)
                part += _level_times_x(v7, xrow, xo, 7, NW, K, norm_offset, SILU, NORM)
                a = _kn_absmax(S, SS, Mean, k0 // GROUP, cols, col_ok, K // GROUP, N, DQ, DQ_BLOCK)
                acc += tl.sum(part, axis=0) * a
            elif NF4 and MAGIC:  # Lut: byte -> its two levels as one int64 (fp32 bits, even k low): one load per byte
                t = tl.load(Lut + ((w[:, None, :] >> (tl.arange(0, 4) * 8)[None, :, None]) & 0xFF))  # (BK/8, 4, BN)
                xk = k0 + words[:, None] * 8 + tl.arange(0, 4)[None, :] * 2  # even k (BK/8, 4)
                lo = t.to(tl.int32).to(tl.float32, bitcast=True) * _x_in(xrow, xk, NW, K, norm_offset, SILU,
                                                                         NORM)[:, :, None]
                hi = (t >> 32).to(tl.int32).to(tl.float32, bitcast=True) * _x_in(xrow, xk + 1, NW, K, norm_offset,
                                                                                 SILU, NORM)[:, :, None]
                a = _kn_absmax(S, SS, Mean, k0 // GROUP, cols, col_ok, K // GROUP, N, DQ, DQ_BLOCK)
                acc += tl.sum(tl.sum(lo + hi, axis=1), axis=0) * a
            elif NF4:
                v = tl.load(Lut + q)  # the 16 levels, one cache line
                a = _kn_absmax(S, SS, Mean, k0 // GROUP, cols, col_ok, K // GROUP, N, DQ, DQ_BLOCK)
                acc += tl.sum(tl.sum(v * x[:, :, None], axis=1), axis=0) * a
            elif MAGIC == 2:  # copies of the word shifted so two nibbles sit at bits 12-19, each masked under an
                # exponent that reads it as 2048 + q (bits 12-15) or 128 + q (16-19) exactly: one LOP3 and one FMA a
                # weight; the constants' share comes off each column once, 2048 x odd-k sums + 128 x even-k sums
                wu = w.to(tl.uint32, bitcast=True)
                xo = k0 + words * 8  # (BLOCK_K / 8,) the first input column of each word
                m3, m4 = 0xF000 + opaque_zero, 0xF0000 + opaque_zero  # register operands (see MAGIC=1)
                part = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
                part, odd, even = _q4_pair_fma(part, wu << 8, xrow, xo, 1, 2, m3, m4, NW, K, norm_offset, SILU,
                                               NORM)  # nibbles 1, 2
                part, o, e = _q4_pair_fma(part, wu, xrow, xo, 3, 4, m3, m4, NW, K, norm_offset, SILU, NORM)
                odd, even = odd + o, even + e
                part, o, e = _q4_pair_fma(part, wu >> 8, xrow, xo, 5, 6, m3, m4, NW, K, norm_offset, SILU, NORM)
                odd, even = odd + o, even + e
                part, o, e = _q4_pair_fma(part, (wu << 16) | (wu >> 16), xrow, xo, 7, 0, m3, m4, NW, K, norm_offset,
                                          SILU, NORM)  # a rotation
                odd, even = odd + o, even + e
                g = (k0 // GROUP) * N
                s = tl.load(S + g + cols, mask=col_ok, other=0).to(tl.float32)
                z = tl.load(Z + g + cols, mask=col_ok, other=0).to(tl.float32)
                odd_sum, even_sum = tl.sum(odd, axis=0), tl.sum(even, axis=0)
                acc += (tl.sum(part, axis=0) - (2048.0 + z) * odd_sum - (128.0 + z) * even_sum) * s
            elif MAGIC:  # nibble j of a half word masked in place under exponent 150 - 4j: 2^(23 - 4j) + q exactly
                hi = w >> 16  # (BLOCK_K / 8, BLOCK_N): nibbles 4..7 at bits 0..15
                xo = k0 + words * 8  # (BLOCK_K / 8,) the first input column of each word
                part = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)  # per-thread FMA chains, summed once
                sx = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
                for j in tl.static_range(4):
                    mask = (0xF << (4 * j)) + opaque_zero  # a register operand: one LOP3 per nibble, no MOV
                    xl = _x_in(xrow, xo + j, NW, K, norm_offset, SILU, NORM)
                    xh = _x_in(xrow, xo + 4 + j, NW, K, norm_offset, SILU, NORM)
                    sx += xl + xh
                    ql = ((w & mask) | ((150 - 4 * j) << 23)).to(tl.float32, bitcast=True) - 2.0 ** (23 - 4 * j)
                    qh = ((hi & mask) | ((150 - 4 * j) << 23)).to(tl.float32, bitcast=True) - 2.0 ** (23 - 4 * j)
                    part += ql * xl[:, None]  # two statements: two FMAs, no extra add
                    part += qh * xh[:, None]
                g = (k0 // GROUP) * N
                s = tl.load(S + g + cols, mask=col_ok, other=0).to(tl.float32)
                z = tl.load(Z + g + cols, mask=col_ok, other=0).to(tl.float32)
                acc += (tl.sum(part, axis=0) - tl.sum(sx, axis=0) * z) * s
            else:
                g = (k0 // GROUP) * N
                s = tl.load(S + g + cols, mask=col_ok, other=0).to(tl.float32)
                z = tl.load(Z + g + cols, mask=col_ok, other=0).to(tl.float32)
                qf = q.to(tl.float32)  # sum (q - z) s x = s (sum q x - z sum x)
                acc += (tl.sum(tl.sum(qf * x[:, :, None], axis=1), axis=0) - tl.sum(tl.sum(x, 1), 0) * z) * s
    if ATOMIC == 2:
        tl.atomic_add(Y + m * stride_ym + cols, acc, mask=col_ok, sem="relaxed")
        tl.debug_barrier()  # every thread's sums are in before the counter says so (release, cumulative)
        counter = Cnt + m * tl.num_programs(1) + tl.program_id(1)
        if tl.atomic_add(counter, 1, sem="acq_rel") == tl.num_programs(2) - 1:  # the last split of this block
            total = tl.load(Y + m * stride_ym + cols, mask=col_ok, other=0.0, volatile=True)  # L2, never stale L1
            out = _epilogue(total, xrow, K, eps, cols, col_ok, B, R + m * stride_ym, NORM, BIAS, RES, NORM_BLOCK)
            tl.store(Out + m * stride_ym + cols, out.to(Out.dtype.element_ty), mask=col_ok)
            tl.store(Y + m * stride_ym + cols, tl.zeros_like(total), mask=col_ok)
            tl.atomic_xchg(counter, 0, sem="relaxed")
    elif ATOMIC:
        tl.atomic_add(Y + m * stride_ym + cols, acc, mask=col_ok, sem="relaxed")
    else:  # Y: the output, or split k's own fp32 slice of a (splits, M, N) workspace (no fusions then)
        acc = _epilogue(acc, xrow, K, eps, cols, col_ok, B, R + m * stride_ym, NORM, BIAS, RES, NORM_BLOCK)
        tl.store(Y + tl.program_id(2).to(tl.int64) * tl.num_programs(0) * stride_ym + m * stride_ym + cols,
                 acc.to(Y.dtype.element_ty), mask=col_ok)


@triton.jit
def splitk_sum_kernel(P, Y, n, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """Y[i] = sum over s of P[s, i] for i < n (the split-K GEMV's partial sums, in a fixed order: deterministic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(P + s * n + offs, mask=ok, other=0.0)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def q4kn_dequant_kernel(QW, S, Z, SS, Mean, Lut, W, N, K, GROUP: tl.constexpr, NF4: tl.constexpr,
                        BLOCK_N: tl.constexpr, WORDS: tl.constexpr, DQ: tl.constexpr = False,
                        DQ_BLOCK: tl.constexpr = 256):
    """W[k, n] (K, N) in W's dtype from the K-major codes, WORDS x 8 input rows (within one group) by BLOCK_N columns
    a program: one pass over the codes, one write of the weight (what cuBLAS then multiplies, for long inputs)."""
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w0 = tl.program_id(0) * WORDS
    words = w0 + tl.arange(0, WORDS)
    nib = tl.arange(0, 8)
    w = tl.load(QW + (words.to(tl.int64) * N)[:, None] + cols[None, :], mask=col_ok[None, :], other=0)
    q = (w[:, None, :] >> (nib * 4)[None, :, None]) & 0xF  # (WORDS, 8, BLOCK_N)
    g = (w0 * 8) // GROUP
    if NF4:
        v = tl.load(Lut + q) * _kn_absmax(S, SS, Mean, g, cols, col_ok, K // GROUP, N, DQ, DQ_BLOCK)[None, None, :]
    else:
        s = tl.load(S + g * N + cols, mask=col_ok, other=0).to(tl.float32)
        z = tl.load(Z + g * N + cols, mask=col_ok, other=0).to(tl.float32)
        v = (q.to(tl.float32) - z[None, None, :]) * s[None, None, :]
    rows = (words[:, None] * 8 + nib[None, :]).to(tl.int64)  # (WORDS, 8)
    tl.store(W + (rows * N)[:, :, None] + cols[None, None, :], v.to(W.dtype.element_ty), mask=col_ok[None, None, :])


@triton.jit
def q4kn_gemm_kernel(X, QW, S, Z, SS, Mean, Lut, Y, M, N, K, stride_xm, stride_ym,
                     GROUP: tl.constexpr, NF4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DQ: tl.constexpr = False, DQ_BLOCK: tl.constexpr = 256,
                     K_SPLIT: tl.constexpr = 0, MAGIC: tl.constexpr = 0, WORDS: tl.constexpr = False,
                     ASM: tl.constexpr = False):
    """Y[rows, cols] = X[rows] @ W[:, cols] with (BLOCK_K, BLOCK_N) weight tiles dequantized into tensor-core dots
    (BLOCK_K divides GROUP: one scale row per tile). Each code word is loaded by the 8 rows it holds (L1 hits), or
    with WORDS once, as a (BLOCK_K / 8, BLOCK_N) tile unpacked to (BLOCK_K / 8, 8, BLOCK_N) and reshaped (an eighth
    of the load instructions, a register shuffle instead).
    K_SPLIT > 0: this program covers K_SPLIT input columns (grid axis 2) and writes its fp32 partial sums to its slice
    of a (splits, M, N) workspace, so few output tiles (a narrow N) still fill the GPU. MAGIC=1: INT4 nibbles to float
    by `_nibble_f32`'s exponent trick instead of a (quarter-rate) conversion. MAGIC=2 (WORDS; INT4 scales in X's
    16-bit dtype): each word straight to its 8 weights in X's dtype, two to a register (INT4 `_q4_half2`: about 4
    machine instructions a weight in the loop on sm_90 against 8 and a quarter-rate conversion, `bench/qkernel_sass.py
    --gemm`; NF4 `_nf4_half2`: byte permutes, no table loads), interleaved into the (BLOCK_K, BLOCK_N) tile by
    joins."""
    k_lo = tl.program_id(2) * K_SPLIT
    k_hi = k_lo + K_SPLIT if K_SPLIT > 0 else K
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    ks = tl.arange(0, BLOCK_K)
    shift = ((ks % 8) * 4)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x = tl.load(X + rows.to(tl.int64)[:, None] * stride_xm + (k0 + ks)[None, :], mask=row_ok[:, None], other=0.0)
        if WORDS and MAGIC == 2:
            w = tl.load(QW + (k0 // 8 + tl.arange(0, BLOCK_K // 8)).to(tl.int64)[:, None] * N + cols[None, :],
                        mask=col_ok[None, :], other=0)  # (BLOCK_K / 8, BLOCK_N)
            if NF4:
                a = _kn_absmax(S, SS, Mean, k0 // GROUP, cols, col_ok, K // GROUP, N, DQ, DQ_BLOCK)
                v0, v1, v2, v3, v4, v5, v6, v7 = _nf4_half2(w, a, Lut, K >> 30, X.dtype.element_ty, ASM)
            else:
                g = (k0 // GROUP) * N
                s = tl.load(S + g + cols, mask=col_ok, other=0)
                z = tl.load(Z + g + cols, mask=col_ok, other=0).to(tl.float32)
                v0, v1, v2, v3, v4, v5, v6, v7 = _q4_half2(w, z, s, X.dtype.element_ty, ASM)
            # (BK / 8, BN, 2, 2, 2): [..., a, b, c] is input column 8i + 4c + 2b + a; to (BK / 8, c, b, a, BN)
            v = tl.join(tl.join(tl.join(v0, v1), tl.join(v2, v3)), tl.join(tl.join(v4, v5), tl.join(v6, v7)))
            wt = tl.reshape(tl.permute(v, (0, 4, 3, 2, 1)), (BLOCK_K, BLOCK_N))
        else:
            if WORDS:
                w = tl.load(QW + (k0 // 8 + tl.arange(0, BLOCK_K // 8)).to(tl.int64)[:, None] * N + cols[None, :],
                            mask=col_ok[None, :], other=0)  # (BLOCK_K / 8, BLOCK_N)
                q = tl.reshape((w[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
            else:
                w = tl.load(QW + ((k0 + ks) // 8).to(tl.int64)[:, None] * N + cols[None, :], mask=col_ok[None, :],
                            other=0)
                q = (w >> shift) & 0xF  # (BLOCK_K, BLOCK_N)
            if NF4:
                wt = tl.load(Lut + q) * _kn_absmax(S, SS, Mean, k0 // GROUP, cols, col_ok, K // GROUP, N, DQ,
                                                   DQ_BLOCK)[None, :]
            else:
                g = (k0 // GROUP) * N  # (K / GROUP) N < 2^31
                s = tl.load(S + g + cols, mask=col_ok, other=0).to(tl.float32)
                z = tl.load(Z + g + cols, mask=col_ok, other=0).to(tl.float32)
                wt = (_nibble_f32(q, MAGIC) - z[None, :]) * s[None, :]
            wt = wt.to(x.dtype)
        acc += tl.dot(x, wt)
    Y += tl.program_id(2).to(tl.int64) * M * stride_ym  # the workspace slice of this split (0 without a split)
    tl.store(Y + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
