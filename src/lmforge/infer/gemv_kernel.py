"""The Triton kernel behind `lmforge.infer.gemv` (see there); imported on first use, like the paged-attention one."""
import inspect

import triton
import triton.language as tl


@triton.jit
def gemv_kernel(X, W, Bias, Y, N, K, stride_wn, NormW, Res, eps, norm_offset,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                SILU_MUL: tl.constexpr = False, NORM: tl.constexpr = False, NORM_OFFSET: tl.constexpr = False,
                RESIDUAL: tl.constexpr = False):
    """y[n] = sum_k W[n, k] x[k] (+ bias[n]) for BLOCK_N rows of W per program, fp32 accumulation.

    Each fusion rounds where the unfused ops would, so on the GPU the result is bit-equal to the separate ops (Triton's
    CPU interpreter truncates instead of rounding to nearest: within an ulp there):
    SILU_MUL: X holds 2K values [gate, up] and x = silu(gate) * up (the SwiGLU MLP's down projection reads the
      gate/up matmul's output directly).
    NORM: X is the residual stream and x = RMSNorm(X) with weight NormW (K,): every program first takes the
      sum of squares of X (K values, from L2), then normalizes each tile as it loads it; NORM_OFFSET scales by
      (norm_offset + weight) in fp32 (Gemma) instead of weight * normed.
    RESIDUAL: y + Res[n] (the block's residual add), out of place."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    if NORM:
        squares = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            v = tl.load(X + k + cols, mask=(k + cols) < K, other=0.0).to(tl.float32)
            squares += v * v
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        nw_ptr = NormW + cols
    w_ptr = W + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    x_ptr = X + cols
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptr, mask=row_ok[:, None], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr)
            if SILU_MUL:
                up = tl.load(x_ptr + K).to(tl.float32)
        else:
            k_ok = (k + cols) < K
            w = tl.load(w_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr, mask=k_ok, other=0.0)
            if SILU_MUL:
                up = tl.load(x_ptr + K, mask=k_ok, other=0.0).to(tl.float32)
        if SILU_MUL:
            gate = x.to(tl.float32)
            x = (gate / (1.0 + tl.exp(-gate)) * up).to(x.dtype)
        if NORM:
            nw = tl.load(nw_ptr, mask=(k + cols) < K, other=0.0).to(tl.float32)
            normed = x.to(tl.float32) * rstd
            if NORM_OFFSET:
                x = (normed * (norm_offset + nw)).to(x.dtype)
            else:
                x = (nw * normed.to(x.dtype).to(tl.float32)).to(x.dtype)
            nw_ptr += BLOCK_K
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptr += BLOCK_K
        x_ptr += BLOCK_K
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(Bias + rows, mask=row_ok, other=0.0).to(tl.float32)
    if RESIDUAL:
        y = (y.to(Y.dtype.element_ty).to(tl.float32)
             + tl.load(Res + rows, mask=row_ok, other=0.0).to(tl.float32))
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=row_ok)


# the winners of a 44-config sweep (BLOCK_N 2-16, BLOCK_K 256-1024, 4/8 warps, 1/3 stages) over the Llama 1B and 8B
# projections on an H100 (bench/gemv.py, 2026-11-24): a short list keeps first-start tuning to seconds
CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
           for n, k, w, s in ((2, 1024, 4, 1), (2, 1024, 8, 1), (2, 1024, 8, 3), (2, 512, 4, 1), (4, 512, 4, 1),
                              (4, 512, 4, 3), (8, 512, 4, 1), (8, 512, 8, 1))]
# tuning takes ~1 s per weight shape; where triton can, it keeps the winners on disk for the next start
_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
gemv_tuned = triton.autotune(configs=CONFIGS, key=["N", "K", "EVEN_K", "SILU_MUL", "NORM", "RESIDUAL"],
                             **_CACHE)(gemv_kernel)
