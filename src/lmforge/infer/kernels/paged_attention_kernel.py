"""The Triton kernel behind `paged_attention` (see there). Imported on first use only: triton reads
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
    Q, K, V, Tables, Lens, Out, Acc, Stats, Cos, Sin, KNew, VNew, Slots, Arrived,
    scale, stride_qb, stride_qh, stride_ks, stride_kh, stride_tb, stride_nb, stride_nh, tokens_per_split, window,
    softcap,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    CHUNK: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr, ROPE: tl.constexpr = False,
    WRITE_KV: tl.constexpr = False, PDL: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
):
    """Grid (B, Hkv, SPLITS). WRITE_KV: the program whose split holds a row's last key position writes the new key
    (rotated with ROPE) and value of its kv head at Slots[b], so the attention needs no K/V write launch before it,
    and attends over them straight from registers. SPLITS > 1: each program stores its partial (acc, max, sum); the
    last of a (row, kv head)'s programs to finish (an arrival counter, reset by that program) merges them, so no
    combine launch follows either.

    PDL with WRITE_KV: the split's first chunk of keys and values is loaded before waiting for the kernel that wrote
    q, so it overlaps that kernel's tail: every position but the newest was written by earlier steps (and the block
    tables, lengths and write slots before the step's first layer), and the newest comes from registers."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    length = tl.load(Lens + b).to(tl.int32)  # lo, hi and the window stay int32 in every branch
    lo = s * tokens_per_split
    hi = tl.minimum(length, lo + tokens_per_split)
    newest = length - 1
    holds_newest = (length > 0) & (newest >= lo) & (newest < hi)  # this split has key position length - 1
    if window > 0:
        lo = tl.maximum(lo, length - window)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    head_ok = (g < G)[:, None] & (d < D)[None, :]
    if WRITE_KV:  # the pool holds nothing of this step's yet: read it (and where the new K/V go) before waiting
        t, k, v = _chunk(K, V, Tables, b, h, d, lo, hi, stride_tb, stride_ks, stride_kh, D, BLOCK_SIZE, CHUNK)
        dst = tl.load(Slots + b).to(tl.int64) * stride_ks + h * stride_kh + d
    if PDL:  # launched early (programmatic dependent launch): wait for the kernel that wrote q
        gdc_launch_dependents()
        gdc_wait()
    if not WRITE_KV:  # the new K/V are in the pool already, maybe written by the kernel just waited for
        t, k, v = _chunk(K, V, Tables, b, h, d, lo, hi, stride_tb, stride_ks, stride_kh, D, BLOCK_SIZE, CHUNK)
    if WRITE_KV:
        k_new, v_new = _new_kv(KNew, VNew, Cos, Sin, b, h, d, stride_nb, stride_nh, D, ROPE)  # (DP,) each
    q_rows = Q + b * stride_qb + (h * G + g)[:, None] * stride_qh
    q = tl.load(q_rows + d[None, :], mask=head_ok, other=0.0)
    if ROPE:  # rotate the query as it is loaded (half layout: pairs (i, i + D/2)), fp32, one rounding
        q = _rotate(q, tl.load(q_rows + ((d + D // 2) % D)[None, :], mask=head_ok, other=0.0), Cos, Sin, b, d,
                    D).to(q.dtype)
    m = tl.full([GP], float("-inf"), tl.float32)
    denom = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    if lo < hi:
        if WRITE_KV:  # the newest position is this step's key and value (the pool held an old one when loaded)
            k, v = _spliced(t == newest, k, v, k_new, v_new)
        m, denom, acc = _attend(q, k, v, t < hi, m, denom, acc, scale, softcap, IEEE, SOFTCAP)
    for start in range(lo + CHUNK, hi, CHUNK):
        t, k, v = _chunk(K, V, Tables, b, h, d, start, hi, stride_tb, stride_ks, stride_kh, D, BLOCK_SIZE, CHUNK)
        if WRITE_KV:
            k, v = _spliced(t == newest, k, v, k_new, v_new)
        m, denom, acc = _attend(q, k, v, t < hi, m, denom, acc, scale, softcap, IEEE, SOFTCAP)
    if WRITE_KV:
        if holds_newest:  # into the pool for the next steps (this one took them from registers)
            tl.store(K + dst, k_new.to(K.dtype.element_ty), mask=d < D)
            tl.store(V + dst, v_new.to(V.dtype.element_ty), mask=d < D)
    out_rows = b * G * tl.num_programs(1) + h * G + g  # this program's query heads in Out (B, H, D)
    if SPLITS == 1:
        out = acc / tl.maximum(denom, 1e-30)[:, None]
        tl.store(Out + out_rows[:, None] * D + d[None, :], out.to(Out.dtype.element_ty), mask=head_ok)
    else:
        group = b * tl.num_programs(1) + h
        row = (group * SPLITS + s) * G + g  # (B, Hkv, SPLITS, G) flattened
        tl.store(Acc + row[:, None] * D + d[None, :], acc, mask=head_ok)
        tl.store(Stats + row * 2, m, mask=g < G)
        tl.store(Stats + row * 2 + 1, denom, mask=g < G)
        tl.debug_barrier()  # every thread's partial is stored before the arrival is counted (release below)
        if tl.atomic_add(Arrived + group, 1, sem="acq_rel") == SPLITS - 1:
            tl.store(Arrived + group, 0)  # the counters are zero again for the next launch
            _merge_splits(Acc, Stats, Out, group, out_rows, g, d, head_ok, G, D, SPLITS)


@triton.jit
def _chunk(K, V, Tables, b, h, d, start, hi, stride_tb, stride_ks, stride_kh, D: tl.constexpr,
           BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr):
    """Positions start .. start + CHUNK (those < hi valid) of row b, kv head h: (CHUNK,) positions and (CHUNK, DP)
    keys and values, looked up through the block table (zeros where not valid)."""
    t = start + tl.arange(0, CHUNK)
    valid = t < hi
    block = tl.load(Tables + b * stride_tb + t // BLOCK_SIZE, mask=valid, other=0)
    slot = (block * BLOCK_SIZE + t % BLOCK_SIZE).to(tl.int64)
    kv_ok = valid[:, None] & (d < D)[None, :]
    offs = slot[:, None] * stride_ks + h * stride_kh + d[None, :]
    return t, tl.load(K + offs, mask=kv_ok, other=0.0), tl.load(V + offs, mask=kv_ok, other=0.0)


@triton.jit
def _attend(q, k, v, valid, m, denom, acc, scale, softcap, IEEE: tl.constexpr, SOFTCAP: tl.constexpr):
    """One chunk of online softmax: (running max, sum, acc) of the G query heads after keys k / values v. SOFTCAP:
    scores -> softcap * tanh(scores / softcap) first (Gemma 2), tanh as 1 - 2 / (exp(2x) + 1) (exact at +-inf)."""
    if IEEE:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))
    scores = (scores * scale).to(tl.float32)  # (GP, CHUNK), fp32 also under compile
    if SOFTCAP:
        scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
    scores = tl.where(valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    p = tl.exp(scores - m_new[:, None])
    alpha = tl.exp(m - m_new)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, denom * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + pv


@triton.jit
def _spliced(is_new, k, v, k_new, v_new):
    """Chunk keys and values (CHUNK, DP) with the rows where is_new (CHUNK,) replaced by k_new / v_new (DP,)."""
    return (tl.where(is_new[:, None], k_new[None, :].to(k.dtype), k),
            tl.where(is_new[:, None], v_new[None, :].to(v.dtype), v))


@triton.jit
def _new_kv(KNew, VNew, Cos, Sin, b, h, d, stride_nb, stride_nh, D: tl.constexpr, ROPE: tl.constexpr):
    """Row b's new key (rotated with ROPE, rounded to its dtype) and value of kv head h: (DP,) each."""
    ok = d < D
    src = b * stride_nb + h * stride_nh
    k = tl.load(KNew + src + d, mask=ok, other=0.0)
    if ROPE:
        k = _rotate(k, tl.load(KNew + src + (d + D // 2) % D, mask=ok, other=0.0), Cos, Sin, b, d, D).to(k.dtype)
    return k, tl.load(VNew + src + d, mask=ok, other=0.0)


@triton.jit
def _merge_splits(Acc, Stats, Out, group, out_rows, g, d, head_ok, G: tl.constexpr, D: tl.constexpr,
                  SPLITS: tl.constexpr):
    """Out rows of one (row, kv head) from its SPLITS partials, merged online (running max, rescaled sums); empty
    splits (max -inf) weigh nothing. Unrolled, so every partial's loads are in flight at once; they bypass L1
    (other programs wrote them)."""
    top = tl.full([g.shape[0]], float("-inf"), tl.float32)
    num = tl.zeros([g.shape[0], d.shape[0]], tl.float32)
    den = tl.zeros([g.shape[0]], tl.float32)
    for s in tl.static_range(SPLITS):
        part = (group * SPLITS + s) * G + g
        m = tl.load(Stats + part * 2, mask=g < G, other=float("-inf"), cache_modifier=".cg")
        split_den = tl.load(Stats + part * 2 + 1, mask=g < G, other=0.0, cache_modifier=".cg")
        split_acc = tl.load(Acc + part[:, None] * D + d[None, :], mask=head_ok, other=0.0, cache_modifier=".cg")
        new_top = tl.maximum(top, m)
        safe_top = tl.where(new_top > float("-inf"), new_top, 0.0)  # nothing seen yet: every weight is 0
        keep = tl.where(top > float("-inf"), tl.exp(top - safe_top), 0.0)
        w = tl.where(m > float("-inf"), tl.exp(m - safe_top), 0.0)
        num = num * keep[:, None] + split_acc * w[:, None]
        den = den * keep + split_den * w
        top = new_top
    out = num / tl.maximum(den, 1e-30)[:, None]
    tl.store(Out + out_rows[:, None] * D + d[None, :], out.to(Out.dtype.element_ty), mask=head_ok)


@triton.jit
def _rotate(x, partner, Cos, Sin, b, d, D: tl.constexpr):
    """RoPE, half layout: x[d] cos - x[d + D/2] sin (first half), x[d] cos + x[d - D/2] sin (second half); cos/sin
    (B, D/2) rows; fp32 result."""
    half = d % (D // 2)
    cos = tl.load(Cos + b * (D // 2) + half, mask=d < D, other=0.0).to(tl.float32)
    sin = tl.load(Sin + b * (D // 2) + half, mask=d < D, other=0.0).to(tl.float32)
    sign = tl.where(d < D // 2, -1.0, 1.0)
    return x.to(tl.float32) * cos + sign * partner.to(tl.float32) * sin
