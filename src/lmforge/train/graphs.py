"""One optimizer step as one CUDA graph (`train.cuda_graphs`): the host launches a whole step with one call.

A LoRA step of a 1B model is bound by the host, not the GPU: Python queues ~2,500 kernels (forward, recompute,
backward, clipping, AdamW) and the GPU idles between them. Capturing the step — every micro-batch's forward and
backward, gradient clipping, the optimizer update, freeing the gradients — leaves one replay per step.

How: the first step of each batch signature (shapes and the rows' causal-only flag) runs eagerly; it compiles the
blocks, creates the optimizer state and warms cuBLAS. The next step of that signature is captured over static
input buffers and replayed; later steps copy their batch into the buffers and replay. What a graph would otherwise
freeze as constants comes in through device tensors refilled before each replay: the loss scale (dp / the step's
target tokens) and each parameter group's learning rate (from the schedule). No shape depends on the data: the loss
runs every row through the head with ignored targets weighted 0 (`causal_lm_loss_sum(fixed_shapes=True)`), and
rows are padded to a multiple of `PAD_MULTIPLE` tokens so few signatures occur.

Not capturable (the trainer refuses them in one line): fp16 loss scaling (the scaler checks for inf on the host),
distributed or pipelined runs, MoE (token routing has data-dependent shapes), optimizers with host-side state
(LOMO, AdaLomo, BAdam, GaLore, SGD's float lr), stages other than language modelling, dropout together with
activation checkpointing (the recompute would need the RNG state read on the host).

Memory: all graphs share one private pool that holds the step's working set while they live; capture releases
the eager warm-up's cached blocks first, so the peak stays the eager step's.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .objective import LanguageModeling

PAD_MULTIPLE = 256  # rows are padded to a multiple of this many tokens: few distinct shapes, few graphs
MAX_GRAPHS = 8  # batch signatures captured; steps of any further signature run eagerly
GRAPH_OPTIMIZERS = ("adamw", "adamw_backward")  # every piece of their state lives on the device


def has_dropout(model: nn.Module) -> bool:
    """Does a training forward draw random numbers (any dropout with p > 0)?"""
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def check_capturable(ctx) -> None:
    """Raise a one-line ConfigError naming the setting a captured step cannot honour (`ctx`: the StepContext)."""
    cfg, model = ctx.cfg, ctx.backbone
    reasons = [
        (cfg.optim.name not in GRAPH_OPTIMIZERS,
         f"optim.name={cfg.optim.name} (its state or learning rate lives on the host; use adamw or adamw_backward)"),
        (ctx.precision == "fp16", "train.precision=fp16 (loss scaling checks for inf on the host; use bf16)"),
        (ctx.pipelined or ctx.dist.enabled, "a distributed or pipelined run (parallel.*)"),
        (not isinstance(ctx.objective, LanguageModeling),
         f"the {type(ctx.objective).__name__} stage (only pretrain / sft are captured)"),
        (any(model.cfg.is_moe_layer(i) for i in range(model.cfg.n_layers)),
         "an MoE model (token routing has data-dependent shapes)"),
        (has_dropout(model) and ctx.t.activation_checkpointing,
         "dropout with activation checkpointing (the recompute reads the RNG state on the host; set dropout 0)"),
    ]
    for bad, what in reasons:
        if bad:
            raise ConfigError(f"train.cuda_graphs=true cannot capture {what}; set train.cuda_graphs=false")


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[dict]  # static device buffers the replay reads: one dict per micro-batch
    scale: torch.Tensor  # () fp32: dp / the step's units
    lrs: list[torch.Tensor]  # () fp32 per parameter group
    outputs: tuple  # what `update` returned at capture: (loss sum, grad norm, metric sums, skipped)


class StepGraphs:
    """Runs the device side of a step, `update(micro, units, scale)` (the trainer's `_update`: forward + backward,
    clipping, the optimizer update), eagerly once per batch signature, then as a captured CUDA graph. `optimizer`
    is the one `update` steps: its learning rates become device tensors during capture."""

    def __init__(self, ctx, update, optimizer: torch.optim.Optimizer):
        check_capturable(ctx)
        self.ctx, self.update, self.optimizer = ctx, update, optimizer
        self.enabled = ctx.device.type == "cuda"
        if not self.enabled:
            warnings.warn("train.cuda_graphs needs a CUDA device: steps run eagerly (with the same fixed shapes)",
                          stacklevel=2)
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self.captured: dict[tuple, _Captured] = {}
        self.seen: set[tuple] = set()
        self.replays = 0
        self.warned_packed = False

    @staticmethod
    def signature(micro: list[dict]) -> tuple:
        return tuple(tuple((k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, v)
                           for k, v in sorted(b.items())) for b in micro)

    def step(self, micro: list[dict], units: int) -> tuple:
        """One optimizer step over host micro-batches; returns what `update` returns."""
        ctx = self.ctx
        scale = ctx.dist.dp / max(units, 1)
        sig = self.signature(micro)
        entry = self.captured.get(sig)
        packed = any("document_ids" in b for b in micro)  # flex_attention's block mask is built per batch: eager
        if packed and self.enabled and not self.warned_packed:
            warnings.warn("train.cuda_graphs: packed rows (document_ids) run eagerly, uncaptured", stacklevel=2)
            self.warned_packed = True
        if (entry is None and self.enabled and not packed and sig in self.seen
                and len(self.captured) < MAX_GRAPHS):
            entry = self.captured[sig] = self._capture(micro, units)
        if entry is None:  # the first step of this signature (compiles, creates optimizer state), packed, no CUDA
            self.seen.add(sig)
            return self.update([ctx.to_device(b) for b in micro], units,
                               torch.tensor(scale, dtype=torch.float32, device=ctx.device))
        for buffers, b in zip(entry.inputs, micro):
            for k, buf in buffers.items():
                if isinstance(buf, torch.Tensor):
                    buf.copy_(b[k], non_blocking=True)
        entry.scale.fill_(scale)
        for lr, group in zip(entry.lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])
        entry.graph.replay()
        self.replays += 1
        return entry.outputs

    def _capture(self, micro: list[dict], units: int) -> _Captured:
        """Record one step (nothing runs yet: the caller replays it). The optimizer sees device-tensor learning rates
        and `capturable=True` during capture only; its groups keep their float lr for the schedule and checkpoints.
        `units` reaches the objective only for an auxiliary loss, which no capturable model has."""
        ctx, groups = self.ctx, self.optimizer.param_groups
        inputs = [ctx.to_device(b) for b in micro]
        scale = torch.zeros((), dtype=torch.float32, device=ctx.device)
        lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=ctx.device) for g in groups]
        saved = [(g["lr"], g.get("capturable")) for g in groups]
        graph = torch.cuda.CUDAGraph()
        try:
            for g, lr in zip(groups, lrs):
                g["lr"], g["capturable"] = lr, True
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                outputs = self.update(inputs, units, scale)
        except RuntimeError as e:  # something in the step syncs with the host or allocates outside the pool
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RuntimeError(f"train.cuda_graphs: capturing the training step failed ({first[:300]}); "
                               "set train.cuda_graphs=false") from e
        finally:
            for g, (lr, capturable) in zip(groups, saved):
                g["lr"] = lr
                if capturable is None:
                    g.pop("capturable", None)
                else:
                    g["capturable"] = capturable
        return _Captured(graph, inputs, scale, lrs, outputs)
