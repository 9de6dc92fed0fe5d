"""The Triton kernel behind `greedy_advance` (see there); imported on first use, like the others."""
import triton
import triton.language as tl

try:  # programmatic dependent launch (see gemv_kernel)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

next_power_of_2 = triton.next_power_of_2


@triton.jit
def greedy_advance_kernel(Logits, stride_l, V, PartVal, PartIdx, Arrived, Sampled, stride_s, Step, Tokens, Starts,
                          PER: tl.constexpr, PARTS: tl.constexpr, PARTS_P: tl.constexpr, PDL: tl.constexpr = False):
    """Grid (B, PARTS). Program (b, p) finds the first maximum of row b's logits in [p PER, (p + 1) PER) and stores
    it as a partial; the last of row b's programs to arrive (a counter per row, reset by it) picks the row's first
    maximum among the partials and writes the token: Sampled[Step, b], Tokens[b], Starts[b] + 1. The last row to
    finish advances Step (a counter of rows at Arrived[B]; one row advances it directly). NaN counts as larger
    than any number, as in argmax."""
    if PDL:  # launched early: wait for the LM head that wrote the logits
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0)
    p = tl.program_id(1)
    cols = p * PER + tl.arange(0, PER)
    x = tl.load(Logits + b * stride_l + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN
    top = tl.max(x, axis=0)
    tl.store(PartVal + b * PARTS + p, top)
    tl.store(PartIdx + b * PARTS + p, tl.min(tl.where(x == top, cols, V), axis=0))
    tl.debug_barrier()  # the partial is stored before the arrival is counted (release below)
    if tl.atomic_add(Arrived + b, 1, sem="acq_rel") == PARTS - 1:
        tl.store(Arrived + b, 0)  # zero again for the next launch
        parts = tl.arange(0, PARTS_P)
        ok = parts < PARTS
        vals = tl.load(PartVal + b * PARTS + parts, mask=ok, other=float("-inf"), cache_modifier=".cg")
        idxs = tl.load(PartIdx + b * PARTS + parts, mask=ok, other=V, cache_modifier=".cg")
        best = tl.max(vals, axis=0)
        token = tl.min(tl.where(vals == best, idxs, V), axis=0).to(tl.int64)  # the first slice's index wins ties
        step = tl.load(Step)
        tl.store(Sampled + step * stride_s + b, token)
        tl.store(Tokens + b, token)
        tl.store(Starts + b, tl.load(Starts + b) + 1)
        rows = tl.num_programs(0)
        if rows == 1:  # one row (batch-1 decode): no second round trip to count the rows at the step's very end
            tl.store(Step, step + 1)
        elif tl.atomic_add(Arrived + rows, 1, sem="acq_rel") == rows - 1:  # every row has read Step: advance it
            tl.store(Arrived + rows, 0)
            tl.store(Step, step + 1)
