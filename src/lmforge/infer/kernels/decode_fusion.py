"""Fast decode paths the engine installs on a model it serves: packed projections and one-row GEMV kernels.

At batch 1 a decode step is ~100 small matmuls, each a weight read; fewer, larger reads run closer to HBM bandwidth
and leave fewer kernel launches inside the CUDA graph. `pack_for_decode(model)`:

- packs q/k/v (and gate/up) weights into one (sum of outs, in) matrix per layer and re-points the original
  parameters at row slices of it: no extra memory, `state_dict()` and the modules are unchanged, and the packed
  matmul (`Attention.packed_qkv`, `MLP.packed_gate_up`) computes exactly what the three (two) did;
- replaces every plain `nn.Linear` by a `DecodeLinear` over the same parameters (`set_module`) and routes the
  tied LM head through `gemv.linear` (a Triton GEMV when the input is one row on CUDA, `F.linear` otherwise);
- gives each plain pre-norm block a `FusedDecodeBlock`: at one row the RMSNorms run inside the GEMVs that read
  their output and the residual adds inside the GEMVs that produce them (no norm or add kernels left).

Only plain bias-consistent `nn.Linear` projections are packed (LoRA- or tensor-parallel-wrapped ones keep their own
forward); weight-only quantized ones of one kind pack into one quantized layer (`QuantLinear.pack`: one kernel launch
for q/k/v and one for gate/up, the originals viewing its buffers) but keep their own kernels, outside the fused blocks. `unpack_for_decode` turns the packed matmuls off again, e.g. before multi-LoRA wrappers are
put around q_proj, whose per-row deltas the packed matmul would skip. Packing assumes the model stays on its device
afterwards (`.to()` would copy the slices apart). Every module installed here launches its kernels with the
`KernelOptions` given to `pack_for_decode` (the engine's `engine.kernels`).
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ...models.modules import set_module
from ...models.transformer import MLP, PLAIN_LINEARS, Attention, Block, RMSNorm, Transformer
from ...quant.base import QuantLinear
from . import gemv
from .options import DEFAULT, KernelOptions

log = logging.getLogger(__name__)


def _share(cls: type[nn.Linear], linear: nn.Linear) -> nn.Linear:
    """A `cls` over `linear`'s own parameter objects (no copy; the same state_dict entries)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.in_features, new.out_features = linear.in_features, linear.out_features
    new.weight = linear.weight
    new.register_parameter("bias", linear.bias)
    return new.train(linear.training)


class DecodeLinear(nn.Linear):
    """An `nn.Linear` whose one-row inputs take the GEMV kernel: built over the parameters of the linear it replaces
    (`DecodeLinear.of`; same state_dict), launching with `options`."""

    options: KernelOptions = DEFAULT

    @classmethod
    def of(cls, linear: nn.Linear, options: KernelOptions = DEFAULT) -> DecodeLinear:
        new = _share(cls, linear)
        new.options = options
        return new

    def plain(self) -> nn.Linear:
        """A plain `nn.Linear` over the same parameters (what unpacking puts back)."""
        return _share(nn.Linear, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemv.linear(x, self.weight, self.bias, self.options)


PLAIN_LINEARS.add(DecodeLinear)  # computes exactly x @ W.T + b


class PackedProjection:
    """Several linears of one input as one matmul: x (..., in) → tuple of (..., out_i). Not an nn.Module, so it
    adds nothing to state_dict; its weight is the storage the original parameters now view."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int],
                 options: KernelOptions = DEFAULT):
        self.weight, self.bias, self.sizes, self.options = weight, bias, sizes, options

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return gemv.linear(x, self.weight, self.bias, self.options).split(self.sizes, dim=-1)


class PackedGateUp(PackedProjection):
    """gate/up packed; `mlp(x, act, down)` is the whole gated MLP. At one row with SiLU and a GEMV-routed down
    projection, the down GEMV applies silu(gate) * up as it loads its input (one launch less per layer)."""

    def mlp(self, x: torch.Tensor, act, down: nn.Module) -> torch.Tensor:
        gate_up = gemv.linear(x, self.weight, self.bias, self.options)  # (..., 2 * d_ff)
        if act is F.silu and type(down) is DecodeLinear and gemv.use_gemv(gate_up, down.weight, self.options):
            return gemv.gemv_silu_mul(gate_up, down.weight, down.bias, **gemv.launch_args(self.options))
        gate, up = gate_up.split(self.sizes, dim=-1)
        return down(act(gate) * up)


class PackedQuantProjection:
    """Quantized linears of one input as one quantized layer (`QuantLinear.pack`): x (..., in) → tuple of
    (..., out_i) from one launch of that layer's kernel; `mlp` as `PackedGateUp.mlp`, unfused."""

    def __init__(self, layer: QuantLinear, sizes: list[int]):
        self.layer, self.sizes = layer, sizes

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.layer(x).split(self.sizes, dim=-1)

    def mlp(self, x: torch.Tensor, act, down: nn.Module) -> torch.Tensor:
        gate, up = self(x)
        return down(act(gate) * up)


class FusedDecodeBlock:
    """A pre-norm block's one-row forward as four GEMV launches plus the attention: no norm or add kernels.

        qkv = RMSNorm(x) Wqkv^T            (gemv_rmsnorm: each program normalizes x as it loads it)
        x   = x + mix(q, k, v) Wo^T        (gemv with the residual added in the epilogue)
        gu  = RMSNorm(x) Wgu^T             (gemv_rmsnorm)
        x   = x + (silu(g) * u) Wdown^T    (gemv_silu_mul with the residual)

    Installed as `Block.decode_fused` only where it computes exactly what the block does: RMSNorm pre-norms and no
    post-norms (not Gemma 2/3's sandwich or OLMo 2's post-norm blocks), plain `Attention` (its qk-norm, RoPE, scale
    and soft-cap run inside `mix`, as in the block), packed q/k/v and gate/up, SiLU, GEMV-routed o and down
    projections; `applies(x)` then sends one-row inputs here and everything else (prefill, batches) through the
    block's own forward. `unsupported(block)` says why a block keeps its own forward."""

    def __init__(self, block: Block, options: KernelOptions = DEFAULT):
        self.block, self.options = block, options

    @staticmethod
    def unsupported(block: nn.Module) -> str | None:
        """None when the fused one-row forward computes exactly what `block` does, else the reason it does not."""
        if type(block) is not Block:
            return f"block type {type(block).__name__}"
        if block.attn_post_norm is not None or block.mlp_post_norm is not None:
            return f"norm_placement={block.attn.cfg.norm_placement} (norms after attention / MLP)"
        if block.mlp_norm is None or type(block.attn_norm) is not RMSNorm or type(block.mlp_norm) is not RMSNorm:
            return "not two RMSNorm pre-norms (parallel block or LayerNorm)"
        if type(block.attn) is not Attention or block.attn.packed_qkv is None or type(block.attn.o_proj) is not DecodeLinear:
            return "attention projections not plain packed linears (LoRA, quantized or tensor-parallel)"
        if type(block.mlp) is not MLP or block.mlp.packed_gate_up is None or type(block.mlp.down_proj) is not DecodeLinear:
            return "MLP not a plain packed gated MLP (mixture of experts, LoRA, quantized)"
        if block.mlp.act is not F.silu or block.mlp.limit is not None:
            return f"activation {block.attn.cfg.act} (the fused down projection computes plain SiLU gating)"
        return None

    @staticmethod
    def supports(block: nn.Module) -> bool:
        return FusedDecodeBlock.unsupported(block) is None

    def applies(self, x: torch.Tensor) -> bool:
        return gemv.use_gemv(x, self.block.attn.packed_qkv.weight, self.options)

    def __call__(self, x, rope, mask, cache, slots) -> torch.Tensor:  # x: (1, 1, d_model)
        attn, mlp, launch = self.block.attn, self.block.mlp, gemv.launch_args(self.options)
        qkv, o = attn.packed_qkv, attn.o_proj
        q, k, v = _normed(x, self.block.attn_norm, qkv, launch).split(qkv.sizes, dim=-1)
        x = gemv.gemv(attn.mix(q, k, v, rope, mask, cache, slots), o.weight, o.bias, x, **launch)
        gate_up, down = mlp.packed_gate_up, mlp.down_proj
        h = _normed(x, self.block.mlp_norm, gate_up, launch)  # (1, 1, 2 * d_ff)
        return gemv.gemv_silu_mul(h, down.weight, down.bias, x, **launch)


def _normed(x: torch.Tensor, norm: RMSNorm, packed: PackedProjection, launch: dict) -> torch.Tensor:
    return gemv.gemv_rmsnorm(x, norm.weight, norm.eps, float(norm.offset), packed.weight, packed.bias, **launch)


def _pack(linears: list[nn.Module], cls=PackedProjection, options: KernelOptions = DEFAULT
          ) -> PackedProjection | None:
    """Pack plain nn.Linear layers sharing dtype/device/bias-ness, or quantized ones `QuantLinear.pack` accepts;
    None if any is something else."""
    if all(isinstance(m, QuantLinear) for m in linears):
        layer = type(linears[0]).pack(linears)
        return None if layer is None else PackedQuantProjection(layer, [m.out_features for m in linears])
    if not all(type(m) in (nn.Linear, DecodeLinear) for m in linears):
        return None
    w0 = linears[0].weight
    if any(m.weight.dtype != w0.dtype or m.weight.device != w0.device or (m.bias is None) != (linears[0].bias is None)
           or m.in_features != linears[0].in_features for m in linears):
        return None
    with torch.no_grad():
        weight = torch.cat([m.weight for m in linears])  # (sum out, in)
        bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
        row = 0
        for m in linears:  # the originals become views of the packed storage: no second copy of the weights
            n = m.out_features
            m.weight.data = weight[row:row + n]
            if bias is not None:
                m.bias.data = bias[row:row + n]
            row += n
    return cls(weight, bias, [m.out_features for m in linears], options)


def _swap_linears(model: nn.Module, swap) -> int:
    """Replace every module `swap` maps to a new one (None: keep) in its parent (`set_module`), at every path it
    sits at (a module shared by two parents gets one replacement); returns how many modules were replaced."""
    new: dict[int, nn.Module | None] = {}
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) not in new:
            new[id(module)] = swap(module)
        if new[id(module)] is not None:
            set_module(model, path, new[id(module)])
    return sum(m is not None for m in new.values())


@torch.no_grad()
def pack_for_decode(model: Transformer, options: KernelOptions = DEFAULT) -> dict:
    """Install the fast decode paths on `model` (in place), launching their kernels with `options`; returns what
    was done, for logs and tests."""
    done = {"packed_qkv": 0, "packed_gate_up": 0}
    for module in model.modules():
        if isinstance(module, Attention) and module.packed_qkv is None:
            module.packed_qkv = _pack([module.q_proj, module.k_proj, module.v_proj], options=options)
            done["packed_qkv"] += module.packed_qkv is not None
        elif isinstance(module, MLP) and module.gated and module.packed_gate_up is None:
            module.packed_gate_up = _pack([module.gate_proj, module.up_proj], PackedGateUp, options)
            done["packed_gate_up"] += module.packed_gate_up is not None
    # plain linears, and those a pack with other options installed (an earlier engine's), get this pack's
    done["gemv_linears"] = _swap_linears(model, lambda m: DecodeLinear.of(m, options) if type(m) is nn.Linear or (
        type(m) is DecodeLinear and m.options != options) else None)
    done["fused_blocks"] = 0
    reasons = {}
    for block in model.layers:
        reason = FusedDecodeBlock.unsupported(block)
        if reason is None:
            block.decode_fused = FusedDecodeBlock(block, options)
            done["fused_blocks"] += 1
        else:
            reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:  # those blocks decode through their own forward (packed projections, GEMV linears still apply)
        done["unfused_blocks"] = reasons
        log.info("fused decode blocks off for %s", "; ".join(f"{n} blocks: {r}" for r, n in reasons.items()))
    if model.lm_head is None:
        model.head_linear = functools.partial(gemv.linear, options=options)
    return done


def unpack_for_decode(model: Transformer, keep_gemv: bool = True) -> None:
    """Back to one matmul per projection (the weights stay where they are: views of the packed storage); with
    `keep_gemv=False` also back to plain `nn.Linear` / `F.linear` everywhere."""
    for module in model.modules():
        if isinstance(module, Block):
            module.decode_fused = None
        if isinstance(module, Attention):
            module.packed_qkv = None
        elif isinstance(module, MLP):
            module.packed_gate_up = None
    if not keep_gemv:
        _swap_linears(model, lambda m: m.plain() if type(m) is DecodeLinear else None)
        model.head_linear = F.linear
