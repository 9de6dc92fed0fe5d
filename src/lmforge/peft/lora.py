"""LoRA: a frozen linear plus a trainable low-rank update, ``y = W x + (B A x) * scaling``.

`apply_lora` wraps the model's linears in place (after construction, by module path), so the native model code never
changes. A `LoRALinear` only calls ``base_layer(x)`` and reads ``in_features``/``out_features`` (and ``weight`` to
merge), so the same wrapper works over a plain ``nn.Linear`` or a quantized linear.

Target names follow PEFT: a list entry matches a module path exactly or as its last dotted components
(``"q_proj"`` matches ``layers.3.attn.q_proj``), a single string is a regex that must match the whole path, and
``"all-linear"`` means every attention/MLP linear but not ``lm_head``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..config import Section, aliases
from ..errors import CheckpointError, ConfigError
from ..checkpoint import load_tensors_into  # noqa: F401  (re-exported)
from ..models.modules import ALL_LINEAR, OUTPUT_HEAD, linear_modules, select_targets  # noqa: F401  (re-exported)
from ..models.modules import matches as _matches
from ..models.modules import set_module

__all__ = ["LoraConfig", "LoRALinear", "apply_lora", "merge_lora", "merged", "lora_layers", "lora_state_dict",
           "linear_modules", "select_targets", "compact_targets", "modules_to_save", "load_tensors_into", "rank_for"]

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraConfig(Section):
    """Which linears get a LoRA update and how it is shaped and scaled."""

    r: int = Field(8, ge=1, validation_alias=aliases("r", "rank", "lora_rank"))
    """Rank of the update: A is (r, in_features), B is (out_features, r)."""
    alpha: float = Field(16, gt=0, validation_alias=aliases("alpha", "lora_alpha"))
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = Field(0.0, ge=0, lt=1, validation_alias=aliases("dropout", "lora_dropout"))
    """Dropout on the LoRA branch's input, active in training mode only."""
    target_modules: list[str] | str = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Linears to wrap: names matching a path's last components (q_proj, attn.o_proj) or a full path, a single
    regex string matched against the whole path (PEFT semantics), or 'all-linear' (every attention/MLP linear,
    not lm_head). Names missing from an architecture are skipped; matching nothing at all is an error."""
    use_rslora: bool = False
    """Rank-stabilized LoRA: scale by alpha / sqrt(r) instead of alpha / r."""
    init: Literal["default", "gaussian"] = "default"
    """Init of A: 'default' is Kaiming-uniform (a=sqrt(5)), 'gaussian' is N(0, 1/r); B always starts at zero."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Non-LoRA modules trained fully and saved with the adapter, e.g. ['embed', 'lm_head'] (native names)."""
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    """Per-module ranks overriding r, keyed like target names ('layers.3.attn.q_proj', or 'q_proj' for all of them);
    each such layer is scaled by alpha / its own rank (PEFT's rank_pattern)."""
    use_dora: bool = False
    """DoRA: split each updated weight into a trained magnitude and a LoRA-updated direction (see peft.dora)."""


# --------------------------------------------------------------------------------------------------------- layer


def _reference_tensor(module: nn.Module) -> torch.Tensor:
    """Any parameter or buffer of `module`: where (device) the LoRA weights should live."""
    for t in (*module.parameters(), *module.buffers()):
        return t
    raise ConfigError(f"cannot wrap {type(module).__name__} with LoRA: it has no weights")


@torch.library.custom_op("lmforge::lora_linear", mutates_args=())
def _lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, mid): y = x W^T + bias + s * mid B^T with mid = x A^T, the low-rank term added by an in-place addmm on the
    base GEMM's output (its epilogue), so no pass over the (n, out) output is spent on scale, add or a copy.

    A custom op, opaque to torch.compile: inductor would turn the out-of-place form into addmm(y, ...) plus a copy
    of y (a memcpy of every output, 5% of a LoRA 1B step), and torch 2.11 lost the gradients of an autograd.Function
    it traced. x (n, in), W (out, in), A (r, in), B (out, r), one dtype."""
    mid = x @ a.T  # (n, r)
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T  # (n, out)
    return y.addmm_(mid, b.T, alpha=scaling), mid


@_lora_linear.register_fake
def _(x, weight, bias, a, b, scaling):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], a.shape[0])


@torch.library.custom_op("lmforge::lora_linear_backward", mutates_args=())
def _lora_linear_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor,
                          b: torch.Tensor, mid: torch.Tensor, scaling: float, need_grad_x: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_A, grad_B) of `_lora_linear`; grad_x is empty when x needs none (the base input gradient's
    low-rank part is added in place, as in forward)."""
    grad_mid = (grad_y @ b).mul_(scaling)  # (n, r)
    grad_b = (grad_y.T @ mid).mul_(scaling)  # (out, r)
    grad_a = grad_mid.T @ x  # (r, in)
    grad_x = (grad_y @ weight).addmm_(grad_mid, a) if need_grad_x else x.new_empty(0)  # (n, in)
    return grad_x, grad_a, grad_b


@_lora_linear_backward.register_fake
def _(grad_y, x, weight, a, b, mid, scaling, need_grad_x):
    return (x.new_empty(x.shape) if need_grad_x else x.new_empty(0)), a.new_empty(a.shape), b.new_empty(b.shape)


def _lora_linear_setup(ctx, inputs, output):
    x, weight, _, a, b, scaling = inputs
    ctx.save_for_backward(x, weight, a, b, output[1])
    ctx.scaling = scaling
    ctx.need_grad_x = ctx.needs_input_grad[0]
    ctx.mark_non_differentiable(output[1])


def _lora_linear_grad(ctx, grad_y, _grad_mid):
    x, weight, a, b, mid = ctx.saved_tensors
    grad_x, grad_a, grad_b = torch.ops.lmforge.lora_linear_backward(grad_y, x, weight, a, b, mid, ctx.scaling,
                                                                    ctx.need_grad_x)
    return (grad_x if ctx.need_grad_x else None), None, None, grad_a, grad_b, None


_lora_linear.register_autograd(_lora_linear_grad, setup_context=_lora_linear_setup)


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """LoRA over a frozen plain linear in one autograd node: x (..., in) -> (..., out). Runs in autocast's dtype
    inside an autocast region, else in x's; fp32 adapter weights get their gradients through the cast."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    y, _ = _lora_linear(x2, weight.to(dtype), None if bias is None else bias.to(dtype), lora_a.to(dtype),
                        lora_b.to(dtype), float(scaling))
    return y.view(*lead, y.shape[-1])


class LoRALinear(nn.Module):
    """``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``; the base stays frozen.

    Shapes: x (..., in_features) -> (..., out_features); lora_A.weight (r, in_features); lora_B.weight
    (out_features, r). LoRA weights are float32 when the base is half precision (master weights, as PEFT does) and
    are cast to x's dtype in the forward. With B at zero (its init) the output equals the base output exactly.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "default"):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        ref = _reference_tensor(base_layer)
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=ref.device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=ref.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters(init)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        # the fused op over a frozen plain linear (eager and compiled); any other base takes the plain form below
        if (type(base) is nn.Linear and not base.weight.requires_grad
                and (isinstance(self.lora_dropout, nn.Identity) or not self.training)):
            return fused_lora_linear(x, base.weight, base.bias, self.lora_A.weight, self.lora_B.weight, self.scaling)
        y = base(x)
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        mid = F.linear(self.lora_dropout(x), a)  # (..., r)
        if mid.dtype != y.dtype:  # e.g. a quantized base returning its own dtype
            return y + F.linear(mid, b) * self.scaling
        # y + s * mid @ B^T as one GEMM whose epilogue adds y (no separate scale and add passes over the output)
        return torch.addmm(y.reshape(-1, y.shape[-1]), mid.reshape(-1, mid.shape[-1]), b.T,
                           alpha=self.scaling).view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        """The update B @ A * scaling as a float32 (out_features, in_features) matrix."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """This layer's trained tensors by their name under the layer (the same names PEFT files use)."""
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def merged_weight(self) -> torch.Tensor:
        """float32 (out_features, in_features): the single weight computing what this layer computes (W + delta)."""
        return self.base_layer.weight.float() + self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (forward then skips the LoRA branch)."""
        if not self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from the base weight again (exact up to the base dtype's rounding)."""
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    @torch.no_grad()
    def merged_linear(self, device: torch.device | str | None = None) -> nn.Linear:
        """A new plain ``nn.Linear`` (base dtype, on `device` or the base's) holding W + delta; self is unchanged."""
        w, bias = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        weight = w.float() if self.merged else self.merged_weight()
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        out.weight = nn.Parameter(weight.to(device=device or w.device, dtype=w.dtype), requires_grad=False)
        if bias is not None:
            out.bias = nn.Parameter(bias.detach().to(device or bias.device).clone(), requires_grad=False)
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


# ------------------------------------------------------------------------------------------------ module lookups


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{path: LoRALinear} of every LoRA-wrapped linear, in module order."""
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


def compact_targets(chosen: list[str], paths: list[str]) -> list[str]:
    """The shortest target list selecting exactly `chosen` among `paths`: last path components when those are
    unambiguous (['q_proj', 'v_proj']), else the full paths (e.g. GPT-2's attn.c_proj vs mlp.c_proj)."""
    short = sorted({p.rsplit(".", 1)[-1] for p in chosen})
    return short if set(select_targets(paths, short)) == set(chosen) else sorted(chosen)


def modules_to_save(model: nn.Module, names: list[str], exclude: list[str] = ()) -> dict[str, nn.Module]:
    """{path: module} for `names` (matched like target names) among modules that own parameters directly.

    One-line ConfigError when a name matches nothing or names a module in `exclude` (the LoRA targets)."""
    inside_lora = tuple(f"{p}." for p in lora_layers(model))
    owners = {p: m for p, m in model.named_modules()
              if p and not p.startswith(inside_lora) and next(m.parameters(recurse=False), None) is not None}
    out: dict[str, nn.Module] = {}
    for name in names:
        if any(_matches(p, [name]) for p in exclude):
            raise ConfigError(f"LoRA modules_to_save '{name}' is also a LoRA target; list it in only one of them")
        hits = {p: m for p, m in owners.items() if _matches(p, [name])}
        if not hits:
            tops = sorted({p.rsplit(".", 1)[-1] for p in owners})
            raise ConfigError(f"LoRA modules_to_save '{name}' matches no module with weights; "
                              f"available: {', '.join(tops)}")
        out.update(hits)
    return out


# ----------------------------------------------------------------------------------------------------- operations


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap the linears `cfg` targets in LoRALinear, in place; return their paths.

    Afterwards only the LoRA weights (and `cfg.modules_to_save`) have requires_grad=True.
    """
    if lora_layers(model):
        raise ConfigError("the model already has LoRA layers; apply LoRA once (or load the adapter into a fresh model)")
    linears = linear_modules(model)
    targets = select_targets(list(linears), cfg.target_modules)
    if not targets:
        names = sorted({p.rsplit(".", 1)[-1] for p in linears})
        raise ConfigError(f"LoRA target_modules {cfg.target_modules!r} match no linear layer; available: "
                          f"{', '.join(names)} (or 'all-linear', or full paths like '{next(iter(linears), '')}')")
    for path in targets:
        if hasattr(linears[path], "base_layer"):
            raise ConfigError(f"'{path}' is already wrapped by {type(linears[path]).__name__}; apply one adapter "
                              "method to a fresh base model")
    trained = modules_to_save(model, cfg.modules_to_save, exclude=targets)
    layer_cls = LoRALinear
    if cfg.use_dora:
        from .dora import DoRALinear as layer_cls
    model.requires_grad_(False)
    for path in targets:
        r = rank_for(path, cfg)
        set_module(model, path, layer_cls(linears[path], r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.init))
    for module in trained.values():
        module.requires_grad_(True)
    return targets


def rank_for(path: str, cfg: LoraConfig) -> int:
    """The rank of the LoRA on `path`: the most specific (longest) matching rank_pattern key, else cfg.r."""
    keys = [k for k in cfg.rank_pattern if _matches(path, [k])]
    return cfg.rank_pattern[max(keys, key=len)] if keys else cfg.r


def merge_lora(model: nn.Module) -> list[str]:
    """Replace every LoRALinear by its merged plain nn.Linear (for export); return the replaced paths."""
    return replace_with_merged(model, lora_layers(model))


def replace_with_merged(model: nn.Module, layers: dict[str, nn.Module]) -> list[str]:
    """Replace each wrapper in `layers` ({path: module with `merged_linear`}) by its merged plain nn.Linear."""
    for path, layer in layers.items():
        set_module(model, path, layer.merged_linear())
    return list(layers)


@contextmanager
def merged(model: nn.Module, device: torch.device | str | None = None) -> Iterator[nn.Module]:
    """Temporarily swap every LoRALinear for a merged nn.Linear (on `device`, e.g. "cpu" to keep GPU memory free),
    so `model` looks like a plain model (e.g. to `save_hf` it); the LoRA layers come back unchanged afterwards."""
    with swapped_for_merged(model, lora_layers(model), device):
        yield model


@contextmanager
def swapped_for_merged(model: nn.Module, layers: dict[str, nn.Module],
                       device: torch.device | str | None = None) -> Iterator[nn.Module]:
    """Temporarily swap each wrapper in `layers` for its merged nn.Linear (built on `device`); restore afterwards."""
    try:
        for path, layer in layers.items():
            set_module(model, path, layer.merged_linear(device))
        yield model
    finally:
        for path, layer in layers.items():
            set_module(model, path, layer)


def lora_state_dict(model: nn.Module, cfg: LoraConfig | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors only, by native name ('layers.0.attn.q_proj.lora_A.weight', ...), sharing storage with
    the model; with `cfg`, also the full tensors of its modules_to_save ('lm_head.weight')."""
    out = {f"{path}.{name}": t.detach() for path, layer in lora_layers(model).items()
           for name, t in layer.adapter_tensors().items()}
    if cfg is not None:
        for path, module in modules_to_save(model, cfg.modules_to_save).items():
            out.update({f"{path}.{n}": p.detach() for n, p in module.named_parameters(recurse=False)})
    return out
