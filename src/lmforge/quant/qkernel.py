"""Weight-only quantized matmuls, ``y = x @ dequant(W).T``, one torch op per format, never materializing W on CUDA.

Ops (``torch.library`` custom ops: torch.compile keeps them as opaque calls, CUDA graphs capture their kernels):

- ``lmforge::int8_linear(x, qweight, scale)``
- ``lmforge::int4_linear(x, qweight, scale, zero, group_size)``
- ``lmforge::nf4_linear(x, codes, absmax, absmax_scale, absmax_mean, block_size, dq_block_size)``

x (M, K) -> (M, N) in x's dtype, with the layouts of `Int8Linear`, `Int4Linear` and `NF4Linear` (see
`qkernel_triton`). Backward returns dx through the dequantized weight (QLoRA trains adapters over a frozen NF4 base).

Which code runs (`linear_int8` / `linear_int4` / `linear_nf4` pick):

- CUDA, bf16/fp16 input, triton installed: M <= ``GEMV_MAX_ROWS`` (decode) a GEMV that reads each code byte once
  per row block and dequantizes in registers; M <= ``GEMM_MAX_ROWS`` (batched decode, short prefill) a Triton GEMM
  that dequantizes one group at a time into tensor-core dots; more rows (compute-bound prefill) dequantize once and
  call cuBLAS. Each kernel variant (format, path, dtype, group size) first checks itself against the reference on a
  small random problem, outside CUDA-graph capture; one that fails to build, to launch, or to agree is switched off
  for the process with one warning and the reference runs instead. A layer's `QuantKernels` (`kernels`, the
  engine's ``engine.kernels.quant`` / ``quant_gemv_tiles``) switches them off or forces the GEMV's tiles; the
  functions here take it as an argument (the ops take the tiles).
- Everywhere else the reference: dequantize, then ``F.linear``. NF4's dequantization looks each code byte up in a
  256-entry table of level pairs in the compute dtype (one gather per two weights, no float32 temporaries),
  faster on the CPU than indexing the float32 levels per nibble.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .base import DEFAULT_KERNELS, QuantKernels
from .nf4 import NF4_LEVELS, unpack_nibbles
from .rtn import int4_dequantize

__all__ = ["Fuse", "fuse_input", "fuse_output", "GEMV_MAX_ROWS", "GEMM_MAX_ROWS", "available", "use_kernel",
           "linear_int8", "linear_int4", "linear_int4kn",
           "linear_nf4", "int8_linear", "int4_linear", "int4kn_linear", "nf4_linear", "nf4kn_linear", "linear_nf4kn",
           "pack_kn", "unpack_kn",
           "nf4_dequantize", "kernel_status", "QuantKernels"]

log = logging.getLogger("lmforge.quant")

GEMV_MAX_ROWS = 4  # decode: one program per (input row, BLOCK_N weight rows), neighbours share the weight tile in L2
GEMM_MAX_ROWS = 256  # past this a matmul is compute-bound: one dequantization, then cuBLAS
HAS_TRITON = importlib.util.find_spec("triton") is not None
cpu_interpreter = False  # also route CPU inputs through the Triton kernels (tests, under TRITON_INTERPRET=1)
_status: dict[tuple, bool | str] = {}  # kernel variant -> True (verified), or why it is off


def kernel_status() -> dict[str, bool | str]:
    """{variant: True or the reason it is off} for every kernel variant tried in this process."""
    return {"/".join(map(str, k)): v for k, v in _status.items()}


def _triton_runs(device: torch.device) -> bool:
    """CUDA with triton installed (a constant for torch.compile to trace through), or triton's CPU interpreter."""
    return HAS_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def use_kernel(x: torch.Tensor, kernels: QuantKernels = DEFAULT_KERNELS) -> bool:
    """Send this input to the custom ops: a half-precision input where the Triton kernels run (CUDA, or the CPU
    interpreter when asked), unless `kernels` switches them off."""
    return (kernels.enabled and x.dtype in (torch.bfloat16, torch.float16) and (x.is_cuda or cpu_interpreter)
            and _triton_runs(x.device))


def available(device: torch.device, dtype: torch.dtype, kernels: QuantKernels = DEFAULT_KERNELS) -> bool:
    """Inputs of `dtype` on `device` would go to the Triton kernels (what `prepare_fast_path` reports)."""
    return use_kernel(torch.empty(0, device=device, dtype=dtype), kernels)


def group_ok(group: int) -> bool:
    return 32 <= group <= 1024 and group & (group - 1) == 0  # whole groups per step, tl.dot needs group / 2 >= 16


class Fuse(NamedTuple):
    """What a one-row decode matmul folds in (`QuantLinear.fused`): y = f(x) @ W.T + bias + residual, f the
    block's RMSNorm (`norm`: weight, eps, offset as `RMSNorm`) or the SwiGLU gating silu(gate) * up (`silu`: x
    holds [gate, up], twice the in_features). The GEMVs apply it in the kernel; other paths with torch ops."""

    norm: tuple[torch.Tensor, float, float] | None = None
    silu: bool = False
    bias: torch.Tensor | None = None
    residual: torch.Tensor | None = None

    def tag(self) -> str:
        """The kernel variant's name for these fusions ("norm+bias", "silu+res", ...; "" for none)."""
        return "+".join(n for n, on in (("norm", self.norm is not None), ("silu", self.silu),
                                        ("bias", self.bias is not None), ("res", self.residual is not None)) if on)


def fuse_input(x: torch.Tensor, fuse: Fuse | None) -> torch.Tensor:
    """The matmul's input with the fused prologue applied by torch ops (rounded as the model's own modules)."""
    if fuse is None:
        return x
    if fuse.silu:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    if fuse.norm is not None:
        from ..models.transformer import rms_norm  # (lmforge.models loads quantized checkpoints: imported here)

        x = rms_norm(x, *fuse.norm)
    return x


def fuse_output(y: torch.Tensor, fuse: Fuse | None) -> torch.Tensor:
    """The matmul's output with the fused bias and residual added by torch ops."""
    if fuse is not None and fuse.bias is not None:
        y = y + fuse.bias.to(y.dtype)
    if fuse is not None and fuse.residual is not None:
        y = y + fuse.residual.reshape(y.shape)
    return y


def _fuse_args(fuse: Fuse | None, x: torch.Tensor, y: torch.Tensor, K: int) -> tuple[tuple, dict]:
    """(NW, B, R, eps, norm_offset) and the constexpr switches of a fused GEMV launch (placeholders: y)."""
    fuse = fuse or Fuse()
    nw, eps, offset = fuse.norm if fuse.norm is not None else (y, 0.0, 0.0)
    args = (nw, y if fuse.bias is None else fuse.bias, y if fuse.residual is None else fuse.residual.contiguous(),
            float(eps), float(offset))
    flags = dict(SILU=fuse.silu, NORM=fuse.norm is not None, BIAS=fuse.bias is not None,
                 RES=fuse.residual is not None, NORM_BLOCK=min(4096, 1 << max(K - 1, 1).bit_length()))
    return args, flags


def _unfused(launch, x: torch.Tensor, fuse: Fuse | None) -> torch.Tensor:
    """`launch(x)` with the fusions done by torch ops around it."""
    return fuse_output(launch(fuse_input(x, fuse)), fuse)


def pdl_options(device: torch.device, pdl: bool) -> dict:
    """Launch options of a decode GEMV: programmatic dependent launch where asked and possible (compute capability
    9+, a triton with `gdc_wait`), as the bf16 GEMVs (`lmforge.infer.kernels.gemv.use_pdl`)."""
    return {"PDL": True, "launch_pdl": True} if pdl and device.type == "cuda" and _pdl_capable(device.index) else {}


@functools.cache
def _pdl_capable(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9 and _kernels().gdc_wait is not None


# ------------------------------------------------------------------------------------------------ reference math


def int8_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(x, qweight.to(x.dtype)) * scale.to(x.dtype)


def int4_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return F.linear(x, int4_dequantize(unpack_nibbles(qweight), scale, zero, x.dtype))


@functools.cache
def _level_pairs(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256,) table: byte b -> (NF4_LEVELS[b >> 4], NF4_LEVELS[b & 15]) in `dtype`, both values in one integer
    element (int32 for 16-bit dtypes, int64 for fp32), so one `index_select` fetches a byte's two weights."""
    b = torch.arange(256)
    pairs = torch.stack([NF4_LEVELS[b >> 4], NF4_LEVELS[b & 15]], dim=-1).to(dtype).contiguous()  # (256, 2)
    return pairs.view(torch.int32 if dtype.itemsize == 2 else torch.int64).flatten().to(device)


def nf4_block_absmax(absmax: torch.Tensor, absmax_scale: torch.Tensor | None, absmax_mean: torch.Tensor | None,
                     dq_block_size: int) -> torch.Tensor:
    """float32 (n_blocks,) block scales, decoding double quantization (as `NF4Tensor.block_absmax`)."""
    if absmax_scale is None:
        return absmax.float()
    scale = absmax_scale.repeat_interleave(dq_block_size)[: absmax.numel()]
    return absmax.float() * scale + absmax_mean


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor | None,
                   absmax_mean: torch.Tensor | None, shape: tuple[int, int], block_size: int, dq_block_size: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """The NF4 weight (shape) in `dtype` by the byte -> level-pair table: level x absmax rounded in `dtype` (for
    16-bit dtypes that is one rounding more than the float32 `NF4Tensor.dequantize`, within a 16-bit ulp)."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        dtype = torch.float32
    pairs = _level_pairs(dtype, codes.device).index_select(0, codes.int())  # (n_padded / 2,) two levels each
    values = pairs.view(dtype).view(-1, block_size)  # (n_blocks, block)
    a = nf4_block_absmax(absmax, absmax_scale, absmax_mean, dq_block_size).to(dtype)
    n = shape[0] * shape[1]
    return (values * a[:, None]).flatten()[:n].view(shape)


def nf4_reference(x: torch.Tensor, codes, absmax, absmax_scale, absmax_mean, block_size: int,
                  dq_block_size: int, out_features: int) -> torch.Tensor:
    w = nf4_dequantize(codes, absmax, absmax_scale, absmax_mean, (out_features, x.shape[-1]), block_size,
                       dq_block_size, x.dtype)
    return F.linear(x, w.to(x.dtype))


# ------------------------------------------------------------------------------------------------ kernel launches


def _kernels():
    from . import qkernel_triton

    return qkernel_triton


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _lut(device: torch.device) -> torch.Tensor:
    return _nf4_lut(device.type, device.index)


@functools.cache
def _nf4_lut(kind: str, index: int | None) -> torch.Tensor:
    return NF4_LEVELS.to(torch.device(kind, index))  # 64 bytes: one cache line (allocations are 512-byte aligned)


@functools.cache
def _kn_level_pairs(kind: str, index: int | None) -> torch.Tensor:
    """(256,) int64 for the K-major NF4 GEMV: byte b of a K-major code word -> (NF4_LEVELS[b & 15] for its even
    input column, NF4_LEVELS[b >> 4] for its odd one) as fp32 bits, the even one in the low word (2 KiB, in L1)."""
    b = torch.arange(256)
    pairs = torch.stack([NF4_LEVELS[b & 15], NF4_LEVELS[b >> 4]], dim=-1).float().contiguous()  # (256, 2)
    return pairs.view(torch.int64).flatten().to(torch.device(kind, index))


def _launch_q4(x, qweight, s, z, ss, mean, N: int, group: int, nf4: bool, dq_block: int, path: str,
               tiles: tuple | None = None):
    """Run the 4-bit GEMV or GEMM (`tiles`: as `_tiles` chooses for this call, or forced: the self-check runs the
    tiles of the call it vouches for); s/z/ss/mean: INT4's scale/zero, or NF4's absmax/absmax_scale/absmax_mean."""
    M, K = x.shape
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    k = _kernels()
    dq = ss is not None
    lut = _lut(x.device) if nf4 else s
    args = (x, qweight, s, z if z is not None else s, ss if dq else s, mean if dq else s, lut, y)
    flags = dict(GROUP=group, HALF=group // 2, NF4=nf4, DQ=dq, DQ_BLOCK=dq_block)
    tiles = tiles or _tiles("nf4" if nf4 else "int4", path, M, N, x.device)
    if path == "gemv":
        block_n, cols, warps, magic, late = (*tiles, 0, 0)[:5]  # + the inner loop's MAGIC / LATE switches
        k.q4_gemv_kernel[(M, triton_cdiv(N, block_n))](*args, N, K, x.stride(0), y.stride(0), BLOCK_N=block_n,
                                                       BLOCK_G=max(1, cols // group), num_warps=warps,
                                                       MAGIC=bool(magic), LATE=bool(late), **flags)
    else:
        block_m, block_n = tiles
        k.q4_gemm_kernel[(triton_cdiv(M, block_m), triton_cdiv(N, block_n))](
            *args[:7], y, M, N, K, x.stride(0), y.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
            num_stages=2, **flags)
    return y


def _launch_int8(x, qweight, scale, path: str, tiles: tuple | None = None, fuse: Fuse | None = None,
                 pdl: bool = False):
    """The INT8 GEMV / GEMM; `fuse`: the decode fusions (in the GEMV's kernel, else by torch ops around it)."""
    if fuse is not None and path != "gemv":
        return _unfused(lambda x: _launch_int8(x, qweight, scale, path, tiles), x, fuse)
    M = x.shape[0]
    N, K = qweight.shape
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    k = _kernels()
    tiles = tiles or _tiles("int8", path, M, N, x.device)
    if path == "gemv":
        block_n, cols, warps, magic = (*tiles, 0)[:4]
        magic = int(magic) if K % 4 == 0 and cols >= 4 else 0  # codes read four to an int32 word
        args, flags = _fuse_args(fuse, x, y, K)
        flags["NORM_BLOCK"] = min(flags["NORM_BLOCK"], cols)  # the squares come with each step's columns
        k.int8_gemv_kernel[(M, triton_cdiv(N, block_n))](x, qweight.view(torch.int32) if magic else qweight, scale,
                                                         y, N, K, x.stride(0), y.stride(0), *args, BLOCK_N=block_n,
                                                         BLOCK_K=cols, num_warps=warps, MAGIC=magic, **flags,
                                                         **pdl_options(x.device, pdl))
    else:
        block_m, block_n, splits = (*tiles, -1)[:3]
        splits = _gemm_splits(M, N, K, block_m, block_n, 64, splits, x.device)
        out = y if splits == 1 else torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
        k.int8_gemm_kernel[(triton_cdiv(M, block_m), triton_cdiv(N, block_n), splits)](
            x, qweight, scale, out, M, N, K, x.stride(0), N, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64,
            K_SPLIT=K // splits if splits > 1 else 0, num_warps=4, num_stages=2)
        if splits > 1:
            k.splitk_sum_kernel[(triton_cdiv(M * N, 1024),)](out, y, M * N, SPLITS=splits, BLOCK=1024, num_warps=4)
    return y


def _gemm_splits(M: int, N: int, K: int, block_m: int, block_n: int, block_k: int, splits: int,
                 device: torch.device) -> int:
    """K splits of a GEMM: `splits`, or by shape (< 0): enough (M, N) tiles x splits for two programs per SM, each
    split at least 4 steps of block_k; lowered to a count whose slices are whole steps."""
    if splits < 0:
        tiles_mn = triton_cdiv(M, block_m) * triton_cdiv(N, block_n)
        splits = max(1, min(2 * _sm_count(device) // tiles_mn, K // (4 * block_k)))
    if K % block_k:
        return 1
    return K // (block_k * _kn_steps(K, block_k, K // (block_k * max(splits, 1))))


def _gemm_magic(magic: int, nf4: bool, words: int, s: torch.Tensor, x: torch.Tensor) -> int:
    """The K-major GEMM's MAGIC for the asked `magic`: 2 (code words to 16-bit weight pairs) needs code words loaded
    once, a 16-bit input and (INT4) scales in its dtype; else the exponent trick (1)."""
    if magic == 2 and (not words or x.dtype not in (torch.bfloat16, torch.float16) or not nf4 and s.dtype != x.dtype):
        return 1
    return magic


def pack_kn(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes uint8 (N, K) in [0, 15] -> int32 (K / 8, N), input column 8i + j in bits 4j..4j+3 of word
    [i, n] (GPTQ's qweight order; `qkernel_triton`'s K-major kernels read it)."""
    N, K = codes.shape
    c = codes.T.reshape(K // 8, 8, N).to(torch.int32)
    word = torch.zeros(K // 8, N, dtype=torch.int32, device=codes.device)
    for j in range(8):
        word |= c[:, j] << (4 * j)  # j = 7 sets the sign bit: the kernels mask after shifting
    return word


def unpack_kn(word: torch.Tensor) -> torch.Tensor:
    """int32 (K / 8, N) -> codes uint8 (N, K), the inverse of `pack_kn`."""
    shifts = torch.arange(0, 32, 4, device=word.device, dtype=torch.int32)
    c = (word[:, None, :] >> shifts[None, :, None]) & 0xF  # (K / 8, 8, N)
    return c.reshape(-1, word.shape[1]).T.to(torch.uint8).contiguous()


def _kn_steps(K: int, block_k: int, steps: int) -> int:
    """Input-column steps per GEMV program: `steps` (0: all of K, no split), lowered until it divides K's steps."""
    total = K // block_k
    steps = total if steps <= 0 else min(steps, total)
    while total % steps:
        steps -= 1
    return steps


def _dequant_q4kn(qw, s, z, N: int, K: int, group: int, nf4: bool, tiles: tuple, dtype, lut, ss, mean, dq):
    """The (K, N) weight of K-major 4-bit codes in `dtype`, one Triton pass."""
    words, block_n, warps = tiles
    words = min(words, group // 8)
    w = torch.empty(K, N, dtype=dtype, device=qw.device)
    _kernels().q4kn_dequant_kernel[(K // (8 * words), triton_cdiv(N, block_n))](
        qw, s, z, ss, mean, lut, w, N, K, GROUP=group, NF4=nf4, BLOCK_N=block_n, WORDS=words, num_warps=warps, **dq)
    return w


_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _finish_workspace(device: torch.device, M: int, N: int, blocks: int):
    """The zeroed fp32 (M, N) sums and int32 (M, blocks) counters of the one-kernel split-K GEMV (atomic=2), per
    device and shape; each call leaves them zeroed for the next, so calls of one shape must not overlap (one stream:
    the engine's decode step, eager or replayed). None inside a CUDA-graph capture when not made yet (made outside
    it, a workspace is a fixed address every replay uses; the warm-up before a capture makes it, whatever stream)."""
    key = (device, M, N, blocks)
    if key not in _workspaces:
        if _capturing(device):
            return None, None
        _workspaces[key] = (torch.zeros(M, N, dtype=torch.float32, device=device),
                            torch.zeros(M, blocks, dtype=torch.int32, device=device))
    return _workspaces[key]


def _launch_q4kn(x, qw, s, z, N: int, group: int, nf4: bool, path: str, tiles: tuple, ss=None, mean=None,
                 dq_block: int = 256, fuse: Fuse | None = None, pdl: bool = False):
    """The K-major 4-bit GEMV / GEMM (`qkernel_triton.q4kn_*`). GEMV tiles: (columns per program, input columns per
    step, warps, steps per program[, atomic, magic, flat]): fewer steps split K over more programs, whose fp32 partial
    sums one more kernel adds in a fixed order (atomic=1: atomically into a zeroed buffer instead; atomic=2: into a
    persistent one, the last split of each column block writing the output: one kernel a call; magic=1: INT4
    nibbles masked in place under an exponent, NF4 levels a byte at a time from a pair table; magic=2: INT4 nibble
    pairs shifted to bits 12-19 (no float subtract per weight), NF4 levels by byte permutes in registers, on CUDA;
    flat=1: two-dimensional tiles, each code word loaded by its 8 input columns); "dequant": the (K, N) weight
    written once by `q4kn_dequant_kernel` (tiles: code words per program, columns, warps), then cuBLAS; GEMM tiles:
    (BLOCK_M, BLOCK_N, BLOCK_K, warps[, K splits[, magic[, words[, pipeline stages]]]]): splits -1 or absent: by
    shape, the partial sums added as the GEMV's; magic=1: INT4 nibbles to float by the exponent trick, magic=2
    (`_gemm_magic`: words=1, a 16-bit input, INT4 scales in its dtype; else magic=1): each code word to its 8
    weights two to a register (`qkernel_triton._q4_half2` / `_nf4_half2`); words=1: each code word loaded once and
    unpacked in registers; stages: software pipelining depth, 2 if absent). `fuse`: the decode fusions, in the
    GEMV's kernel where one program writes each output (one split, or atomic=2), else by torch ops around the launch;
    `pdl`: programmatic dependent launch."""
    if fuse is not None and path != "gemv":
        return _unfused(lambda x: _launch_q4kn(x, qw, s, z, N, group, nf4, path, tiles, ss, mean, dq_block), x, fuse)
    M, K = x.shape[0], qw.shape[0] * 8
    k = _kernels()
    lut = _lut(x.device) if nf4 else s
    z = s if z is None else z
    dq = dict(DQ=0 if ss is None else 2 if mean.numel() > 1 else 1, DQ_BLOCK=dq_block)  # 2: a mean per dq block
    ss, mean = (s, s) if ss is None else (ss, mean)
    if path == "gemv":
        block_n, block_k, warps, steps, atomic, magic, flat = (*tiles, 0, 0, 0)[:7]
        if nf4 and magic == 2 and (x.device.type != "cuda" or flat):
            magic = 1  # the byte-permute lookup is inline PTX: the pair table elsewhere (the Triton interpreter)
        if nf4 and magic == 1 and not flat:
            lut = _kn_level_pairs(x.device.type, x.device.index)
        block_k = min(block_k, group)
        steps = _kn_steps(K, block_k, steps)
        splits = K // (block_k * steps)
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        counters = y
        if splits > 1 and atomic == 2:
            out, counters = _finish_workspace(x.device, M, N, triton_cdiv(N, block_n))
            atomic = 2 if out is not None else 1  # first met inside a CUDA-graph capture: the memset form
        if splits == 1 or atomic != 2:
            if fuse is not None and splits > 1:  # the split sums meet outside the kernel: fusions by torch ops
                return _unfused(lambda x: _launch_q4kn(x, qw, s, z, N, group, nf4, path, tiles, ss, mean, dq_block,
                                                       pdl=pdl), x, fuse)
            out = y if splits == 1 else torch.zeros(M, N, dtype=torch.float32, device=x.device) if atomic else \
                torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
        args, flags = _fuse_args(fuse, x, y, K)
        k.q4kn_gemv_kernel[(M, triton_cdiv(N, block_n), splits)](
            x, qw, s, z, ss, mean, lut, out, counters, y, N, K, x.stride(0), N, *args, GROUP=group, NF4=nf4,
            BLOCK_N=block_n, BLOCK_K=block_k, STEPS=steps, ATOMIC=int(atomic) if splits > 1 else 0,
            MAGIC=int(magic), FLAT=bool(flat), num_warps=warps, **dq, **flags, **pdl_options(x.device, pdl))
        if splits == 1 or atomic == 2:
            return y
        if atomic:
            return out.to(x.dtype)
        k.splitk_sum_kernel[(triton_cdiv(M * N, 1024),)](out, y, M * N, SPLITS=splits, BLOCK=1024, num_warps=4)
        return y
    if path == "dequant":
        return x @ _dequant_q4kn(qw, s, z, N, K, group, nf4, tiles, x.dtype, lut, ss, mean, dq)
    block_m, block_n, block_k, warps = tiles[:4]
    splits = tiles[4] if len(tiles) > 4 else -1
    magic = tiles[5] if len(tiles) > 5 else 0
    words = tiles[6] if len(tiles) > 6 else 0
    stages = tiles[7] if len(tiles) > 7 else 2
    magic = _gemm_magic(magic, nf4, words, s, x)
    block_k = min(block_k, group)
    splits = _gemm_splits(M, N, K, block_m, block_n, block_k, splits, x.device)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    out = y if splits == 1 else torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    k.q4kn_gemm_kernel[(triton_cdiv(M, block_m), triton_cdiv(N, block_n), splits)](
        x, qw, s, z, ss, mean, lut, out, M, N, K, x.stride(0), N, GROUP=group, NF4=nf4, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages, K_SPLIT=K // splits if splits > 1 else 0,
        MAGIC=int(magic), WORDS=bool(words), ASM=x.is_cuda, **dq)
    if splits > 1:
        k.splitk_sum_kernel[(triton_cdiv(M * N, 1024),)](out, y, M * N, SPLITS=splits, BLOCK=1024, num_warps=4)
    return y


# The GEMV's default tiles per format: (rows per program, input columns per step, warps, then the inner loop's
# MAGIC[/LATE] switches), the fastest summed over Llama-3-8B's qkv, o, gate_up and down shapes in
# `bench/qkernel_tiles.py --quick` (docs/benchmarks.md). K-major (what CUDA layers are prepared into): (output columns
# per program, input columns per step, warps, steps per program[, atomic, magic, flat]): short K slices whose fp32
# sums meet atomically in a persistent workspace the last slice writes out (atomic=2: one kernel a call; not
# bit-identical run to run: force INT4 64 x 128 x 2 x 4 or NF4 64 x 64 x 2 x 4 x 0 x 1 for a fixed order), codes
# unpacked in registers (magic=2). On an H200 these were the fastest (4% ahead of atomic=1); on an H100 their atomic=1
# form was within 1% of the best, and against the former defaults INT4 took 21% less time (a float subtract and
# int-to-float conversions before), NF4 59% less (byte permutes instead of a 256-entry pair table), INT8 9% less
# (bytes masked in place, magic=1).
GEMV_TILES = {"int8": (8, 1024, 4, 1), "int4": (8, 1024, 4, 0, 0), "nf4": (16, 1024, 4, 0, 0),
              "int4kn": (512, 64, 4, 1, 2, 2, 0), "nf4kn": (512, 64, 4, 1, 2, 2, 0)}
# the K-major INT4 GEMM's code words to weights: 0 int-to-float conversions, 1 the exponent trick, 2 each word to its
# 8 weights in the input's 16-bit dtype, two to a register (3.9 machine instructions a weight in the sm_90 loop
# against 8.1 and a quarter-rate conversion for 0: `bench/qkernel_sass.py --gemm`)
KN_GEMM_MAGIC = 2
KN_GEMM_WORDS = True  # ... and its code words loaded once, unpacked in registers (18-27% faster at 64 rows, H200)
# ... and its tiles past BLOCK_M (by the rows): BLOCK_N (None: by shape, `_gemm_blocks`), BLOCK_K, warps, K splits
# (-1: by shape), pipeline stages
KN_GEMM_TILES: tuple[int | None, int, int, int, int] = (None, 128, 4, -1, 2)


def _gemv_tiles(fmt: str, forced: list[int] | None = None) -> tuple[int, ...]:
    """The one-row GEMV's tiles for `fmt` ("int8", "int4", "nf4"): forced (`QuantKernels.gemv_tiles`) or
    `GEMV_TILES`. A one-row matmul is latency-bound unless many bytes are in flight; per-format because NF4's table
    lookups and INT4's nibble unpacking cost registers that the wide INT8 tiles do not."""
    return tuple(forced) if forced else GEMV_TILES[fmt]


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _gemm_blocks(M: int, N: int, device: torch.device) -> tuple[int, int]:
    """Output tile: as many rows as the input has (16/32/64), and columns narrow enough to give every SM work."""
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    tiles_m = triton_cdiv(M, block_m)
    sms = _sm_count(device)
    block_n = next((bn for bn in (128, 64) if tiles_m * triton_cdiv(N, bn) >= sms), 32)
    return block_m, block_n


def _tiles(fmt: str, path: str, M: int, N: int, device: torch.device, gemv_tiles: list[int] | None = None) -> tuple:
    """The tiles a call of M rows runs with (`gemv_tiles`: forced for the GEMV, `QuantKernels.gemv_tiles`)."""
    if path == "gemv":
        return _gemv_tiles(fmt, gemv_tiles)
    if path == "dequant":
        return (8, 128, 4)  # code words (64 input rows) x columns per program, warps
    block_m, block_n = _gemm_blocks(M, N, device)
    bn, bk, warps, splits, stages = KN_GEMM_TILES
    return (block_m, bn or block_n, bk, warps, splits, int(KN_GEMM_MAGIC), int(KN_GEMM_WORDS), stages) \
        if fmt.endswith("kn") else \
        (block_m, block_n)


# K-major formats whose batched rows (5-256) dequantize once and call cuBLAS instead of the GEMM: NF4's table lookup
# in a tensor-core tile ran at 2% of the HBM roofline on an H100 (docs/benchmarks.md), far below one dequantizing pass.
# Its byte-permute level pairs (magic=2: 5.7 sm_90 loop instructions a weight, no loads) are not measured against it
# yet (`bench/qkernel_tiles.py --quick --formats nf4kn --paths gemm` compares them).
DEQUANT_GEMM = {"nf4kn"}


def _path(M: int, fmt: str = "") -> str | None:
    """Which kernel M input rows of format `fmt` take: the GEMV (decode), the GEMM, "dequant" (K-major 4-bit: the
    weight written once in 16 bits by a Triton pass, then cuBLAS), or None (dequantize + matmul in torch ops)."""
    if M <= GEMV_MAX_ROWS:
        return "gemv"
    if M <= GEMM_MAX_ROWS and fmt not in DEQUANT_GEMM:
        return "gemm"
    return "dequant" if fmt.endswith("kn") else None


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _run(key: tuple, x: torch.Tensor, N: int, launch, reference, check,
         gemv_tiles: list[int] | None = None, fuse: Fuse | None = None, pdl: bool = False) -> torch.Tensor:
    """The kernel `launch(path, tiles)` where it is verified (checking that variant first if need be: format,
    path, tiles, dtype, fusions, PDL), else `reference()`."""
    path = _path(x.shape[0], key[0])
    if path is None:
        return reference()
    tiles = _tiles(key[0], path, x.shape[0], N, x.device, gemv_tiles)
    pdl = bool(pdl_options(x.device, pdl)) and path == "gemv"
    tag = fuse.tag() if fuse is not None and path == "gemv" else ""
    check = functools.partial(check, fused=tag, pdl=pdl)
    key = key + (path, "x".join(map(str, tiles)), str(x.dtype).removeprefix("torch."), x.device.type) + \
        ((tag,) if tag else ()) + (("pdl",) if pdl else ())
    state = _status.get(key)
    if state is None:
        if _capturing(x.device):  # a check syncs: never inside a capture (the warm-up before it runs the check)
            return reference()
        state = _status[key] = _verify(key, check, path, tiles, x.dtype, x.device)
    if state is not True:
        return reference()
    try:
        return launch(path, tiles)
    except Exception as e:  # noqa: BLE001 -- a kernel that cannot run must never take the model down
        _status[key] = f"launch failed: {type(e).__name__}: {e}"
        log.warning("quantized matmul kernel %s failed (%s); using dequantize + matmul from now on",
                    "/".join(map(str, key)), _status[key])
        return reference()


def _verify(key: tuple, check, path: str, tiles: tuple, dtype: torch.dtype, device: torch.device) -> bool | str:
    """Run `check(M, dtype, device, tiles) -> (kernel output, reference output)` on a small random problem."""
    M = 3 if path == "gemv" else 20
    try:
        got, want = check(M, dtype, device, tiles, path)
        err = (got.float() - want.float()).abs().max().item()
        tol = 2e-2 * want.float().abs().max().item() + 1e-2
        ok: bool | str = True if torch.isfinite(got).all() and err <= tol else \
            f"disagrees with the reference (max error {err:.3g} > {tol:.3g})"
    except Exception as e:  # noqa: BLE001
        ok = f"{type(e).__name__}: {e}"
    name = "/".join(map(str, key))
    if ok is True:
        log.info("quantized matmul kernel %s verified", name)
    else:
        log.warning("quantized matmul kernel %s is off (%s); using dequantize + matmul", name, ok)
    return ok


def _probe(device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def _probe_fuse(fused: str, x: torch.Tensor, N: int, g: torch.Generator) -> tuple[torch.Tensor, Fuse | None]:
    """A check's kernel input and random operands of the fusions named in `fused` ("norm+res", ...; "": none)."""
    if not fused:
        return x, None
    on, (M, K), kw = set(fused.split("+")), x.shape, dict(generator=g, device=x.device)
    if "silu" in on:
        x = torch.randn(M, 2 * K, **kw).to(x.dtype)
    norm = ((torch.rand(K, **kw) + 0.5).to(x.dtype), 1e-5, 0.0) if "norm" in on else None
    bias = torch.randn(N, **kw).to(x.dtype) if "bias" in on else None
    res = torch.randn(M, N, **kw).to(x.dtype) if "res" in on else None
    return x, Fuse(norm, "silu" in on, bias, res)


def _check_int8(M: int, dtype, device, tiles=None, path=None, fused: str = "", pdl: bool = False):
    g = _probe(device)
    N, K = 72, 576
    q = torch.randint(-127, 128, (N, K), generator=g, device=device, dtype=torch.int8)
    s = (torch.rand(N, generator=g, device=device) * 0.01 + 1e-3).to(dtype)
    x, fuse = _probe_fuse(fused, torch.randn(M, K, generator=g, device=device).to(dtype), N, g)
    return _launch_int8(x, q, s, _path(M), tiles, fuse, pdl), _unfused(lambda x: int8_reference(x, q, s), x, fuse)


def _check_int4(group: int):
    def check(M: int, dtype, device, tiles=None, path=None, fused: str = "", pdl: bool = False):
        g = _probe(device)
        N, K = 72, 3 * group
        qw = torch.randint(0, 256, (N, K // 2), generator=g, device=device, dtype=torch.uint8)
        s = (torch.rand(N, 3, generator=g, device=device) * 0.05 + 1e-3).to(dtype)
        z = torch.randint(0, 16, (N, 3), generator=g, device=device, dtype=torch.uint8)
        x = torch.randn(M, K, generator=g, device=device).to(dtype)
        return _launch_q4(x, qw, s, z, None, None, N, group, False, 0, _path(M), tiles), \
            int4_reference(x, qw, s, z)
    return check


def _check_int4kn(group: int):
    def check(M: int, dtype, device, tiles=None, path=None, fused: str = "", pdl: bool = False):
        g = _probe(device)
        N, K = 72, 3 * group
        codes = torch.randint(0, 16, (N, K), generator=g, device=device, dtype=torch.uint8)
        s = (torch.rand(K // group, N, generator=g, device=device) * 0.05 + 1e-3).to(dtype)
        z = torch.randint(0, 16, (K // group, N), generator=g, device=device, dtype=torch.uint8)
        x, fuse = _probe_fuse(fused, torch.randn(M, K, generator=g, device=device).to(dtype), N, g)
        w = int4_dequantize(codes, s.T, z.T, dtype)
        return _launch_q4kn(x, pack_kn(codes), s, z, N, group, False, path or _path(M, "int4kn"), tiles,
                            fuse=fuse, pdl=pdl), _unfused(lambda x: F.linear(x, w), x, fuse)
    return check


def _check_nf4(block: int, dq: bool, dq_block: int):
    def check(M: int, dtype, device, tiles=None, path=None, fused: str = "", pdl: bool = False):
        from .nf4 import quantize_nf4

        g = _probe(device)
        N, K = 72, 3 * block
        t = quantize_nf4(torch.randn(N, K, generator=g, device=device), block, dq, dq_block)
        x = torch.randn(M, K, generator=g, device=device).to(dtype)
        got = _launch_q4(x, t.codes, t.absmax, None, t.absmax_scale, t.absmax_mean, N, block, True, dq_block,
                         _path(M), tiles)
        return got, F.linear(x, t.dequantize(dtype))
    return check


# ------------------------------------------------------------------------------------------------ the ops


def _fuse(norm_weight, norm_eps, norm_offset, silu, bias, residual) -> Fuse | None:
    """The ops' fusion arguments as a `Fuse` (None: a plain matmul)."""
    if norm_weight is None and not silu and bias is None and residual is None:
        return None
    return Fuse(None if norm_weight is None else (norm_weight, norm_eps, norm_offset), silu, bias, residual)


@torch.library.custom_op("lmforge::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, gemv_tiles: list[int] | None = None,
                norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0, norm_offset: float = 0.0,
                silu: bool = False, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                pdl: bool = False) -> torch.Tensor:
    """x (M, K), qweight int8 (N, K), scale (N,) -> (M, N) = (x @ qweight.T) * scale. `gemv_tiles`: forced GEMV
    tiles (`QuantKernels.gemv_tiles`), as in the other ops; the rest: the decode fusions (`Fuse`: RMSNorm or
    SwiGLU gating of x, bias, residual; no backward) and programmatic dependent launch of the GEMV."""
    x, fuse = x.contiguous(), _fuse(norm_weight, norm_eps, norm_offset, silu, bias, residual)
    ref = lambda x: int8_reference(x, qweight, scale)  # noqa: E731
    if not use_kernel(x):
        return _unfused(ref, x, fuse)
    return _run(("int8",), x, qweight.shape[0],
                lambda path, tiles: _launch_int8(x, qweight.contiguous(), scale.contiguous(), path, tiles, fuse, pdl),
                lambda: _unfused(ref, x, fuse), _check_int8, gemv_tiles, fuse, pdl)


@int8_linear.register_fake
def _(x, qweight, scale, gemv_tiles=None,
      norm_weight=None, norm_eps=0.0, norm_offset=0.0, silu=False, bias=None, residual=None, pdl=False):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("lmforge::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                group_size: int, gemv_tiles: list[int] | None = None) -> torch.Tensor:
    """x (M, K), qweight uint8 (N, K / 2), scale/zero (N, K / group_size) -> (M, N) = x @ ((q - zero) scale).T."""
    x = x.contiguous()
    if not (use_kernel(x) and group_ok(group_size)):
        return int4_reference(x, qweight, scale, zero)
    N = qweight.shape[0]
    return _run(("int4", group_size), x, N,
                lambda path, tiles: _launch_q4(x, qweight.contiguous(), scale.contiguous(), zero.contiguous(), None,
                                               None, N, group_size, False, 0, path, tiles),
                lambda: int4_reference(x, qweight, scale, zero), _check_int4(group_size), gemv_tiles)


@int4_linear.register_fake
def _(x, qweight, scale, zero, group_size, gemv_tiles=None):
    return x.new_empty(x.shape[0], qweight.shape[0])


def int4kn_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x @ W.T for INT4 in the K-major layout (`pack_kn`): qweight int32 (K / 8, N), scale/zero (K / G, N)."""
    return F.linear(x, int4_dequantize(unpack_kn(qweight), scale.T, zero.T, x.dtype))


@torch.library.custom_op("lmforge::int4kn_linear", mutates_args=())
def int4kn_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  group_size: int, gemv_tiles: list[int] | None = None,
                  norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0, norm_offset: float = 0.0,
                  silu: bool = False, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                  pdl: bool = False) -> torch.Tensor:
    """x (M, K) -> (M, N) against INT4 in the K-major layout: the split-K GEMV / the GEMM of `qkernel_triton`
    (fusions and `pdl` as `int8_linear`)."""
    x, fuse = x.contiguous(), _fuse(norm_weight, norm_eps, norm_offset, silu, bias, residual)
    ref = lambda x: int4kn_reference(x, qweight, scale, zero)  # noqa: E731
    if not (use_kernel(x) and group_ok(group_size)):
        return _unfused(ref, x, fuse)
    N = qweight.shape[1]
    return _run(("int4kn", group_size), x, N,
                lambda path, tiles: _launch_q4kn(x, qweight.contiguous(), scale.contiguous(), zero.contiguous(), N,
                                                 group_size, False, path, tiles, fuse=fuse, pdl=pdl),
                lambda: _unfused(ref, x, fuse), _check_int4kn(group_size), gemv_tiles, fuse, pdl)


@int4kn_linear.register_fake
def _(x, qweight, scale, zero, group_size, gemv_tiles=None,
      norm_weight=None, norm_eps=0.0, norm_offset=0.0, silu=False, bias=None, residual=None, pdl=False):
    return x.new_empty(x.shape[0], qweight.shape[1])


def nf4kn_weight(codes: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor | None,
                 absmax_mean: torch.Tensor | None, block_size: int, dq_block_size: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight of NF4 in the K-major layout: codes int32 (K / 8, N), absmax (K / block, N)."""
    a = absmax.T.float()  # (N, K / block), blocks numbered by row as in the row layout
    if absmax_scale is not None:  # absmax_mean: one value, or one per dq block (a packed layer's, `NF4Linear.pack`)
        dq = torch.arange(a.numel(), device=a.device).view(a.shape) // dq_block_size
        a = a * absmax_scale[dq] + (absmax_mean[dq] if absmax_mean.numel() > 1 else absmax_mean)
    levels = NF4_LEVELS.to(codes.device)[unpack_kn(codes).long()]  # (N, K)
    return (levels.view(a.shape[0], a.shape[1], block_size) * a[..., None]).flatten(1).to(dtype)


def _check_nf4kn(block: int, dq: bool | str, dq_block: int):
    """dq: False, True, or "means" (a mean per dq block, as packed layers hold them)."""
    def check(M: int, dtype, device, tiles=None, path=None, fused: str = "", pdl: bool = False):
        from .nf4 import quantize_nf4

        g = _probe(device)
        N, K = 72, 3 * block
        t = quantize_nf4(torch.randn(N, K, generator=g, device=device), block, bool(dq), dq_block)
        codes = pack_kn(unpack_nibbles(t.codes).view(N, K))
        absmax = t.absmax.view(N, K // block).T.contiguous()
        mean = t.absmax_mean
        if dq == "means":
            mean = mean + 0.01 * torch.rand(t.absmax_scale.shape, generator=g, device=device)
        x, fuse = _probe_fuse(fused, torch.randn(M, K, generator=g, device=device).to(dtype), N, g)
        got = _launch_q4kn(x, codes, absmax, None, N, block, True, path or _path(M, "nf4kn"), tiles, t.absmax_scale,
                           mean, dq_block, fuse, pdl)
        w = nf4kn_weight(codes, absmax, t.absmax_scale, mean, block, dq_block, dtype)
        return got, _unfused(lambda x: F.linear(x, w), x, fuse)
    return check


@torch.library.custom_op("lmforge::nf4kn_linear", mutates_args=())
def nf4kn_linear(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor | None,
                 absmax_mean: torch.Tensor | None, block_size: int, dq_block_size: int,
                 gemv_tiles: list[int] | None = None,
                 norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0, norm_offset: float = 0.0,
                 silu: bool = False, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                 pdl: bool = False) -> torch.Tensor:
    """x (M, K) -> (M, N) against NF4 in the K-major layout (`NF4Linear.layout == "kn"`; fusions and `pdl` as
    `int8_linear`)."""
    x, fuse = x.contiguous(), _fuse(norm_weight, norm_eps, norm_offset, silu, bias, residual)
    ref = lambda x: F.linear(x, nf4kn_weight(codes, absmax, absmax_scale, absmax_mean, block_size,  # noqa: E731
                                             dq_block_size, x.dtype))
    if not (use_kernel(x) and group_ok(block_size)):
        return _unfused(ref, x, fuse)
    dq = absmax_scale is not None and ("means" if absmax_mean.numel() > 1 else True)
    N = codes.shape[1]
    return _run(("nf4kn", block_size, {False: "fp32", True: "dq", "means": "dq-means"}[dq]), x, N,
                lambda path, tiles: _launch_q4kn(x, codes.contiguous(), absmax.contiguous(), None, N, block_size, True,
                                                 path, tiles, absmax_scale, absmax_mean, dq_block_size, fuse, pdl),
                lambda: _unfused(ref, x, fuse), _check_nf4kn(block_size, dq, dq_block_size), gemv_tiles, fuse, pdl)


@nf4kn_linear.register_fake
def _(x, codes, absmax, absmax_scale, absmax_mean, block_size, dq_block_size, gemv_tiles=None,
      norm_weight=None, norm_eps=0.0, norm_offset=0.0, silu=False, bias=None, residual=None, pdl=False):
    return x.new_empty(x.shape[0], codes.shape[1])


@torch.library.custom_op("lmforge::nf4_linear", mutates_args=())
def nf4_linear(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor | None,
               absmax_mean: torch.Tensor | None, out_features: int, block_size: int,
               dq_block_size: int, gemv_tiles: list[int] | None = None) -> torch.Tensor:
    """x (M, K) against NF4Linear's buffers (out_features x K weight) -> (M, out_features)."""
    x = x.contiguous()
    ref = lambda: nf4_reference(x, codes, absmax, absmax_scale, absmax_mean, block_size,  # noqa: E731
                                dq_block_size, out_features)
    if not (use_kernel(x) and group_ok(block_size) and x.shape[1] % block_size == 0):
        return ref()
    dq = absmax_scale is not None
    return _run(("nf4", block_size, "dq" if dq else "fp32"), x, out_features,
                lambda path, tiles: _launch_q4(x, codes, absmax, None, absmax_scale, absmax_mean, out_features,
                                               block_size, True, dq_block_size, path, tiles),
                ref, _check_nf4(block_size, dq, dq_block_size), gemv_tiles)


@nf4_linear.register_fake
def _(x, codes, absmax, absmax_scale, absmax_mean, out_features, block_size, dq_block_size, gemv_tiles=None):
    return x.new_empty(x.shape[0], out_features)


# backward: dx = dy @ W (the weights are frozen buffers); the weight is dequantized for it


def _setup(ctx, inputs, output):
    ctx.inputs, ctx.in_features, ctx.n_inputs = inputs[1:], inputs[0].shape[-1], len(inputs)


def _grads(ctx, dx: torch.Tensor, fusions: bool = True) -> tuple:
    """dx and no gradient for the other inputs. The fused decode forms (`fusions`: the op's last seven inputs,
    norm_weight .. pdl, as `int8_linear`'s) have no backward: refused if one was used."""
    norm_weight, _, _, silu, bias, residual, _ = ctx.inputs[-7:] if fusions else (None,) * 7
    if norm_weight is not None or silu or bias is not None or residual is not None:
        raise NotImplementedError("the fused decode forms of the quantized matmuls have no backward")
    return (dx,) + (None,) * (ctx.n_inputs - 1)


def _int8_backward(ctx, dy):
    qweight, scale = ctx.inputs[:2]
    return _grads(ctx, dy @ (qweight.to(dy.dtype) * scale.to(dy.dtype)[:, None]))


def _int4_backward(ctx, dy):
    qweight, scale, zero = ctx.inputs[:3]
    return _grads(ctx, dy @ int4_dequantize(unpack_nibbles(qweight), scale, zero, dy.dtype), fusions=False)


def _int4kn_backward(ctx, dy):
    qweight, scale, zero = ctx.inputs[:3]
    return _grads(ctx, dy @ int4_dequantize(unpack_kn(qweight), scale.T, zero.T, dy.dtype))


def _nf4kn_backward(ctx, dy):
    codes, absmax, absmax_scale, absmax_mean, block_size, dq_block_size = ctx.inputs[:6]
    w = nf4kn_weight(codes, absmax, absmax_scale, absmax_mean, block_size, dq_block_size, dy.dtype)
    return _grads(ctx, dy @ w)


def _nf4_backward(ctx, dy):
    codes, absmax, absmax_scale, absmax_mean, out_features, block_size, dq_block_size = ctx.inputs[:7]
    w = nf4_dequantize(codes, absmax, absmax_scale, absmax_mean, (out_features, ctx.in_features), block_size,
                       dq_block_size, dy.dtype)
    return _grads(ctx, dy @ w, fusions=False)


int8_linear.register_autograd(_int8_backward, setup_context=_setup)
int4_linear.register_autograd(_int4_backward, setup_context=_setup)
int4kn_linear.register_autograd(_int4kn_backward, setup_context=_setup)
nf4kn_linear.register_autograd(_nf4kn_backward, setup_context=_setup)
nf4_linear.register_autograd(_nf4_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------ entry points


def _tiles_arg(kernels: QuantKernels) -> list[int] | None:
    return None if kernels.gemv_tiles is None else list(kernels.gemv_tiles)


def _fuse_kwargs(fuse: Fuse | None, kernels: QuantKernels) -> dict:
    """The ops' keyword arguments for `fuse` and `kernels.pdl`."""
    kw = {"pdl": kernels.pdl} if kernels.pdl else {}
    if fuse is None:
        return kw
    if fuse.norm is not None:
        kw.update(norm_weight=fuse.norm[0], norm_eps=float(fuse.norm[1]), norm_offset=float(fuse.norm[2]))
    if fuse.silu:
        kw["silu"] = True
    return {**kw, "bias": fuse.bias, "residual": fuse.residual}


def linear_int8(x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                kernels: QuantKernels = DEFAULT_KERNELS, fuse: Fuse | None = None) -> torch.Tensor:
    """(M, K) -> (M, N): the custom op where a kernel may run (and `kernels` allows), else the reference (plain
    ops: autograd, and torch.compile traces through them). `fuse`: the decode fusions (`QuantLinear.fused`)."""
    if use_kernel(x2d, kernels):
        return int8_linear(x2d, qweight, scale, _tiles_arg(kernels), **_fuse_kwargs(fuse, kernels))
    return _unfused(lambda x: int8_reference(x, qweight, scale), x2d, fuse)


def linear_int4(x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                group_size: int, kernels: QuantKernels = DEFAULT_KERNELS) -> torch.Tensor:
    if use_kernel(x2d, kernels) and group_ok(group_size):
        return int4_linear(x2d, qweight, scale, zero, group_size, _tiles_arg(kernels))
    return int4_reference(x2d, qweight, scale, zero)


def linear_int4kn(x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  group_size: int, kernels: QuantKernels = DEFAULT_KERNELS, fuse: Fuse | None = None) -> torch.Tensor:
    """As `linear_int4`, for the K-major layout (`Int4Linear.layout == "kn"`); `fuse` as `linear_int8`."""
    if use_kernel(x2d, kernels) and group_ok(group_size):
        return int4kn_linear(x2d, qweight, scale, zero, group_size, _tiles_arg(kernels), **_fuse_kwargs(fuse, kernels))
    return _unfused(lambda x: int4kn_reference(x, qweight, scale, zero), x2d, fuse)


def linear_nf4kn(x2d: torch.Tensor, codes, absmax, absmax_scale, absmax_mean, block_size: int, dq_block_size: int,
                 kernels: QuantKernels = DEFAULT_KERNELS, fuse: Fuse | None = None) -> torch.Tensor:
    """As `linear_nf4`, for the K-major layout; `fuse` as `linear_int8`."""
    if use_kernel(x2d, kernels) and group_ok(block_size):
        return nf4kn_linear(x2d, codes, absmax, absmax_scale, absmax_mean, block_size, dq_block_size,
                            _tiles_arg(kernels), **_fuse_kwargs(fuse, kernels))
    return _unfused(lambda x: F.linear(x, nf4kn_weight(codes, absmax, absmax_scale, absmax_mean, block_size,
                                                       dq_block_size, x.dtype)), x2d, fuse)


def linear_nf4(x2d: torch.Tensor, codes, absmax, absmax_scale, absmax_mean, out_features: int, block_size: int,
               dq_block_size: int, kernels: QuantKernels = DEFAULT_KERNELS) -> torch.Tensor:
    if use_kernel(x2d, kernels) and group_ok(block_size) and x2d.shape[1] % block_size == 0:
        return nf4_linear(x2d, codes, absmax, absmax_scale, absmax_mean, out_features, block_size, dq_block_size,
                          _tiles_arg(kernels))
    return nf4_reference(x2d, codes, absmax, absmax_scale, absmax_mean, block_size, dq_block_size, out_features)
