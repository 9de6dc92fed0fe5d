"""Per-step callbacks for methods that act during training (AdaLoRA's rank allocation, PRILoRA's pruning).

- ``on_grad(param)``: right after a backward pass has accumulated ``param.grad`` (a post-accumulate-grad hook), e.g.
  to update an importance score from ``param * param.grad`` or to add a regulariser's gradient.
- ``on_step(step)``: once per optimizer step, after ``optimizer.step()``. The training loop says so: it calls
  ``method.on_step(model, step)``, which calls `StepHooks.step_done`. A hand-written loop that never calls it gets
  the step detected instead, at the next training forward, as "a backward happened and the gradients were cleared
  since" (such loops zero gradients with ``set_to_none=True`` after every step); the first `step_done` turns that
  detection off for good.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["StepHooks"]


class StepHooks:
    def __init__(self, model: nn.Module, params: list[nn.Parameter], on_grad: Callable | None = None,
                 on_step: Callable[[int], None] | None = None, step: int = 0):
        self.params, self.on_grad, self.on_step = params, on_grad, on_step
        self.step = step  # optimizer steps seen so far
        self._pending = False  # a backward has run since the last counted step
        self.driven = False  # the loop reports its steps (`step_done`): no detection
        self._handles = [p.register_post_accumulate_grad_hook(self._after_grad) for p in params]
        # hidden_states() is what the loop calls (not forward), and it always embeds first
        self._handles.append(model.embed.register_forward_pre_hook(self._before_forward))

    def _after_grad(self, param: nn.Parameter) -> None:
        self._pending = True
        if self.on_grad is not None:
            with torch.no_grad():
                self.on_grad(param)

    def _before_forward(self, module: nn.Module, args) -> None:
        if module.training and torch.is_grad_enabled() and not self.driven:
            self.flush()

    def step_done(self, step: int) -> None:
        """The loop's report: optimizer step `step` (counted from 1) is done."""
        self.driven, self._pending, self.step = True, False, step
        if self.on_step is not None:
            with torch.no_grad():
                self.on_step(step)

    def flush(self) -> None:
        """Count a finished step; also called before saving (after the last step there is no next forward)."""
        if self._pending and all(p.grad is None for p in self.params):  # gradients consumed: a step happened
            self._pending = False
            self.step += 1
            if self.on_step is not None:
                with torch.no_grad():
                    self.on_step(self.step)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
