"""The one training loop. It knows models, batches, precision and checkpoints; it knows nothing about LoRA or any other
method (those arrive as a `Method` object) and nothing about stages beyond the loss on pre-shifted labels.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import ConfigError, NonFiniteError
from ..models.attention import plain_causal
from ..models.transformer import transformers_in
from ..runtime import auto_dtype
from .checkpoint import (is_sharded_checkpoint, list_checkpoints, load_checkpoint, load_sharded_checkpoint,
                         nonfinite_tensors, save_checkpoint, save_sharded_checkpoint)
from .config import TrainConfig, run_steps
from .context import StepContext
from .objective import LanguageModeling, Objective
from .distributed import (DistState, StepModule, average_gradients, averages_gradients_itself, clip_grad_norm,
                          dp_sum, model_state_bytes, per_rank, wrap_step, zero1_optimizer)
from .graphs import PAD_MULTIPLE, StepGraphs, has_dropout
from .metrics import MetricsWriter
from .optim import build_optimizer, build_scheduler


@dataclass
class EpochSampler:
    """Deterministic shuffled order, one permutation per epoch (seed + epoch); its state is two integers, so a resumed
    run reads exactly the samples the uninterrupted run would have read."""

    size: int
    seed: int
    epoch: int = 0
    index: int = 0
    _cached: tuple[int, list[int]] | None = None

    def _order(self) -> list[int]:
        if self._cached is None or self._cached[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._cached = (self.epoch, torch.randperm(self.size, generator=g).tolist())
        return self._cached[1]

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.index >= self.size:
                self.epoch, self.index = self.epoch + 1, 0
            out.append(self._order()[self.index])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


@contextlib.contextmanager
def _restore_sync(module):
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True, recurse=True)


def check_updates_in_backward(cfg: TrainConfig, precision: str, pipeline: bool, distributed: bool) -> None:
    """One-line ConfigError naming the setting an optimizer that updates each weight during backward (lomo,
    adalomo, adamw_backward) cannot run with, and the fix."""
    why = ("it cannot accumulate gradients: set train.grad_accum=1" if cfg.train.grad_accum > 1 else
           "it cannot use fp16 loss scaling: set train.precision=bf16 or fp32" if precision == "fp16" else
           "it cannot run a pipeline: set parallel.pipeline=1" if pipeline else
           "data/tensor-parallel ranks reduce gradients after the update: run one process" if distributed else None)
    if why is not None:
        raise ConfigError(f"optim.name={cfg.optim.name} updates weights during backward, so {why} (or choose "
                          "another optimizer)")


def resolve_precision(name: str, device: torch.device) -> str:
    """train.precision with 'auto' resolved by the one rule every verb uses (`runtime.auto_dtype`)."""
    if name != "auto":
        return name
    return "bf16" if auto_dtype(device) == torch.bfloat16 else "fp32"


def _from_ctx(name: str) -> property:
    """A read-only Trainer attribute that is a field of its `StepContext` (one source of truth for the run)."""
    return property(lambda self: getattr(self.ctx, name), doc=f"`StepContext.{name}` of this run.")


class Trainer:
    # the run as the step sees it, read from `self.ctx` (the loop's own state, optimizer to metrics, lives here)
    model = _from_ctx("model")
    backbone = _from_ctx("backbone")
    objective = _from_ctx("objective")
    cfg = _from_ctx("cfg")
    t = _from_ctx("t")
    device = _from_ctx("device")
    precision = _from_ctx("precision")
    autocast = _from_ctx("autocast")
    dist = _from_ctx("dist")
    pad_id = _from_ctx("pad_id")
    train_data = _from_ctx("train_data")
    val_data = _from_ctx("val_data")
    sampler = _from_ctx("sampler")  # the row order: the objective draws from it too, so it is fixed at construction

    def __init__(self, model, method, train_data, val_data, cfg: TrainConfig, pad_id: int, device: torch.device,
                 objective: Objective | None = None, dist_state: DistState | None = None, sampler=None):
        self.method, t = method, cfg.train
        self.out = Path(t.output_dir)
        precision = resolve_precision(t.precision, device)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

        backbones = transformers_in(model)  # the model, or the Transformer(s) inside a wrapper (reward model, ...)
        if not backbones:
            raise ValueError("the trainer needs a model that is or contains a lmforge Transformer")
        for m in backbones:
            policy = m.checkpointing
            if t.activation_checkpointing:
                policy = replace(policy, every=t.checkpoint_every, limit=t.checkpoint_blocks)
            # the recompute needs the forward's RNG state only if it drew any
            m.set_checkpointing(replace(policy, preserve_rng=has_dropout(model)))
            if t.compile:
                for block in m.layers:
                    block.compile()
        self.step = 0
        # what the objective, the pipeline stage and the CUDA-graph step read of the run (not the loop's own state);
        # the row order every rank shares (data.mix passes its weighted interleave) is saved with the run
        self.ctx = StepContext(
            model=model, backbone=backbones[0], objective=objective or LanguageModeling(), cfg=cfg, device=device,
            precision=precision, autocast=autocast, dist=dist_state or DistState(), pad_id=pad_id,
            pad_multiple=PAD_MULTIPLE if t.cuda_graphs else None,  # collate: few distinct row lengths
            fixed_shapes=t.cuda_graphs,  # no data-dependent shapes in the step (what a CUDA graph needs)
            train_data=train_data, val_data=val_data,
            sampler=EpochSampler(len(train_data), t.seed) if sampler is None else sampler,
            steps_taken=lambda: self.step)
        # DDP / FSDP2 / TP wrap the whole step; parameters become DTensors under FSDP/TP, so optimizers come after.
        # A pipeline rank keeps one stage (other stages' modules go to the meta device) and runs steps through it.
        self.pipeline = None
        if cfg.parallel.pipeline > 1:
            from .pipeline import PipelineStepper

            self.pipeline = PipelineStepper(self.ctx)
            self.step_module, self.state_model = self.pipeline.module, self.pipeline.stage
        else:
            self.step_module = wrap_step(StepModule(self.ctx), cfg.parallel, self.dist)
            self.state_model = model  # what checkpoints read and write (FQNs of the whole model either way)
        self.params = [(n, p) for n, p in method.trainable_parameters(model) if p.device.type != "meta"]
        self.average_dp = averages_gradients_itself(cfg.parallel, self.dist)  # no DDP: TP or pipeline with zero 0/1
        if not self.params:
            raise ConfigError(f"method '{cfg.method}' left no trainable parameters: check its target modules "
                              f"({cfg.method}.target_modules) and trainable.params")
        self.total_steps = run_steps(self.t, len(train_data))
        self.optimizer = build_optimizer(self.params, cfg.optim, model)
        if cfg.parallel.zero == 1 and self.dist.enabled:
            self.optimizer = zero1_optimizer(self.optimizer, self.dist)
        self.updates_in_backward = getattr(self.optimizer, "updates_in_backward", False)
        # torch's fused kernels skip a step on the device given GradScaler's found_inf flag (FSDP/TP DTensors aside)
        from torch.distributed.tensor import DTensor

        self.skips_on_device = (getattr(self.optimizer, "_step_supports_amp_scaling", False)
                                and not any(isinstance(p, DTensor) for _, p in self.params))
        if self.updates_in_backward:
            check_updates_in_backward(cfg, self.precision, self.pipeline, self.dist.enabled)
        if self.updates_in_backward and self.t.grad_clip is not None and self.dist.is_main:
            warnings.warn(f"optim.name={cfg.optim.name} updates each weight inside backward, before a global gradient "
                          f"norm exists: train.grad_clip={self.t.grad_clip} is not applied (set train.grad_clip=null; "
                          f"optim.{cfg.optim.name}.clip_value clips element-wise)", stacklevel=2)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.schedule)
        self.nonfinite_streak = 0  # optimizer steps in a row whose loss or gradient norm was inf/NaN
        self.resumed_from: Path | None = None
        self.state_bytes: dict[str, int] = {}  # this rank's params/grads/optimizer bytes at the last optimizer step
        self.graphs = StepGraphs(self.ctx, self._update, self.optimizer) if self.t.cuda_graphs else None
        self.objective.setup(self.ctx)

    # ---------------------------------------------------------------- state
    def _trainer_state(self) -> dict:
        return {"sampler": self.sampler.state(), "total_steps": self.total_steps}

    def save(self) -> Path:
        self._refuse_nonfinite_state()
        if self.dist.enabled:
            return save_sharded_checkpoint(self.out, self.step, model=self.state_model,
                                           names=self.method.state_dict(self.model),
                                           optimizer=self.optimizer, scheduler=self.scheduler,
                                           trainer_state=self._trainer_state(), keep_last=self.t.keep_last,
                                           is_main=self.dist.is_main)
        return save_checkpoint(self.out, self.step, weights=self.method.state_dict(self.model),
                               optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                               trainer_state=self._trainer_state(), keep_last=self.t.keep_last)

    def _refuse_nonfinite_state(self) -> None:
        """Raise NonFiniteError (nothing written) if the trainable weights or the optimizer state hold inf/NaN; every
        rank checks its own shards and they all agree, so no rank waits on a checkpoint the others refused."""
        named = [(f"'{n}'", t) for n, t in self.method.state_dict(self.model).items()]
        param_names = {p: n for n, p in self.params}
        named += [(f"optimizer state '{k}' of '{param_names.get(p, '?')}'", v)
                  for p, st in self.optimizer.state.items() for k, v in st.items() if isinstance(v, torch.Tensor)]
        bad = nonfinite_tensors(named)
        anywhere = len(bad)
        if self.dist.enabled:
            import torch.distributed as dist

            count = torch.tensor([float(anywhere)], device=self.device)
            dist.all_reduce(count)
            anywhere = int(count.item())
        if anywhere:
            where = bad[0] if bad else "a tensor of another rank"
            raise NonFiniteError(f"step {self.step}: {where} holds inf/NaN, so checkpoint-{self.step} is not written "
                                 "(the last checkpoint stays the last good one); lower optim.lr or check the data")

    def maybe_resume(self) -> int | None:
        ckpts = list_checkpoints(self.out) if self.t.resume else []
        if not ckpts:
            return None
        if is_sharded_checkpoint(ckpts[-1]):  # written by a distributed run, of any world size
            state = load_sharded_checkpoint(ckpts[-1], model=self.state_model,
                                            names=self.method.state_dict(self.model),
                                            optimizer=self.optimizer, scheduler=self.scheduler)
        else:
            weights, state = load_checkpoint(ckpts[-1], optimizer=self.optimizer, scheduler=self.scheduler,
                                             scaler=self.scaler)
            self.method.load_state_dict(self.model, weights)
        self.step = state["step"]
        self.sampler.epoch, self.sampler.index = state["sampler"]["epoch"], state["sampler"]["index"]
        self.resumed_from = ckpts[-1]
        return self.step

    # ---------------------------------------------------------------- steps
    def _grad_sync(self, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP no_sync / FSDP2 flag)."""
        m = self.step_module
        if last or not self.dist.enabled:
            return contextlib.nullcontext()
        if hasattr(m, "no_sync"):
            return m.no_sync()
        if hasattr(m, "set_requires_gradient_sync"):
            m.set_requires_gradient_sync(False, recurse=True)
            return _restore_sync(m)
        return contextlib.nullcontext()

    @staticmethod
    def _with_flags(batch: dict) -> dict:
        """Add what the host can tell about a collated batch before it moves: whether its rows need nothing but
        causality (`plain_causal` on the CPU positions: no device sync in the forward)."""
        pos = batch.get("positions")
        if isinstance(pos, torch.Tensor) and pos.device.type == "cpu" and "plain_causal" not in batch:
            batch = {**batch, "plain_causal": plain_causal(pos)}
        return batch

    def _forward_backward(self, micro: list[dict], units: int, scale) -> tuple[torch.Tensor, dict]:
        """Forward + backward of the step's micro-batches (on the device); (this rank's loss sum as a device tensor,
        metric sums). `scale` = dp / the step's global units (DDP/FSDP average gradients over dp ranks, hence the
        factor dp): a float, or a 0-dim device tensor that a CUDA graph refills each step."""
        self.model.train()
        total, sums = torch.zeros((), dtype=torch.float64, device=self.device), {}
        for i, b in enumerate(micro):
            with self._grad_sync(i == len(micro) - 1):
                with self.autocast():
                    loss_sum, metrics = self.step_module(b, units)
                loss = loss_sum * scale
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss_sum.detach()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        return total, sums

    def _update(self, micro: list[dict], units: int, scale) -> tuple:
        """Everything of a step that runs on the device — forward + backward, clipping, the optimizer update,
        freeing the gradients — and what a CUDA graph captures. (loss sum tensor, grad norm, metric sums, skipped);
        the loss stays on the device so the whole step is queued before the one host sync."""
        total, sums = self._forward_backward(micro, units, scale)
        grad_norm, skipped = self._optimizer_step()
        return total, grad_norm, sums, skipped

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches, normalised by the step's units (target tokens for
        language modelling, pairs for preference stages)."""
        obj, ds = self.objective, self.dist
        if self.pipeline is not None:  # the schedule runs every micro-batch through the stages
            (total, units, n_tokens), sums = self.pipeline.forward_backward(), {}
            grad_norm, skipped = self._optimizer_step()
        else:
            micro = [self._with_flags(b) for b in obj.micro_batches(self.ctx)]
            units = int(dp_sum(sum(obj.normalizer(b) for b in micro), ds, self.device))  # global unit count
            n_tokens = sum(obj.tokens(b) for b in micro)
            if self.graphs is not None:
                total, grad_norm, sums, skipped = self.graphs.step(micro, units)
            else:
                total, grad_norm, sums, skipped = self._update([self.ctx.to_device(b) for b in micro], units,
                                                               ds.dp / max(units, 1))
            sums = {k: dp_sum(v, ds, self.device) for k, v in sums.items()}
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # after a skipped fp16 step torch warns the schedule ran ahead; it is meant to
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.step += 1
        self.method.on_step(self.model, self.step)  # methods that act per step (AdaLoRA's budget, PRILoRA's pruning)
        if isinstance(total, torch.Tensor):  # the step's first host sync, after every kernel of it is queued
            total = dp_sum(float(total), self.dist, self.device) / max(units, 1)
        grad_norm, skipped = float(grad_norm), bool(skipped)
        # fp16 overflow is loss scaling at work (the scaler skipped the step and lowered the scale), and optimizers
        # that update inside backward have no norm to report: only the loss says those steps diverged.
        norm_counts = self.scaler is None and not self.updates_in_backward
        nonfinite = not math.isfinite(total) or (norm_counts and not math.isfinite(grad_norm))
        return {"step": self.step, "loss": total, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens,
                obj.unit: units, **{k: v / max(units, 1) for k, v in sums.items()},
                **({"skipped": True} if skipped else {}), **({"nonfinite": True} if nonfinite else {}),
                **obj.step_metrics()}

    def _optimizer_step(self) -> tuple[torch.Tensor | float, bool]:
        """Average (TP/pipeline data parallel), unscale, clip, step, free the gradients: (gradient norm, whether fp16
        loss scaling skipped the step)."""
        t = self.t
        if self.average_dp:  # once per step, after every micro-batch's backward
            average_gradients([p for _, p in self.params], self.dist.mesh["dp"].get_group())
        skipped, grad_norm = False, float("nan")
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if not self.updates_in_backward:  # fused-update optimizers clipped and stepped inside backward already
            grad_norm = clip_grad_norm([p for _, p in self.params], t.grad_clip, device=self.device,
                                       stage_group=self.pipeline.group if self.pipeline else None)
        if self.updates_in_backward:
            pass
        elif self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale  # inf/nan gradients: the step was skipped, scale halved
        else:
            skipped = self._step_if_finite(grad_norm)
        self.state_bytes = model_state_bytes(list(self.model.parameters()), self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped

    def _step_if_finite(self, grad_norm: torch.Tensor) -> bool | torch.Tensor:
        """`optimizer.step()` unless the gradient norm is inf/NaN: a non-finite gradient never reaches the weights or
        the optimizer state (`train.max_nonfinite_steps` of them in a row stop the run). Returns whether it skipped.

        Fused optimizers skip on the device through the `found_inf` flag their kernels take from GradScaler (the step
        count is restored too): no host sync, and a CUDA graph captures it. Others read the norm on the host first,
        as GradScaler does for them; inside a CUDA graph capture that read is impossible, so such a step is taken."""
        bad = ~torch.isfinite(torch.as_tensor(grad_norm))
        if self.skips_on_device:
            self.optimizer.found_inf = bad.to(device=self.device, dtype=torch.float32)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            return bad
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            self.optimizer.step()
            return False
        if bool(bad):
            return True
        self.optimizer.step()
        return False

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.val_data is None or len(self.val_data) == 0:
            return {}
        if self.pipeline is not None:
            return self.pipeline.evaluate()
        self.model.eval()
        total, count, sums = 0.0, 0, {}
        bs = self.t.micro_batch_size
        for n, start in enumerate(range(0, len(self.val_data), bs)):
            if self.t.eval_max_batches and n >= self.t.eval_max_batches:
                break
            b = self._with_flags(self.objective.collate(
                [self.val_data[i] for i in range(start, min(start + bs, len(self.val_data)))], self.ctx))
            with self.autocast():
                loss_sum, metrics = self.step_module(self.ctx.to_device(b), 0)
            total += float(loss_sum)
            count += self.objective.normalizer(b)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        loss = total / max(count, 1)
        out = {"eval_loss": loss, **{f"eval_{k}": v / max(count, 1) for k, v in sums.items()}}
        if isinstance(self.objective, LanguageModeling):
            out["eval_ppl"] = math.exp(min(loss, 50))
        return out

    def _per_rank_memory(self, peak_gib: float) -> list[dict]:
        """What each rank holds of parameters, gradients (at the optimizer step) and optimizer state, in MiB, plus its
        peak GPU memory: the measured side of `lmforge plan`'s ZeRO table."""
        rows = per_rank([self.state_bytes.get(k, 0) for k in ("params", "grads", "optimizer")] + [peak_gib],
                        self.dist, self.device)
        return [{"params_mib": p / 2**20, "grads_mib": g / 2**20, "optimizer_mib": o / 2**20,
                 **({"peak_gib": peak} if self.device.type == "cuda" else {})} for p, g, o, peak in rows]

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict:
        resumed = self.maybe_resume()
        main = self.dist.is_main  # one rank logs; every rank trains and writes its checkpoint shards
        if resumed is not None and main:
            print(f"resumed from {self.resumed_from} at step {resumed} of {self.total_steps}", flush=True)
        metrics = MetricsWriter(self.out, tensorboard=self.t.tensorboard, resume_step=resumed) if main else None
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not (self.t.progress and main),
                   dynamic_ncols=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        last: dict = {}
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                rec = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                rec["tokens_per_s"] = rec["tokens"] / dt
                if self.device.type == "cuda":
                    rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                if self.step % self.t.log_every == 0:  # every rank's model-state bytes (and peak), for the ZeRO table
                    rec["per_rank"] = self._per_rank_memory(rec.get("peak_mem_gib", 0.0))
                if self.t.eval_every and self.step % self.t.eval_every == 0:
                    rec.update(self.evaluate())
                self.nonfinite_streak = self.nonfinite_streak + 1 if rec.get("nonfinite") else 0
                if metrics and (self.step % self.t.log_every == 0 or "eval_loss" in rec or self.nonfinite_streak):
                    metrics.write(rec)
                if self.nonfinite_streak >= self.t.max_nonfinite_steps:
                    self._stop_nonfinite(rec)
                if self.t.save_every and self.step % self.t.save_every == 0 and not self.nonfinite_streak:
                    self.save()  # never in a streak of non-finite steps: the last checkpoint stays a good one
                bar.update()
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                **({"mem": f"{rec['peak_mem_gib']:.1f}G"} if "peak_mem_gib" in rec else {}))
                last = rec
        except KeyboardInterrupt:
            self.save()  # Ctrl-C loses nothing: resume continues from here
            raise
        except BaseException:
            if metrics:
                metrics.close()
            raise
        finally:
            bar.close()
        final = {"step": self.step, **self.evaluate()}
        if metrics:
            if final.keys() - {"step"}:
                metrics.write(final)
            metrics.close()
        if not self.t.save_every or self.step % self.t.save_every:
            self.save()
        return {**last, **final}

    def _stop_nonfinite(self, rec: dict) -> None:
        n = self.nonfinite_streak
        first = self.step - n + 1
        steps = f"step {self.step}" if n == 1 else f"steps {first}-{self.step}"
        ckpts = list_checkpoints(self.out)
        kept = f"the last checkpoint, {ckpts[-1]}, is kept" if ckpts else "no checkpoint was written"
        updates = "applied inside backward" if self.updates_in_backward else "skipped"
        raise NonFiniteError(f"step {self.step}: loss {rec['loss']:.4g}, gradient norm {rec['grad_norm']:.4g}: inf/NaN "
                             f"at {steps} (train.max_nonfinite_steps={self.t.max_nonfinite_steps}; their updates were "
                             f"{updates}); stopping without saving ({kept}, final/ is not written); lower optim.lr or "
                             "check the data")
