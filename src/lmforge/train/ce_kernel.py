"""Cross-entropy of one chunk of logits and its gradient, in place, as one Triton kernel (the fused loss's inner step).

One program per row streams the row twice: an online max / sum-of-exp pass gives log-sum-exp and the row's loss,
a second pass overwrites the logits with d loss / d logits = softmax - one_hot (fp32 math, stored in the logits'
dtype). No (rows, vocab) temporary at all, and a fixed launch configuration: nothing is tuned at run time, so the
kernel behaves the same eagerly and inside a CUDA graph (inductor's compiled version of the same function ran 10x
slower inside a captured training step). CPU tests run it in Triton's interpreter against `loss._chunk_ce`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # vocabulary entries per iteration (a 128k vocabulary: 32 iterations per pass)


@triton.jit
def _ce_rows(logits_ptr, targets_ptr, loss_ptr, stride, V, WITH_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride
    target = tl.load(targets_ptr + row)
    m = tl.full((), float("-inf"), tl.float32)  # running max
    s = tl.full((), 0.0, tl.float32)  # running sum of exp(x - m)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(loss_ptr + row, lse - tl.load(ptr + target).to(tl.float32))
    if WITH_GRAD:
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + offs, mask=offs < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)
            tl.store(ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=offs < V)


def chunk_ce_inplace(logits: torch.Tensor, targets: torch.Tensor, with_grad: bool,
                     row_weights: torch.Tensor | None = None):
    """(sum of CE over the rows, d sum / d logits or None) like `loss._chunk_ce`, the gradient written over `logits`
    (c, V), which must be contiguous in its last dimension. targets (c,) all in [0, V)."""
    c, V = logits.shape
    losses = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c:
        _ce_rows[(c,)](logits, targets, losses, logits.stride(0), V, WITH_GRAD=with_grad, BLOCK=BLOCK,
                       num_warps=8)
    loss = (losses if row_weights is None else losses * row_weights).sum()
    return loss, (logits if with_grad else None)
