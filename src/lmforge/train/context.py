"""What the parts of a training step read from the run: the `StepContext` the trainer builds once.

Objectives (stages), the CUDA-graph step (`StepGraphs`), the pipeline stage (`PipelineStepper`) and `StepModule` get
this, not the `Trainer`: they see the model, the data and the settings of a step, and cannot reach the loop's own
state (optimizer, scheduler, checkpoints, metrics). The one changing figure they read, the optimizer steps taken so
far (RL rollouts seed their sampling with it), comes through a function.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import TrainConfig, TrainSection
    from .distributed import DistState


@dataclass(frozen=True, eq=False)
class StepContext:
    """The run as one training step sees it.

    model: what the objective runs (a Transformer or a wrapper such as a reward model); backbone: the Transformer
    in it. precision: "bf16" | "fp16" | "fp32" ("auto" resolved); autocast(): its context manager. pad_multiple:
    collate pads rows to a multiple of this many tokens (CUDA graphs: few shapes), None = no padding beyond the
    longest row; fixed_shapes: the loss keeps every row's shape (no data-dependent selection). sampler: the shared
    row order (`take(n)` -> dataset indices; it advances as rows are drawn); steps_taken(): optimizer steps so far.
    """

    model: nn.Module
    backbone: nn.Module
    objective: Any  # train.objective.Objective
    cfg: TrainConfig
    device: torch.device
    precision: str
    autocast: Callable[[], contextlib.AbstractContextManager]
    dist: DistState
    pad_id: int
    pad_multiple: int | None
    fixed_shapes: bool
    train_data: Any
    val_data: Any
    sampler: Any
    steps_taken: Callable[[], int]

    @property
    def t(self) -> TrainSection:
        return self.cfg.train

    @property
    def pipelined(self) -> bool:
        return self.cfg.parallel.pipeline > 1

    def next_rows(self) -> list:
        """This rank's rows of the next micro-batch: every rank draws the global batch in the same order and keeps
        its data-parallel slice, so N ranks see exactly what one process with N× the micro-batch sees."""
        n, r = self.t.micro_batch_size, self.dist.dp_rank
        indices = self.sampler.take(n * self.dist.dp)[r * n:(r + 1) * n]
        return [self.train_data[i] for i in indices]

    def to_device(self, batch: dict) -> dict:
        """A collated batch's tensors on the device (other entries as they are)."""
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}
