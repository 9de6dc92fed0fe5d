"""Causal-LM loss from hidden states without ever holding the (tokens × vocab) logits.

Labels are pre-shifted (labels[t] is the target after tokens[:t+1], -100 = no loss), so only the rows that carry a
target go through the LM head at all (prompt tokens in SFT cost nothing).

Two paths, same result:
- **fused** (the head is a plain weight matrix, e.g. tied embeddings or a bias-free `nn.Linear`): a custom autograd
  function runs head + cross-entropy chunk by chunk and computes each chunk's gradient (w.r.t. the hidden states and,
  when it trains, the head weight) right there in forward, so backward only rescales stored gradients. One head
  matmul per chunk instead of three (no recompute), and a chunk's logits live only while it is processed.
- **checkpointed** (any other head: LoRA- or quantized-wrapped lm_head, tensor-parallel DTensors): each chunk's
  logits are recomputed in backward by activation checkpointing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

CHUNK_LOGIT_BYTES = 256 * 2**20  # fused path: a chunk's fp32 logits stay under this (523 rows at a 128k vocab)
CHECKPOINT_CHUNK_TOKENS = 4096  # checkpointed path: rows per chunk


def fused_chunk_rows(vocab_size: int, n_rows: int, head_trains: bool = False) -> int:
    """Rows per fused chunk: fp32 logits of about CHUNK_LOGIT_BYTES, at least 128 rows, at most all of them. A trained
    head gets chunks twice as long: each chunk adds its (V, d) weight gradient into the fp32 accumulator, a full read
    and write of it (1 GiB at a 128k vocabulary) that fewer, longer chunks amortize."""
    budget = CHUNK_LOGIT_BYTES * (2 if head_trains else 1)
    return max(1, min(n_rows, max(128, budget // (4 * vocab_size))))


_MM_OUT_DTYPE = True  # torch.addmm(..., out_dtype=) exists (torch >= 2.8); cleared by the first call that says not


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b. Half-precision inputs on CUDA: one GEMM accumulating into fp32 in its epilogue (no
    rounded half-precision product and no separate add pass over acc); elsewhere the product in a's dtype, added."""
    global _MM_OUT_DTYPE
    if _MM_OUT_DTYPE and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except TypeError:  # an older torch: no out_dtype keyword
            _MM_OUT_DTYPE = False
    acc.add_(a @ b)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `t` runs in here: autocast's dtype inside an autocast region, else t's own."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def _chunk_ce(logits: torch.Tensor, targets: torch.Tensor, with_grad: bool, row_weights: torch.Tensor | None = None):
    """(sum of CE over the rows, d sum / d logits in the logits' dtype or None); fp32 math inside. The reference
    (and CPU) form of `ce_kernel.chunk_ce_inplace`.

    logits (c, V) is a temporary of the caller's: its fp32 form is overwritten with the softmax in place, so it peaks
    at the fp32 logits plus log-sum-exp's temporary. `row_weights` (c,) weight each row's loss (0 = ignored); the
    gradient is left unweighted for the caller to mask on (c, d) rows, not here on (c, V)."""
    logits32 = logits.float()
    lse = torch.logsumexp(logits32, dim=-1)  # (c,)
    nll = lse - logits32.gather(1, targets[:, None]).squeeze(1)  # (c,)
    loss = (nll if row_weights is None else nll * row_weights).sum()
    if not with_grad:
        return loss, None
    grad = logits32.sub_(lse[:, None]).exp_()  # softmax (c, V)
    rows = torch.arange(len(targets), device=targets.device)
    grad.index_put_((rows, targets), torch.tensor(-1.0, device=grad.device), accumulate=True)  # minus one-hot
    return loss, grad.to(logits.dtype)


def _chunk_ce_for(device: torch.device):
    """The chunk step for this device: on CUDA the Triton kernel (gradient in place of the logits, one launch), else
    `_chunk_ce` (its reference)."""
    if device.type == "cuda":
        from .ce_kernel import chunk_ce_inplace

        return chunk_ce_inplace
    return _chunk_ce


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), gradients computed chunk-wise in forward.

    hidden (n, d), weight (V, d), targets (n,) with no ignored entries (`masked`: -100 entries allowed, they count
    0). Matmuls run in `dtype` (bf16 under autocast); log-softmax and the loss in fp32; the weight gradient
    accumulates in fp32 across chunks.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, dtype: torch.dtype, with_grad: bool,
                masked: bool = False):
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit here
            return LinearCrossEntropy._forward(ctx, hidden, weight, targets, chunk_rows, dtype, with_grad, masked)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, chunk_rows, dtype, with_grad, masked):
        need_h, need_w = with_grad and hidden.requires_grad, with_grad and weight.requires_grad
        h, w = hidden.to(dtype), weight.to(dtype)
        grad_h = torch.empty_like(h) if need_h else None  # (n, d)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # (V, d)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce = _chunk_ce_for(h.device)
        keep = None
        if masked:  # ignored rows stay (no data-dependent shape): weight 0 in the loss, zero rows in both gradients
            keep = targets >= 0  # (n,)
            targets = targets.clamp(min=0)
        for start in range(0, h.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            hc, yc = h[rows], targets[rows]  # (c, d), (c,)
            kc = None if keep is None else keep[rows, None].to(dtype)  # (c, 1)
            # logits (c, V) in `dtype` -> loss, d loss / d logits
            loss, g = ce(hc @ w.T, yc, need_h or need_w, None if keep is None else keep[rows].float())
            total += loss
            if need_h:
                torch.mm(g, w, out=grad_h[rows])
                if kc is not None:
                    grad_h[rows].mul_(kc)
            if need_w:
                _accumulate_fp32(grad_w, g.T, hc if kc is None else hc * kc)
            del g
        # kept on ctx, not saved tensors: backward scales them in place and lets go (no second (V, d) buffer)
        ctx.grads, ctx.dtypes = [grad_h, grad_w], (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError("LinearCrossEntropy computed its gradients in forward: it runs backward only once")
        (grad_h, grad_w), (h_dtype, w_dtype) = ctx.grads, ctx.dtypes
        ctx.grads = None
        dh = grad_h.mul_(grad_total).to(h_dtype) if grad_h is not None else None
        dw = grad_w.mul_(grad_total).to(w_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_rows: int | None = None, masked: bool = False) -> torch.Tensor:
    """Fused head + cross-entropy (sum over rows). hidden (n, d), weight (V, d), targets (n,) all valid, or with
    `masked` some -100 (ignored, still computed: no data-dependent shape)."""
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    rows = chunk_rows or fused_chunk_rows(weight.shape[0], hidden.shape[0], with_grad and weight.requires_grad)
    return LinearCrossEntropy.apply(hidden, weight, targets, rows, _compute_dtype(hidden), with_grad, masked)


def _chunk_loss(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (n, V) in fp32 for a stable log-softmax
    return F.cross_entropy(logits, targets, reduction="sum")  # -100 targets count 0


def causal_lm_loss_sum(head, hidden: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor | None = None,
                       chunk_tokens: int | None = None, fixed_shapes: bool = False) -> torch.Tensor:
    """Sum (not mean) of token cross-entropies over labelled positions.

    head: hidden (n, d) -> logits (n, V), e.g. `model.logits`; hidden (B, T, d); labels (B, T) with -100 = ignore.
    `head_weight` (V, d): the head's plain weight when it is just ``hidden @ W.T`` (fused path), else None.
    The caller divides by the target-token count of the whole optimizer step (correct gradient accumulation).
    `fixed_shapes`: every row goes through the head and ignored ones count 0, instead of selecting the labelled rows
    (a data-dependent shape and a host sync): what a CUDA graph of the step needs; same result.
    """
    if fixed_shapes:
        h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)  # (B*T, d), (B*T,)
    else:
        keep = labels.reshape(-1) != -100
        h = hidden.reshape(-1, hidden.shape[-1])[keep]  # (n, d)
        y = labels.reshape(-1)[keep]  # (n,)
    if head_weight is not None and h.shape[0]:
        return linear_cross_entropy_sum(h, head_weight, y, chunk_tokens, masked=fixed_shapes)
    chunk = chunk_tokens or CHECKPOINT_CHUNK_TOKENS
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        hc, yc = h[start:start + chunk], y[start:start + chunk]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + torch.utils.checkpoint.checkpoint(_chunk_loss, head, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hc, yc)
    return total
