"""The Triton kernel behind `lmforge.infer.paged_attention` (see there). Imported on first use only: triton reads
TRITON_INTERPRET (CPU interpreter, for tests) when it is imported, and CPU wheels of torch come without triton."""
import triton
import triton.language as tl

try:  # programmatic dependent launch (see gemv_kernel)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

next_power_of_2 = triton.next_power_of_2


@triton.jit
def paged_decode_kernel(
    Q, K, V, Tables, Lens, Out, Acc, Stats, Cos, Sin,
    scale, stride_qb, stride_qh, stride_ks, stride_kh, stride_tb, tokens_per_split, window,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    CHUNK: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr, ROPE: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    if PDL:  # launched early (programmatic dependent launch): wait for the kernel that wrote q
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    length = tl.load(Lens + b).to(tl.int32)  # lo, hi and the window stay int32 in every branch
    lo = s * tokens_per_split
    hi = tl.minimum(length, lo + tokens_per_split)
    if window > 0:
        lo = tl.maximum(lo, length - window)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    head_ok = (g < G)[:, None] & (d < D)[None, :]
    q_rows = Q + b * stride_qb + (h * G + g)[:, None] * stride_qh
    q = tl.load(q_rows + d[None, :], mask=head_ok, other=0.0)
    if ROPE:  # rotate the query as it is loaded (half layout: pairs (i, i + D/2)), fp32, one rounding
        q = _rotate(q, tl.load(q_rows + ((d + D // 2) % D)[None, :], mask=head_ok, other=0.0), Cos, Sin, b, d,
                    D).to(q.dtype)
    m = tl.full([GP], float("-inf"), tl.float32)
    denom = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    for start in range(lo, hi, CHUNK):
        t = start + tl.arange(0, CHUNK)
        valid = t < hi
        block = tl.load(Tables + b * stride_tb + t // BLOCK_SIZE, mask=valid, other=0)
        slot = (block * BLOCK_SIZE + t % BLOCK_SIZE).to(tl.int64)
        kv_ok = valid[:, None] & (d < D)[None, :]
        offs = slot[:, None] * stride_ks + h * stride_kh + d[None, :]
        k = tl.load(K + offs, mask=kv_ok, other=0.0)  # (CHUNK, DP)
        v = tl.load(V + offs, mask=kv_ok, other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(valid[None, :], (scores * scale).to(tl.float32), float("-inf"))  # (GP, CHUNK), fp32 also under compile
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        denom = denom * alpha + tl.sum(p, axis=1)
        m = m_new
    heads = h * G + g
    if SPLITS == 1:
        out = acc / tl.maximum(denom, 1e-30)[:, None]
        tl.store(Out + (b * G * tl.num_programs(1) + heads)[:, None] * D + d[None, :],
                 out.to(Out.dtype.element_ty), mask=head_ok)
    else:
        row = ((b * tl.num_programs(1) + h) * SPLITS + s) * G + g  # (B, Hkv, SPLITS, G) flattened
        tl.store(Acc + row[:, None] * D + d[None, :], acc, mask=head_ok)
        tl.store(Stats + row * 2, m, mask=g < G)
        tl.store(Stats + row * 2 + 1, denom, mask=g < G)


@triton.jit
def _rotate(x, partner, Cos, Sin, b, d, D: tl.constexpr):
    """RoPE, half layout: x[d] cos - x[d + D/2] sin (first half), x[d] cos + x[d - D/2] sin (second half); cos/sin
    (B, D/2) rows; fp32 result."""
    half = d % (D // 2)
    cos = tl.load(Cos + b * (D // 2) + half, mask=d < D, other=0.0).to(tl.float32)
    sin = tl.load(Sin + b * (D // 2) + half, mask=d < D, other=0.0).to(tl.float32)
    sign = tl.where(d < D // 2, -1.0, 1.0)
    return x.to(tl.float32) * cos + sign * partner.to(tl.float32) * sin


@triton.jit
def kv_write_kernel(K, V, KPool, VPool, Slots, Cos, Sin, stride_kb, stride_kh, stride_ps, stride_ph,
                    D: tl.constexpr, DP: tl.constexpr, ROPE: tl.constexpr = False, PDL: tl.constexpr = False):
    """Pool[slot of row b, head h] = new k/v (b, h): one program per (row, kv head), K and V in one launch; with
    ROPE the key is rotated on the way."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, DP)
    ok = d < D
    slot = tl.load(Slots + b).to(tl.int64)
    src = b * stride_kb + h * stride_kh
    dst = slot * stride_ps + h * stride_ph + d
    k = tl.load(K + src + d, mask=ok)
    if ROPE:
        k = _rotate(k, tl.load(K + src + (d + D // 2) % D, mask=ok), Cos, Sin, b, d, D).to(k.dtype)
    tl.store(KPool + dst, k, mask=ok)
    tl.store(VPool + dst, tl.load(V + src + d, mask=ok), mask=ok)


@triton.jit
def combine_kernel(Acc, Stats, Out, SPLITS: tl.constexpr, SP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                   PDL: tl.constexpr = False):
    """Merge the per-split partials of one (row, query head): Acc (rows, SPLITS, D) unnormalized, Stats (rows,
    SPLITS, 2) = (running max, sum of exp) → Out (rows, D). Rows = (B, Hkv, G) flattened, as the kernel stores
    them with the split index between kv head and group: row r = (b*Hkv + h)*G + g ↔ partial ((b*Hkv+h)*SPLITS+s)*G+g."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    r = tl.program_id(0)
    G = tl.num_programs(1)
    g = tl.program_id(1)
    s = tl.arange(0, SP)
    d = tl.arange(0, DP)
    s_ok = s < SPLITS
    part = (r * SPLITS + s) * G + g  # (SP,)
    m = tl.load(Stats + part * 2, mask=s_ok, other=float("-inf"))
    denom = tl.load(Stats + part * 2 + 1, mask=s_ok, other=0.0)
    top = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)  # empty splits (and padding rows) weigh nothing
    acc = tl.load(Acc + part[:, None] * D + d[None, :], mask=s_ok[:, None] & (d < D)[None, :], other=0.0)
    num = tl.sum(acc * w[:, None], axis=0)
    out = num / tl.maximum(tl.sum(denom * w, axis=0), 1e-30)
    tl.store(Out + (r * G + g) * D + d, out.to(Out.dtype.element_ty), mask=d < D)
