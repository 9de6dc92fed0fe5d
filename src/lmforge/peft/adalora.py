"""AdaLoRA (Zhang et al. 2023): SVD-form adapters whose total rank is pruned to a budget by importance.

Each target linear gets ``delta W = B diag(E) A * alpha / ranknum`` with A (r, in), E (r, 1), B (out, r) trained, where
ranknum is the initial rank. Training keeps, per entry, an EMA of the sensitivity ``|w * dL/dw|`` and of its
uncertainty; a triplet i (E_i, row i of A, column i of B) scores ``s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)`` with
``s = ema_sensitivity * ema_uncertainty``. The budget (total kept triplets over all layers) falls from ``init_r`` per
layer to ``target_r`` per layer on a cubic schedule between ``tinit`` and ``total_step - tfinal``; every ``delta_t``
steps the lowest-scoring triplets get E_i = 0. A regulariser ``orth_reg_weight * mean ||P^T P - I||_F`` keeps A's rows
and B's columns orthogonal (added to the gradients). Then the final mask is held fixed.

Adapters are PEFT ADALORA files: pruned triplets are dropped from the tensors and listed in ``rank_pattern``, and
the scale stays ``alpha / init_r`` (PEFT keeps ranknum), so peft loads them and computes the same logits.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pydantic
import torch
from pydantic import Field, PrivateAttr
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..models.converters import converter_for
from ..models.hf import save_hf
from .common import (float_master_dtype, merge_layers, merged_layers, read_adapter_config, read_adapter_tensors,
                     wrap_linears, write_adapter_dir)
from .hooks import StepHooks
from .lora import compact_targets, load_tensors_into, select_targets
from .methods import Method, register_method
from .peft_format import PREFIX, _hf_names, _is_conv1d

__all__ = ["SVDLinear", "AdaLoraMethod", "budget_schedule"]

TRIPLET = ("lora_A", "lora_E", "lora_B")


class SVDLinear(nn.Module):
    """``base(x) + (dropout(x) @ (A * E)^T @ B^T) * alpha / ranknum`` with x (..., in) -> (..., out).

    Buffers: ``rank_mask`` (r,) bool (triplets still kept), ``steps`` () the optimizer steps seen, and for each of
    A/E/B the EMA of its sensitivity and uncertainty (same shape as the parameter), so a checkpoint resumes exactly.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, ranknum: int | None = None):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.ranknum = r, alpha, float(ranknum or r)
        device, dtype = float_master_dtype(base_layer)
        self.lora_A = nn.Parameter(torch.randn(r, self.in_features, device=device, dtype=dtype) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.randn(self.out_features, r, device=device, dtype=dtype) * 0.02)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=device))
        for name in TRIPLET:
            p = getattr(self, name)
            self.register_buffer(f"{name}_ipt", torch.zeros_like(p))
            self.register_buffer(f"{name}_unc", torch.zeros_like(p))

    @property
    def scaling(self) -> float:
        return self.alpha / (self.ranknum + 1e-5)  # PEFT's epsilon, for identical logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        ae = (self.lora_A * self.lora_E).to(x.dtype)  # (r, in)
        return y + (self.lora_dropout(x) @ ae.T @ self.lora_B.to(x.dtype).T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float())) * self.scaling

    @torch.no_grad()
    def merged_linear(self, device: torch.device | str | None = None) -> nn.Linear:
        w, bias = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        device = device or w.device
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        out.weight = nn.Parameter((w.float() + self.delta_weight()).to(device=device, dtype=w.dtype),
                                  requires_grad=False)
        if bias is not None:
            out.bias = nn.Parameter(bias.detach().to(device).clone(), requires_grad=False)
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, kept={int(self.rank_mask.sum())}, ranknum={self.ranknum:g}, alpha={self.alpha:g}"


def svd_layers(model: nn.Module) -> dict[str, SVDLinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, SVDLinear)}


def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total: int,
                    delta_t: int) -> tuple[int, bool]:
    """(budget, mask now?) at `step`: full budget until tinit, cubic decrease to the target until total - tfinal,
    masking every delta_t steps; afterwards the target budget, masked every step (AdaLoRA eq. 12)."""
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    progress = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_budget - target_budget) * progress ** 3 + target_budget), step % delta_t == 0


@register_method
class AdaLoraMethod(Method):
    """AdaLoRA: SVD-form adapters, importance-based rank allocation to a total budget; PEFT ADALORA artifacts."""

    name: ClassVar[str] = "adalora"
    trains: ClassVar[str] = "SVD-form P diag(E) Q updates, ranks pruned to a budget"
    artifact: ClassVar[str] = "PEFT adapter (ADALORA)"

    init_r: int = Field(12, ge=1)
    """Initial rank of every adapter."""
    target_r: int = Field(8, ge=0)
    """Average rank per adapter at the end (the budget is target_r * number of adapters)."""
    alpha: float = Field(32, gt=0)
    """Scale numerator: the update is multiplied by alpha / init_r."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter branch's input, active in training mode only."""
    target_modules: list[str] | str = Field(default_factory=lambda: ["q_proj", "v_proj"])
    """Linears to wrap with an SVD-form adapter (names or a regex, as lora.target_modules)."""
    total_step: int | None = Field(None, ge=1)
    """Optimizer steps the budget schedule spans; None = the run's length (train.max_steps, or train.epochs over
    the data), which `lmforge train` fills in."""
    tinit: int = Field(0, ge=0)
    """Steps of warmup at the full budget."""
    tfinal: int = Field(0, ge=0)
    """Final steps with the budget fixed at the target."""
    delta_t: int = Field(1, ge=1)
    """Reallocate the budget every delta_t steps."""
    beta1: float = Field(0.85, gt=0, lt=1)
    """EMA decay of the sensitivity."""
    beta2: float = Field(0.85, gt=0, lt=1)
    """EMA decay of the uncertainty."""
    orth_reg_weight: float = Field(0.5, ge=0)
    """Weight of the orthogonality regulariser on A and B."""
    _owner: dict = PrivateAttr(default_factory=dict)  # id(param) -> (layer, "lora_A" | "lora_E" | "lora_B")
    _n_orth: int = PrivateAttr(0)  # matrices in the regulariser's mean
    _hooks: StepHooks | None = PrivateAttr(None)  # per-step callbacks on the model it was applied to
    _step: int = PrivateAttr(0)  # optimizer steps seen (mirrors the layers' `steps` buffers without a device sync)

    @pydantic.model_validator(mode="after")
    def _schedule(self):
        if self.target_r > self.init_r:
            raise ValueError("adalora target_r must be <= init_r (the budget only shrinks)")
        if self.total_step is not None and self.tinit + self.tfinal >= self.total_step:
            raise ValueError("adalora tinit + tfinal must be < total_step (no steps left to reallocate)")
        return self

    # ----------------------------------------------------------------------------------------- applying
    def apply(self, model: nn.Module, ranks: dict[str, int] | None = None) -> None:
        """Wrap the targets in SVDLinear (rank init_r, or `ranks[path]` when loading a pruned adapter)."""
        if self.total_step is None:
            raise ConfigError("adalora.total_step is unset: `lmforge train` sets it to the run's length; set it when "
                              "applying the method yourself")
        ranks = ranks or {}
        wrap_linears(model, self.target_modules, lambda path, lin: SVDLinear(
            lin, ranks.get(path, self.init_r), self.alpha, self.dropout, ranknum=self.init_r), "adalora")
        layers = svd_layers(model)
        self._owner = {id(getattr(l, n)): (l, n) for l in layers.values() for n in TRIPLET}
        self._n_orth = 2 * len(layers)
        params = [getattr(l, n) for l in layers.values() for n in TRIPLET]
        self._hooks = StepHooks(model, params, on_grad=self._on_grad,
                                on_step=lambda step: self._after_step(model, step))

    def _on_grad(self, p: nn.Parameter) -> None:
        layer, name = self._owner[id(p)]
        if name != "lora_E" and self.orth_reg_weight > 0:
            with torch.enable_grad():
                q = p.detach().float().requires_grad_(True)
                cov = q @ q.T if name == "lora_A" else q.T @ q
                reg = torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device), "fro")
                (grad,) = torch.autograd.grad(reg * self.orth_reg_weight / self._n_orth, q)
            p.grad.add_(grad.to(p.grad.dtype))
        if self._step < self.total_step - self.tfinal:  # importance is frozen once the budget is final
            ipt = (p * p.grad).abs()
            ema, unc = getattr(layer, f"{name}_ipt"), getattr(layer, f"{name}_unc")
            ema.mul_(self.beta1).add_(ipt, alpha=1 - self.beta1)
            unc.mul_(self.beta2).add_((ipt - ema).abs(), alpha=1 - self.beta2)

    def on_step(self, model: nn.Module, step: int) -> None:
        if self._hooks is not None:
            self._hooks.step_done(step)

    def _after_step(self, model: nn.Module, step: int) -> None:
        """Optimizer step `step` is done: record it, reallocate the budget on schedule."""
        layers = list(svd_layers(model).values())
        self._step = step
        for layer in layers:
            layer.steps.fill_(step)
        init_budget = sum(l.r for l in layers)
        budget, mask_now = budget_schedule(step, init_budget, self.target_r * len(layers), self.tinit, self.tfinal,
                                           self.total_step, self.delta_t)
        if step > self.total_step - self.tfinal:  # budget final: keep the pruned triplets at zero
            for layer in layers:
                layer.lora_E.masked_fill_(~layer.rank_mask[:, None], 0.0)
        elif (mask_now or step == self.total_step - self.tfinal) and budget < init_budget:  # the final one is forced
            self.mask_to_budget(layers, budget)

    @torch.no_grad()
    def mask_to_budget(self, layers: list[SVDLinear], budget: int) -> None:
        """Keep the `budget` highest-scoring triplets over all layers; zero E of the rest and record the masks."""
        scores = []
        for l in layers:
            s = {n: getattr(l, f"{n}_ipt") * getattr(l, f"{n}_unc") for n in TRIPLET}
            scores.append(s["lora_E"].view(-1) + s["lora_A"].mean(1) + s["lora_B"].mean(0))  # (r,)
        everything = torch.cat(scores)
        threshold = torch.kthvalue(everything.float().cpu(), everything.numel() - budget).values.item()
        for l, s in zip(layers, scores):
            l.rank_mask.copy_(s > threshold)
            l.lora_E.masked_fill_(~l.rank_mask[:, None], 0.0)

    # ------------------------------------------------------------------------------------- saving/loading
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{p}.{n}": t.detach() for p, l in svd_layers(model).items()
                for n, t in (*l.named_parameters(recurse=False), *l.named_buffers(recurse=False))}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(model, state)
        if self._hooks is not None:
            self._hooks.step = self._step = int(next(iter(svd_layers(model).values())).steps)

    def save(self, model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
        """PEFT ADALORA adapter: kept triplets only, rank_pattern lists the masks."""
        layers = svd_layers(model)
        conv = converter_for(model.cfg.arch)
        hf = _hf_names(conv, model)
        if any(hf[p] is None for p in layers):
            raise ConfigError(f"{model.cfg.arch} fuses q/k/v in one tensor; a PEFT adapter cannot hold an AdaLoRA on "
                              "one of them: pick other target_modules")
        tensors, pattern = {}, {}
        for p, l in layers.items():
            keep = l.rank_mask
            tensors[f"{PREFIX}{hf[p]}.lora_A"] = l.lora_A[keep]
            tensors[f"{PREFIX}{hf[p]}.lora_E"] = l.lora_E[keep]
            tensors[f"{PREFIX}{hf[p]}.lora_B"] = l.lora_B[:, keep]
            pattern[f"{hf[p]}.lora_E"] = keep.tolist()
        linears = [h for h in hf.values() if h is not None]
        config = {
            "peft_type": "ADALORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "init_r": self.init_r, "target_r": self.target_r, "r": self.init_r, "lora_alpha": self.alpha,
            "lora_dropout": self.dropout, "target_modules": compact_targets([hf[p] for p in layers], linears),
            "tinit": self.tinit, "tfinal": self.tfinal, "deltaT": self.delta_t, "beta1": self.beta1,
            "beta2": self.beta2, "orth_reg_weight": self.orth_reg_weight, "total_step": self.total_step,
            "rank_pattern": pattern, "fan_in_fan_out": any(_is_conv1d(conv, p) for p in layers),
            "init_lora_weights": True, "inference_mode": True, "bias": "none", "modules_to_save": None,
            "use_dora": False, "use_rslora": False, "layers_to_transform": None, "layers_pattern": None,
            "alpha_pattern": {}, "exclude_modules": None, "revision": None,
        }
        return write_adapter_dir(out_dir, config, tensors)

    def load(self, model: nn.Module, path: str | Path) -> None:
        """Apply and load a PEFT ADALORA adapter (pruned ranks from its rank_pattern, scale alpha / init_r)."""
        raw = read_adapter_config(path)
        if raw.get("peft_type") != "ADALORA":
            raise CheckpointError(f"{path}: peft_type {raw.get('peft_type')!r} is not an ADALORA adapter")
        conv = converter_for(model.cfg.arch)
        hf = {p: h for p, h in _hf_names(conv, model).items() if h is not None}
        to_native = {h: p for p, h in hf.items()}
        targets = sorted(to_native[h] for h in select_targets(list(to_native), raw.get("target_modules") or []))
        try:
            method = AdaLoraMethod(
                init_r=raw["init_r"], target_r=raw.get("target_r", raw["init_r"]), alpha=raw["lora_alpha"],
                dropout=raw.get("lora_dropout") or 0.0, target_modules=targets, total_step=raw.get("total_step") or 1,
                tinit=0, tfinal=0, delta_t=raw.get("deltaT") or 1)
        except (KeyError, pydantic.ValidationError) as e:
            detail = f"missing '{e.args[0]}'" if isinstance(e, KeyError) else e.errors()[0]["msg"]
            raise CheckpointError(f"{path}: invalid ADALORA settings ({detail})") from None
        masks = {}
        for key, keep in (raw.get("rank_pattern") or {}).items():
            native = to_native.get(key.removesuffix(".lora_E").removeprefix(PREFIX))
            if native is None:
                raise CheckpointError(f"{path}: rank_pattern names '{key}', which {model.cfg.arch} has no linear for")
            masks[native] = torch.tensor(keep, dtype=torch.bool)
        method.apply(model, ranks={p: int(m.sum()) for p, m in masks.items()})
        method._hooks.remove()  # a loaded adapter is for inference; train it by applying a fresh method
        incoming, shown = {}, {}
        for key, t in read_adapter_tensors(path).items():
            module, _, name = key.removeprefix(PREFIX).rpartition(".")
            native = f"{conv.native_module_name(module) or module}.{name}"
            incoming[native], shown[native] = t, key
        current = {f"{p}.{n}": getattr(l, n) for p, l in svd_layers(model).items() for n in TRIPLET}
        load_tensors_into(current, incoming, f"{path}", display_names=shown)

    def merge(self, model: nn.Module) -> None:
        merge_layers(model)

    def export(self, model: nn.Module, out_dir: str | Path) -> Path:
        with merged_layers(model, device="cpu"):
            return save_hf(model, out_dir)
