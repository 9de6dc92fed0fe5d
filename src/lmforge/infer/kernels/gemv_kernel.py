"""The Triton kernel behind `gemv` (see there); imported on first use, like the paged-attention one."""
import inspect

import triton
import triton.language as tl

try:  # programmatic dependent launch (Hopper+): the kernel overlaps the previous one's tail
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older triton: PDL is never requested (see gemv.use_pdl)
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def gemv_kernel(X, W, Bias, Y, N, K, stride_wn, NormW, Res, eps, norm_offset,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                SILU_MUL: tl.constexpr = False, NORM: tl.constexpr = False, NORM_OFFSET: tl.constexpr = False,
                RESIDUAL: tl.constexpr = False, PDL: tl.constexpr = False, ONE_TILE: tl.constexpr = False):
    """y[n] = sum_k W[n, k] x[k] (+ bias[n]) for BLOCK_N rows of W per program, fp32 accumulation.

    Each fusion rounds where the unfused ops would, so on the GPU the result is bit-equal to the separate ops (Triton's
    CPU interpreter truncates instead of rounding to nearest: within an ulp there):
    SILU_MUL: X holds 2K values [gate, up] and x = silu(gate) * up (the SwiGLU MLP's down projection reads the
      gate/up matmul's output directly).
    NORM: X is the residual stream and x = RMSNorm(X) with weight NormW (K,): every program first takes the
      sum of squares of X (K values, from L2), then normalizes each tile as it loads it; NORM_OFFSET scales by
      (norm_offset + weight) in fp32 (Gemma) instead of weight * normed.
    RESIDUAL: y + Res[n] (the block's residual add), out of place.
    PDL (programmatic dependent launch): the first weight tile (with the bias and, for one tile, the norm weights) is
      loaded before waiting for the previous kernel (parameters do not depend on it), and the next kernel may
      launch as soon as every program here has started. After the wait the residual is loaded with the input, so
      no load is left between the reduction and the store (in the one-row decode step each GEMV sits on the
      critical path: every L2 round trip after the wait counts).
    ONE_TILE (BLOCK_K >= K, known to the launcher): with NORM, X is read once for both the sum of squares and the
      product (every program reads it, so this halves the kernel's traffic from L2 for X)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_rows = W + rows[:, None].to(tl.int64) * stride_wn
    w = _w_tile(w_rows, row_ok, cols, 0, K, EVEN_K)  # (BLOCK_N, BLOCK_K): nothing before this reads X
    nw = 0.0
    if NORM and ONE_TILE:  # a parameter, like W: loaded before the wait, not after the sum of squares
        nw = tl.load(NormW + cols, mask=cols < K, other=0.0)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(Bias + rows, mask=row_ok, other=0.0)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    res = 0.0
    if RESIDUAL:  # issued with the input's loads, not after the reduction: one L2 round trip less at the end
        res = tl.load(Res + rows, mask=row_ok, other=0.0)
    rstd = 0.0
    if NORM and ONE_TILE:
        x = _normed_row(X, nw, cols, K, eps, norm_offset, NORM_OFFSET)
    else:
        if NORM:
            squares = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                v = tl.load(X + k + cols, mask=(k + cols) < K, other=0.0).to(tl.float32)
                squares += v * v
            rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        x = _x_tile(X, NormW, cols, 0, K, rstd, norm_offset, EVEN_K, SILU_MUL, NORM, NORM_OFFSET)
    acc = w.to(tl.float32) * x.to(tl.float32)[None, :]
    for k in range(BLOCK_K, K, BLOCK_K):
        w = _w_tile(w_rows, row_ok, cols, k, K, EVEN_K)
        x = _x_tile(X, NormW, cols, k, K, rstd, norm_offset, EVEN_K, SILU_MUL, NORM, NORM_OFFSET)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    _store_rows(tl.sum(acc, axis=1), rows, row_ok, bias, res, Y, HAS_BIAS, RESIDUAL)


@triton.jit
def gemv_rows_kernel(X, W, Bias, Y, N, K, stride_wn, NormW, Res, eps, norm_offset,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SILU_MUL: tl.constexpr = False, NORM: tl.constexpr = False, NORM_OFFSET: tl.constexpr = False,
                     RESIDUAL: tl.constexpr = False, PDL: tl.constexpr = False):
    """`gemv_kernel` with one K tile (BLOCK_K >= K) and a fixed number of programs, each walking row blocks
    pid, pid + P, ... (P programs): the input (normalized, or SiLU·mul-ed) is prepared once per program instead of
    once per BLOCK_N rows, and the next block's weights are loaded while the current one is reduced. Same fusions
    and rounding as `gemv_kernel`."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_N
    cols = tl.arange(0, BLOCK_K)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _w_tile(W + rows[:, None].to(tl.int64) * stride_wn, rows < N, cols, 0, K, False)  # before any wait
    nw = 0.0
    if NORM:
        nw = tl.load(NormW + cols, mask=cols < K, other=0.0)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    if NORM:
        x = _normed_row(X, nw, cols, K, eps, norm_offset, NORM_OFFSET)
    else:
        x = _x_tile(X, NormW, cols, 0, K, 0.0, norm_offset, False, SILU_MUL, NORM, NORM_OFFSET)
    x = x.to(tl.float32)[None, :]
    for start in range(pid * BLOCK_N, N, step):
        rows = start + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        after = rows + step
        w_next = _w_tile(W + after[:, None].to(tl.int64) * stride_wn, after < N, cols, 0, K, False)
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(Bias + rows, mask=row_ok, other=0.0)
        res = 0.0
        if RESIDUAL:
            res = tl.load(Res + rows, mask=row_ok, other=0.0)
        _store_rows(tl.sum(w.to(tl.float32) * x, axis=1), rows, row_ok, bias, res, Y, HAS_BIAS, RESIDUAL)
        w = w_next


@triton.jit
def _store_rows(y, rows, row_ok, bias, res, Y, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr):
    """Y[rows] = y (+ bias) (rounded, then + res), in Y's dtype; the caller loads the bias and residual values
    (a GEMV with its inputs, before the reduction, so their round trips overlap the weights')."""
    if HAS_BIAS:
        y += bias.to(tl.float32)
    if RESIDUAL:
        y = y.to(Y.dtype.element_ty).to(tl.float32) + res.to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=row_ok)


@triton.jit
def _w_tile(w_rows, row_ok, cols, k, K, EVEN_K: tl.constexpr):
    """Columns k .. k + BLOCK_K of this program's weight rows, streamed past the caches."""
    if EVEN_K:
        return tl.load(w_rows + k + cols[None, :], mask=row_ok[:, None], other=0.0, eviction_policy="evict_first")
    return tl.load(w_rows + k + cols[None, :], mask=row_ok[:, None] & ((k + cols) < K)[None, :], other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def _x_tile(X, NormW, cols, k, K, rstd, norm_offset, EVEN_K: tl.constexpr, SILU_MUL: tl.constexpr,
            NORM: tl.constexpr, NORM_OFFSET: tl.constexpr):
    """Input values k .. k + BLOCK_K in X's dtype, after the fused SiLU·mul or RMSNorm (rounded as the ops do)."""
    k_ok = (k + cols) < K
    if EVEN_K:
        x = tl.load(X + k + cols)
    else:
        x = tl.load(X + k + cols, mask=k_ok, other=0.0)
    if SILU_MUL:
        gate = x.to(tl.float32)
        up = tl.load(X + K + k + cols, mask=k_ok, other=0.0).to(tl.float32)
        x = (gate / (1.0 + tl.exp(-gate)) * up).to(x.dtype)
    if NORM:
        x = _normed(x, NormW, cols, k, K, rstd, norm_offset, NORM_OFFSET)
    return x


@triton.jit
def _normed_row(X, nw, cols, K, eps, norm_offset, NORM_OFFSET: tl.constexpr):
    """RMSNorm of the whole input (one tile, BLOCK_K >= K) with the norm weights nw (loaded by the caller), X read
    once for the sum of squares and the product."""
    v = tl.load(X + cols, mask=cols < K, other=0.0)
    rstd = tl.rsqrt(tl.sum(v.to(tl.float32) * v.to(tl.float32), axis=0) / K + eps)
    return _scaled(v, nw.to(tl.float32), rstd, norm_offset, NORM_OFFSET)


@triton.jit
def _normed(x, NormW, cols, k, K, rstd, norm_offset, NORM_OFFSET: tl.constexpr):
    """RMSNorm of input values k .. k + BLOCK_K given rstd, in x's dtype, rounded as `RMSNorm` does."""
    nw = tl.load(NormW + k + cols, mask=(k + cols) < K, other=0.0).to(tl.float32)
    return _scaled(x, nw, rstd, norm_offset, NORM_OFFSET)


@triton.jit
def _scaled(x, nw, rstd, norm_offset, NORM_OFFSET: tl.constexpr):
    """x * rstd scaled by the norm weights nw (fp32), in x's dtype, rounded as `RMSNorm` does."""
    normed = x.to(tl.float32) * rstd
    if NORM_OFFSET:
        return (normed * (norm_offset + nw)).to(x.dtype)
    return (nw * normed.to(x.dtype).to(tl.float32)).to(x.dtype)


# the winners of a 44-config sweep (BLOCK_N 2-16, BLOCK_K 256-1024, 4/8 warps, 1/3 stages) over the Llama 1B and 8B
# projections on an H100 (bench/gemv.py, 2026-11-24): a short list keeps first-start tuning to seconds
CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
           for n, k, w, s in ((2, 1024, 4, 1), (2, 1024, 8, 1), (2, 1024, 8, 3), (2, 512, 4, 1), (4, 512, 4, 1),
                              (4, 512, 4, 3), (8, 512, 4, 1), (8, 512, 8, 1))]
# tuning takes ~1 s per weight shape; where triton can, it keeps the winners on disk for the next start
_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
gemv_tuned = triton.autotune(configs=CONFIGS, key=["N", "K", "EVEN_K", "SILU_MUL", "NORM", "RESIDUAL"],
                             **_CACHE)(gemv_kernel)
