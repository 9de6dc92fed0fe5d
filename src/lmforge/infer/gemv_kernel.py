"""The Triton kernel behind `lmforge.infer.gemv` (see there); imported on first use, like the paged-attention one."""
import inspect

import triton
import triton.language as tl


@triton.jit
def gemv_kernel(X, W, Bias, Y, N, K, stride_wn,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                SILU_MUL: tl.constexpr = False):
    """y[n] = sum_k W[n, k] x[k] (+ bias[n]) for BLOCK_N rows of W per program, fp32 accumulation.

    SILU_MUL: X holds 2K values [gate, up] and x = silu(gate) * up, rounded to X's dtype as the unfused op would
    (the SwiGLU MLP's down projection reads the gate/up matmul's output directly)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
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
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptr += BLOCK_K
        x_ptr += BLOCK_K
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(Bias + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=row_ok)


# the winners of a 44-config sweep (BLOCK_N 2-16, BLOCK_K 256-1024, 4/8 warps, 1/3 stages) over the Llama 1B and 8B
# projections on an H100 (bench/gemv.py, 2026-11-24): a short list keeps first-start tuning to seconds
CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
           for n, k, w, s in ((2, 1024, 4, 1), (2, 1024, 8, 1), (2, 1024, 8, 3), (2, 512, 4, 1), (4, 512, 4, 1),
                              (4, 512, 4, 3), (8, 512, 4, 1), (8, 512, 8, 1))]
# tuning takes ~1 s per weight shape; where triton can, it keeps the winners on disk for the next start
_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
gemv_tuned = triton.autotune(configs=CONFIGS, key=["N", "K", "EVEN_K", "SILU_MUL"], **_CACHE)(gemv_kernel)
