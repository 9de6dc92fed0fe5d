"""Fast decode paths the engine installs on a model it serves: packed projections and one-row GEMV kernels.

At batch 1 a decode step is ~100 small matmuls, each a weight read; fewer, larger reads run closer to HBM bandwidth
and leave fewer kernel launches inside the CUDA graph. `pack_for_decode(model)` swaps modules of the model (one
`set_module` each; the model file knows nothing of what comes in):

- each attention's `qkv` (`QKVProjection`) and each gated MLP's `gate_up_down` (`GatedProjections`) becomes a
  packed module: q/k/v (gate/up) weights as one (sum of outs, in) matrix, the original parameters re-pointed at
  row slices of it. No extra memory; `state_dict()` is unchanged (the packed matrix is no parameter or buffer) and
  the packed matmul computes exactly what the three (two) did. Any module that projects through these seams packs,
  whatever its class;
- every plain `nn.Linear` becomes a `DecodeLinear` over the same parameters, and the tied head's `TiedHead` a
  `DecodeTiedHead`: a Triton GEMV when the input is one row on CUDA, `F.linear` otherwise;
- each plain pre-norm block is wrapped in a `FusedDecodeBlock`: at one row the RMSNorms run inside the GEMVs that
  read their output and the residual adds inside the GEMVs that produce them (no norm or add kernels left); every
  other input goes through the block itself. A block that cannot be fused keeps its own forward, and the one log
  line of the pack says why (`FusedDecodeBlock.unsupported`), as it does for projections that do not pack.

Only plain bias-consistent `nn.Linear` projections are packed (LoRA- or tensor-parallel-wrapped ones keep their own
forward); weight-only quantized ones of one kind pack into one quantized layer (`QuantLinear.pack`: one kernel launch
for q/k/v and one for gate/up, the originals viewing its buffers) and keep their own kernels, which the fused blocks
call with the norm, gating and residual folded in (`QuantLinear.fused`). `unpack_for_decode` puts the model's own
modules back, e.g. before multi-LoRA wrappers are put around q_proj, whose per-row deltas the packed matmul would
skip. Packing assumes the model stays on its device afterwards (`.to()` would copy the slices apart). Every module
installed here launches its kernels with the `KernelOptions` given to `pack_for_decode` (the engine's
`engine.kernels`).
"""
from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from ...models.modules import set_module
from ...models.transformer import (MLP, PLAIN_LINEARS, Attention, Block, GatedProjections, QKVProjection, RMSNorm,
                                   TiedHead, Transformer)
from ...quant import qkernel
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


class DecodeTiedHead(nn.Module):
    """`TiedHead` through `gemv.linear`: the tied LM head's one-row matmul as a GEMV."""

    def __init__(self, options: KernelOptions = DEFAULT):
        super().__init__()
        self.options = options

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return gemv.linear(hidden, weight, None, self.options)


class PackedQKV(nn.Module):
    """`QKVProjection` as one matmul over the stacked q/k/v rows: x (..., in) → (q, k, v). The packed weight is a
    plain attribute, not a parameter or buffer: the original parameters view its rows and state_dict keeps theirs."""

    fuses = True  # a fused block may read `weight` (the GEMV kinds; quantized ones keep their own kernels)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int],
                 options: KernelOptions = DEFAULT):
        super().__init__()
        self.weight, self.bias, self.sizes, self.options = weight, bias, sizes, options

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The packed output (..., sum of outs)."""
        return gemv.linear(x, self.weight, self.bias, self.options)

    def forward(self, owner: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.project(x).split(self.sizes, dim=-1)


class PackedGateUp(PackedQKV):
    """`GatedProjections` with gate/up packed: down(glu(gate, up)) from one gate/up matmul. At one row with plain
    SiLU gating and a GEMV-routed down projection, the down GEMV applies silu(gate) * up as it loads its input (one
    launch less per layer)."""

    def forward(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.project(x), mlp.down_proj  # (..., 2 * d_ff)
        if (self.fuses and mlp.limit is None and mlp.act is F.silu and type(down) is DecodeLinear
                and gemv.use_gemv(gate_up, down.weight, self.options)):
            return gemv.gemv_silu_mul(gate_up, down.weight, down.bias, **gemv.launch_args(self.options))
        return down(mlp.glu(*gate_up.split(self.sizes, dim=-1)))


class _QuantRows:
    """The packed rows as one quantized layer (`QuantLinear.pack`), launched with its own kernel. The layer is held
    outside the module tree: its buffers are the originals' storage, and state_dict keeps the originals' names."""

    fuses = False

    def __init__(self, layer: QuantLinear, sizes: list[int]):
        nn.Module.__init__(self)
        self.__dict__["layer"] = layer
        self.sizes, self.options = sizes, None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class PackedQuantQKV(_QuantRows, PackedQKV):
    """`PackedQKV` over quantized q/k/v: one launch of their kernel."""


class PackedQuantGateUp(_QuantRows, PackedGateUp):
    """`PackedGateUp` over quantized gate/up: one launch of their kernel, the gating and down projection unfused."""


class FusedDecodeBlock(nn.Module):
    """A pre-norm block whose one-row forward is four GEMV launches plus the attention: no norm or add kernels.

        qkv = RMSNorm(x) Wqkv^T            (gemv_rmsnorm: each program normalizes x as it loads it)
        x   = x + mix(q, k, v) Wo^T        (gemv with the residual added in the epilogue)
        gu  = RMSNorm(x) Wgu^T             (gemv_rmsnorm)
        x   = x + (silu(g) * u) Wdown^T    (gemv_silu_mul with the residual)

    Each projection is bf16 (the GEMVs above) or weight-only quantized (`QuantLinear.fused`: the same fusions in
    the quantized GEMV, whose 1 / rms factor multiplies the finished sums; not rounded where the separate ops round).

    It takes the block's place in `model.layers` and registers the block's children as its own, so every module
    path and state_dict key stays the block's; the block itself is kept outside the module tree and runs every input
    but one-row decode (prefill, batches, prefix keys). Installed only where it computes exactly what the block does:
    `unsupported(block)` says why not elsewhere (post-norms, LayerNorm, unpacked or wrapped projections, ...)."""

    attn_post_norm = mlp_post_norm = None  # as in the blocks it wraps (pre-norm only)

    def __init__(self, block: Block, options: KernelOptions = DEFAULT):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.__dict__["block"] = block
        self.options = options

    def train(self, mode: bool = True) -> FusedDecodeBlock:
        self.block.training = mode  # its children are ours: set by super().train
        return super().train(mode)

    @staticmethod
    def unsupported(block: nn.Module) -> str | None:
        """None when the fused one-row forward computes exactly what `block` does, else the reason it does not."""
        if type(block) is not Block:
            return f"block type {type(block).__name__} (the fused forward computes Block's)"
        if block.attn_post_norm is not None or block.mlp_post_norm is not None:
            return f"norm_placement={block.attn.cfg.norm_placement} (norms after attention / MLP)"
        if block.mlp_norm is None or type(block.attn_norm) is not RMSNorm or type(block.mlp_norm) is not RMSNorm:
            return "not two RMSNorm pre-norms (parallel block or LayerNorm)"
        if (type(block.attn) is not Attention or type(block.attn.qkv) not in (PackedQKV, PackedQuantQKV)
                or not _fusable(block.attn.o_proj)):
            return "attention projections not packed plain or quantized linears (LoRA or tensor-parallel)"
        gate_up = getattr(block.mlp, "gate_up_down", None)
        if (type(block.mlp) is not MLP or type(gate_up) not in (PackedGateUp, PackedQuantGateUp)
                or not _fusable(block.mlp.down_proj)):
            return "MLP not a packed gated MLP of plain or quantized linears (mixture of experts, LoRA)"
        if block.mlp.act is not F.silu or block.mlp.limit is not None:
            return f"activation {block.attn.cfg.act} (the fused down projection computes plain SiLU gating)"
        return None

    @staticmethod
    def supports(block: nn.Module) -> bool:
        return FusedDecodeBlock.unsupported(block) is None

    def forward(self, x, rope, mask, cache, slots, prefix_kv=None) -> torch.Tensor:
        if prefix_kv is None and x.numel() == x.shape[-1] and all(
                _kernel_runs(p, x, self.options) for p in (self.attn.qkv, self.attn.o_proj, self.mlp.gate_up_down,
                                                            self.mlp.down_proj)):
            return self.decode_row(x, rope, mask, cache, slots)
        return self.block(x, rope, mask, cache, slots, prefix_kv)

    def decode_row(self, x, rope, mask, cache, slots) -> torch.Tensor:  # x: (1, 1, d_model)
        attn, mlp, launch = self.attn, self.mlp, gemv.launch_args(self.options)
        qkv, o = attn.qkv, attn.o_proj
        q, k, v = _normed(x, self.attn_norm, qkv, launch).split(qkv.sizes, dim=-1)
        y = attn.mix(q, k, v, rope, mask, cache, slots)
        x = o.fused(y, residual=x) if isinstance(o, QuantLinear) else gemv.gemv(y, o.weight, o.bias, x, **launch)
        gate_up, down = mlp.gate_up_down, mlp.down_proj
        h = _normed(x, self.mlp_norm, gate_up, launch)  # (1, 1, 2 * d_ff)
        if isinstance(down, QuantLinear):
            return down.fused(h, silu=True, residual=x)
        return gemv.gemv_silu_mul(h, down.weight, down.bias, x, **launch)


def _normed(x: torch.Tensor, norm: RMSNorm, packed: PackedQKV, launch: dict) -> torch.Tensor:
    if isinstance(packed, _QuantRows):
        return packed.layer.fused(x, norm=(norm.weight, norm.eps, float(norm.offset)))
    return gemv.gemv_rmsnorm(x, norm.weight, norm.eps, float(norm.offset), packed.weight, packed.bias, **launch)


def _fusable(linear: nn.Module) -> bool:
    """A projection the fused block can call with its fusions: a GEMV linear or a quantized one."""
    return type(linear) is DecodeLinear or isinstance(linear, QuantLinear)


def _kernel_runs(proj: nn.Module, x: torch.Tensor, options: KernelOptions) -> bool:
    """Whether `proj` (packed, GEMV or quantized) runs its one-row kernel on `x`: the GEMV for bf16 weights, the
    quantized layer's own kernels where they run (elsewhere its fused call falls back to torch ops: no faster than
    the block's own forward)."""
    if isinstance(proj, _QuantRows):
        proj = proj.layer
    if isinstance(proj, QuantLinear):
        return qkernel.use_kernel(x, proj.kernels)
    return gemv.use_gemv(x, proj.weight, options)


def _pack(linears: list[nn.Module], cls: type[PackedQKV], quant_cls: type[_QuantRows],
          options: KernelOptions = DEFAULT) -> tuple[nn.Module | None, str | None]:
    """(packed module, None) for plain nn.Linear layers sharing dtype/device/bias-ness, or quantized ones
    `QuantLinear.pack` accepts; else (None, why not)."""
    if all(isinstance(m, QuantLinear) for m in linears):
        layer = type(linears[0]).pack(linears)
        if layer is None:
            return None, f"{type(linears[0]).__name__} layers that do not pack (kind, options or fast layout)"
        return quant_cls(layer, [m.out_features for m in linears]), None
    if not all(type(m) in (nn.Linear, DecodeLinear) for m in linears):
        kinds = sorted({type(m).__name__ for m in linears} - {"Linear", "DecodeLinear"})
        return None, f"{', '.join(kinds)} projections"
    w0 = linears[0].weight
    if any(m.weight.dtype != w0.dtype or m.weight.device != w0.device or (m.bias is None) != (linears[0].bias is None)
           or m.in_features != linears[0].in_features for m in linears):
        return None, "projections of different dtypes, devices or biases"
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
    return cls(weight, bias, [m.out_features for m in linears], options), None


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


# the model's projection seams, what reads their input, and what packs them
_SEAMS = {QKVProjection: ("packed_qkv", ("q_proj", "k_proj", "v_proj"), PackedQKV, PackedQuantQKV),
          GatedProjections: ("packed_gate_up", ("gate_proj", "up_proj"), PackedGateUp, PackedQuantGateUp)}


@torch.no_grad()
def pack_for_decode(model: Transformer, options: KernelOptions = DEFAULT) -> dict:
    """Install the fast decode paths on `model` (in place), launching their kernels with `options`; returns what
    was done, for logs and tests. Packing again (another engine's options) keeps the packs and takes the options."""
    done = {"packed_qkv": 0, "packed_gate_up": 0}
    unpacked: Counter[str] = Counter()  # why projections keep their own matmuls
    for path, seam in list(model.named_modules()):
        if isinstance(seam, _QuantRows):  # packed by an earlier engine: the layer outside the tree takes these too
            seam.layer.kernels = options.quant_kernels()
        elif isinstance(seam, PackedQKV):
            seam.options = options
        elif type(seam) in _SEAMS:
            key, names, cls, quant_cls = _SEAMS[type(seam)]
            owner = model.get_submodule(path.rpartition(".")[0])
            packed, reason = _pack([getattr(owner, n) for n in names], cls, quant_cls, options)
            if packed is None:
                unpacked[f"{'/'.join(n.removesuffix('_proj') for n in names)} not packed ({reason})"] += 1
            else:
                set_module(model, path, packed)
                done[key] += 1
    # plain linears, and those a pack with other options installed (an earlier engine's), get this pack's
    done["gemv_linears"] = _swap_linears(model, lambda m: DecodeLinear.of(m, options) if type(m) is nn.Linear or (
        type(m) is DecodeLinear and m.options != options) else None)
    done["fused_blocks"] = 0
    unfused: Counter[str] = Counter()
    for i, block in enumerate(model.layers):
        block = _unwrapped(block)
        reason = FusedDecodeBlock.unsupported(block)
        set_module(model, f"layers.{i}", block if reason else FusedDecodeBlock(block, options))
        if reason is None:
            done["fused_blocks"] += 1
        else:
            unfused[reason] += 1
    if unfused:  # those blocks decode through their own forward (packed projections, GEMV linears still apply)
        done["unfused_blocks"] = dict(unfused)
    if unfused or unpacked:
        log.info("fast decode: %s", "; ".join([f"fused decode blocks off for {n} blocks: {r}" for r, n in unfused.items()]
                                              + [f"{r} in {n} modules" for r, n in unpacked.items()]))
    if model.lm_head is None:
        model.tied_head = DecodeTiedHead(options)
    return done


def _unwrapped(block: nn.Module) -> nn.Module:
    """The block a `FusedDecodeBlock` wraps, with the wrapper's children (any swapped since) put back; else `block`."""
    if not isinstance(block, FusedDecodeBlock):
        return block
    for name, child in block.named_children():
        setattr(block.block, name, child)
    return block.block


def unpack_for_decode(model: Transformer, keep_gemv: bool = True) -> None:
    """Back to the model's own blocks and one matmul per projection (the weights stay where they are: views of the
    packed storage); with `keep_gemv=False` also back to plain `nn.Linear` / `TiedHead` everywhere."""
    for i, block in enumerate(model.layers):
        set_module(model, f"layers.{i}", _unwrapped(block))
    for path, module in list(model.named_modules()):
        if isinstance(module, PackedGateUp):
            set_module(model, path, GatedProjections())
        elif isinstance(module, PackedQKV):
            set_module(model, path, QKVProjection())
    if not keep_gemv:
        _swap_linears(model, lambda m: m.plain() if type(m) is DecodeLinear else None)
        model.tied_head = TiedHead()
