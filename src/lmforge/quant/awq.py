"""AWQ: activation-aware INT4 weight quantization (Lin et al. 2024), written for lmforge's block layout.

Weights that meet large activations matter most. AWQ protects them by scaling input channel j of a weight up by
s_j before group-wise INT4 rounding and the activation down by s_j, which is exact in full precision and shrinks the
*relative* rounding error of salient channels. Per group of linears sharing one input (q/k/v; gate/up; o after v;
down after up), the search is

    s = mean|x|^alpha / sqrt(max * min),   alpha in {0, 1/n_grid, ...}   minimising  || x W^T - (x / s) Q(W s)^T ||^2

on calibration inputs (alpha = 0 is plain RTN, so the search never does worse on them). 1/s is folded into the op
that produces x -- a norm's weight (and bias), or the previous linear's output rows -- so inference is an ordinary
INT4 linear. Then, per output row and group, a clipping search shrinks the quantization range (ratios 1.0 .. 0.55)
where that lowers the output error. Linears without a foldable producer get the clipping search only.
"""
from __future__ import annotations

import torch
from torch import nn

from .calibration import InputStats
from .linear import Int4Linear
from .rtn import int4_dequantize, int4_params, int4_quantize

__all__ = ["awq_block", "scaling_groups", "search_clip"]


def _fake(w: torch.Tensor, group_size: int, clip=None) -> torch.Tensor:
    scale, zero = int4_params(w, group_size, clip, scale_dtype=torch.float32)
    return int4_dequantize(int4_quantize(w, scale, zero), scale, zero)


def scaling_groups(block: nn.Module, targets: set[str]) -> list[tuple[nn.Module, list[str]]]:
    """(producer of the shared input, names of the target linears reading it) where 1/s can be folded exactly."""
    attn, mlp = block.attn, block.mlp
    cfg = attn.cfg
    groups = [(block.attn_norm, ["attn.q_proj", "attn.k_proj", "attn.v_proj"])]
    if cfg.kv_heads == cfg.n_heads and isinstance(attn.v_proj, nn.Linear):  # GQA shares v rows across heads
        groups.append((attn.v_proj, ["attn.o_proj"]))
    gated = getattr(mlp, "gated", None)  # None: not the dense MLP (e.g. mixture of experts): clipping only
    if gated is not None:
        groups.append((block.mlp_norm, ["mlp.gate_proj", "mlp.up_proj"] if gated else ["mlp.up_proj"]))
    if gated and isinstance(mlp.up_proj, nn.Linear):  # down reads act(gate) * up: linear in up's rows
        groups.append((mlp.up_proj, ["mlp.down_proj"]))
    # post-norm blocks (OLMo 2) have no norm before attention / the MLP: nothing to fold 1/s into there
    return [(prev, names) for prev, names in groups if prev is not None and all(n in targets for n in names)]


@torch.no_grad()
def _search_scale(x: torch.Tensor, x_mean: torch.Tensor, weights: list[torch.Tensor], group_size: int,
                  n_grid: int) -> torch.Tensor:
    """Best per-input-channel scale s (in,) for linears `weights` reading x (rows, in)."""
    ref = [x @ w.T for w in weights]  # (rows, out) each
    best, best_loss = torch.ones_like(x_mean), float("inf")
    for i in range(n_grid):
        s = x_mean.pow(i / n_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        xs = x / s
        loss = sum(torch.linalg.vector_norm(xs @ _fake(w * s, group_size).T - y).item() ** 2
                   for w, y in zip(weights, ref))
        if loss < best_loss:
            best, best_loss = s, loss
    return best


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, group_size: int, ratios=None, max_rows: int = 512,
                chunk_elems: int = 2**25) -> torch.Tensor:
    """Per (output row, group) clip ratio (out, n_groups) minimising that group's contribution to the output error
    sum_n (sum_k dW[o, g, k] x[n, g, k])^2 on up to `max_rows` calibration rows."""
    ratios = ratios or [1.0 - 0.05 * i for i in range(10)]
    out_f, in_f = w.shape
    n_groups = in_f // group_size
    xg = x[:max_rows].view(-1, n_groups, group_size)  # (N, G, gs)
    best_ratio = torch.ones(out_f, n_groups, device=w.device)
    rows = max(1, chunk_elems // max(1, xg.shape[0] * n_groups))
    for o in range(0, out_f, rows):
        wc = w[o: o + rows].float()
        best_err = torch.full((wc.shape[0], n_groups), float("inf"), device=w.device)
        for r in ratios:
            dw = (wc - _fake(wc, group_size, clip=r)).view(wc.shape[0], n_groups, group_size)
            err = torch.einsum("ogk,ngk->nog", dw, xg).pow(2).sum(0)  # (rows, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio[o: o + rows] = torch.where(better, torch.tensor(r, device=w.device), best_ratio[o: o + rows])
    return best_ratio


@torch.no_grad()
def _fold(prev: nn.Module, s: torch.Tensor) -> None:
    """Divide what `prev` outputs by s: a norm's weight/bias, or a linear's output rows. A Gemma RMSNorm scales by
    (offset + weight): its weight becomes (offset + weight) / s - offset."""
    offset = float(getattr(prev, "offset", 0.0) or 0.0)
    scale = s.to(prev.weight.dtype).view(-1, *([1] * (prev.weight.ndim - 1)))
    if offset:
        prev.weight.copy_((prev.weight.float() + offset) / scale.float() - offset)
    else:
        prev.weight.div_(scale)
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias.dtype))


@torch.no_grad()
def awq_block(block: nn.Module, stats: dict[str, InputStats], targets: set[str], group_size: int = 128,
              n_grid: int = 20, clip: bool = True, dtype: torch.dtype | None = None,
              search_rows: int = 512) -> dict[str, Int4Linear]:
    """Scale-search, fold, clip-search and quantize the `targets` (block-relative names) of one block in place;
    returns the new Int4Linears by name. The searches use the first `search_rows` calibration rows (the scales'
    mean |x| uses all of them)."""
    # 1) scales, searched on the original weights, all folded before anything is quantized (they commute)
    input_scale = {name: torch.ones(block.get_submodule(name).in_features, device=stats[name].abs_sum.device)
                   for name in targets}
    for prev, names in scaling_groups(block, targets):
        x = stats[names[0]].sample()[:search_rows]
        weights = [block.get_submodule(n).weight.float() for n in names]
        s = _search_scale(x, stats[names[0]].abs_mean, weights, group_size, n_grid)
        for n in names:
            lin = block.get_submodule(n)
            lin.weight.mul_(s.to(lin.weight.dtype))
            input_scale[n] = s
        _fold(prev, s)
    # 2) clipping search on the scaled weights and the correspondingly scaled inputs, then INT4
    out = {}
    for name in targets:
        lin = block.get_submodule(name)
        w = lin.weight.float()
        ratio = search_clip(w, stats[name].sample()[:search_rows] / input_scale[name], group_size) if clip else None
        out[name] = Int4Linear.from_linear(lin, group_size, dtype=dtype, clip=ratio)
    return out
