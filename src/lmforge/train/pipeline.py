"""Pipeline parallelism on `torch.distributed.pipelining`: the Transformer's layers are split into `parallel.pipeline`
contiguous stages, one per pipeline rank; stage 0 also embeds the tokens, the last stage also applies the final norm,
the LM head and the loss. A GPipe or 1F1B schedule runs each optimizer step's micro-batches through the stages.

The trainer stays the one loop: with `parallel.pipeline > 1` it hands a step's forward + backward (and evaluation)
to a `PipelineStepper`; gradient clipping, the optimizer step, checkpoints and logging stay the trainer's.

Why a manual split rather than tracing the model with `pipelining.pipeline()`: the forward takes masks, caches and
optional inputs that tracing cannot follow, while a stage is a few lines over the model's own modules. A stage keeps
their names (`embed`, `layers.<i>`, `norm`, `lm_head`), so its state dict and DCP checkpoint shards carry the whole
model's FQNs: a pipeline checkpoint loads into any other layout, a world of one included. Modules of other stages are
moved to the meta device, so a rank holds only its stage's weights, gradients and optimizer state.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn

from ..data import collate
from ..errors import ConfigError
from ..models.attention import plain_causal
from .distributed import dp_sum, wrap_module
from .loss import causal_lm_loss_sum
from .objective import LanguageModeling


def stage_bounds(n_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) layer ranges, as even as possible (earlier stages take the remainder last: the
    first stage also embeds and the last also runs the LM head)."""
    if stages > n_layers:
        raise ConfigError(f"parallel.pipeline={stages} exceeds the model's {n_layers} layers; use at most "
                          f"{n_layers} stages")
    cuts = [round(i * n_layers / stages) for i in range(stages + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


class PipelineStageModule(nn.Module):
    """Layers [start, stop) of a Transformer; the first stage embeds token ids, the last returns the summed LM loss.

    forward(x, positions, document_ids=None, labels=None):
      x: (B, T) token ids on the first stage, else (B, T, d_model) hidden states from the previous stage.
      positions (B, T), document_ids (B, T) (packed rows), labels (B, T) pre-shifted, -100 = no loss (last stage).
    Returns (B, T, d_model) hidden states, or on the last stage the scalar sum of token losses.
    """

    def __init__(self, model: nn.Module, start: int, stop: int, first: bool, last: bool,
                 autocast=contextlib.nullcontext):
        super().__init__()
        self.cfg, self.first, self.last = model.cfg, first, last
        self._model = [model]  # a list: buffers (RoPE frequencies) and mask helpers, not a submodule
        self._autocast = autocast  # the trainer's precision context, entered inside the stage (not around backward)
        self.start, self.stop = start, stop
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(start, stop)})
        if first:
            self.embed, self.pos_embed, self.embed_norm = model.embed, model.pos_embed, model.embed_norm
        if last:
            self.norm, self.lm_head = model.norm, model.lm_head

    def forward(self, x, positions, document_ids=None, labels=None):
        with self._autocast():
            if self.first:
                x = self._embed(x, positions)
            x = self._blocks(x, positions, document_ids)
            if not self.last:
                return x
            head_weight = self._model[0].head_weight() if self.lm_head is not None else None
            return causal_lm_loss_sum(self.lm_head, self.norm(x), labels, head_weight=head_weight)

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._model[0].embed_inputs(tokens, positions)

    def _blocks(self, x, positions, document_ids):
        """This stage's blocks with the training masks (padded rows: -1 positions; packed rows: documents)."""
        model = self._model[0]
        layers = range(self.start, self.stop)
        ropes = model.rope_tables(positions, x.dtype)
        needs_mask = document_ids is not None or not plain_causal(positions)  # right-padded rows: causality only
        flex = document_ids is not None and model.use_flex_attention(positions)
        masks = model.layer_masks(positions, needs_mask=needs_mask, document_ids=document_ids, flex=flex,
                                  layers=layers)
        return model.run_blocks(x, ropes, masks, layers=layers)


def release_other_stages(model: nn.Module, stage: PipelineStageModule) -> None:
    """Move every module of `model` that `stage` does not hold to the meta device (frees its memory)."""
    kept = {id(m) for m in stage.modules()}
    for name, child in model.named_children():
        if name == "layers":
            for block in child:
                if id(block) not in kept:
                    block.to("meta")
        elif child is not None and id(child) not in kept and any(True for _ in child.parameters()):
            child.to("meta")


def check_pipeline(ctx) -> None:
    """What the pipeline path does not support, as one-line errors naming the field and the fix (`ctx`: the
    run's StepContext)."""
    cfg, p = ctx.backbone.cfg, ctx.cfg.parallel
    if cfg.tie_embeddings:
        raise ConfigError("parallel.pipeline > 1 needs separate input and output embeddings (this model ties them: "
                          "tie_embeddings); use parallel.tensor or parallel.zero instead")
    if cfg.final_logit_softcap is not None:
        raise ConfigError("parallel.pipeline > 1 does not support soft-capped logits (final_logit_softcap: Gemma 2) "
                          "yet; use parallel.zero or parallel.tensor instead")
    if getattr(ctx.model, "prompt_encoder", None) is not None:
        raise ConfigError("parallel.pipeline > 1 does not support prompt methods (prefix, ptuning, prompt_tuning); "
                          "use parallel.zero instead")
    if cfg.mlp == "moe":
        raise ConfigError("parallel.pipeline > 1 does not support mixture-of-experts models yet (their auxiliary loss "
                          "spans every layer); use parallel.zero instead")
    if type(ctx.objective) is not LanguageModeling:
        raise ConfigError("parallel.pipeline > 1 trains language-modelling stages (pretrain, sft) only; use "
                          "parallel.zero or parallel.tensor for preference stages")
    if ctx.precision == "fp16":
        raise ConfigError("parallel.pipeline > 1 cannot use fp16 loss scaling (stages would skip steps "
                          "independently); set train.precision=bf16")
    if p.zero == 1:
        raise ConfigError("parallel.zero=1 with parallel.pipeline > 1 is not supported (its optimizer state is "
                          "saved by rank 0 only); use parallel.zero=2 or 3")
    rows = ctx.t.micro_batch_size * ctx.t.grad_accum
    n = p.micro_batches or ctx.t.grad_accum
    if rows % n:
        raise ConfigError(f"parallel.micro_batches={n} must divide the step's train.micro_batch_size × "
                          f"train.grad_accum = {rows} rows")
    if p.pipeline_schedule == "1f1b" and n < p.pipeline:
        raise ConfigError(f"parallel.pipeline_schedule=1f1b needs at least parallel.pipeline={p.pipeline} "
                          f"micro-batches (got {n}); raise parallel.micro_batches or train.grad_accum")


class PipelineStepper:
    """One rank's pipeline stage and schedule; runs a step's forward + backward, and evaluation.

    Every rank of a pipeline draws the same rows (the sampler is shared; data-parallel ranks take their slice), pads
    them to data.max_seq_len (stages exchange fixed-shape activations) and passes positions, document ids and (last
    stage) labels as keyword inputs; only stage 0 receives token ids. The loss is summed per micro-batch and scaled
    by dp / (global target tokens of the step), exactly as the trainer's gradient accumulation does, so a pipeline
    step computes the same gradient and loss as one process would.
    """

    def __init__(self, ctx):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        check_pipeline(ctx)
        ds, p, model = ctx.dist, ctx.cfg.parallel, ctx.model
        self.ctx, self.ds, self.device = ctx, ds, ctx.device
        self.group = ds.mesh["pp"].get_group()
        self.seq_len = ctx.cfg.data.max_seq_len
        self.n_micro = p.micro_batches or ctx.t.grad_accum
        start, stop = stage_bounds(model.cfg.n_layers, ds.pp)[ds.pp_rank]
        self.stage = PipelineStageModule(model, start, stop, first=ds.pp_rank == 0, last=ds.pp_rank == ds.pp - 1,
                                         autocast=ctx.autocast)
        release_other_stages(model, self.stage)
        # FSDP2 (zero 2/3) reduce-scatters after the last micro-batch; replicated stages are averaged by the trainer
        self.module = wrap_module(self.stage, model, list(self.stage.layers.values()), p, ds)
        self.pipe_stage = PipelineStage(self.module, ds.pp_rank, ds.pp, self.device, group=self.group)
        schedule = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[p.pipeline_schedule]
        self.scale = 1.0  # dp / step units while training, 1 in evaluation: loss sums come back as they are
        self.schedule = schedule(self.pipe_stage, self.n_micro, loss_fn=self._loss, scale_grads=False)

    def _loss(self, loss_sum: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        return loss_sum * self.scale

    def _batch(self, rows: list) -> dict[str, torch.Tensor]:
        """Collated rows on the device, padded to the fixed sequence length the stages exchange."""
        b = collate(rows, self.ctx.pad_id, pad_to_multiple_of=self.seq_len)
        return {k: v.to(self.device, non_blocking=True) for k, v in b.items()}

    def _inputs(self, b: dict) -> tuple[tuple, dict, torch.Tensor | None]:
        """(args, kwargs, target) of `schedule.step` for this rank's stage."""
        kwargs = {"positions": b["positions"]}
        if "document_ids" in b:
            kwargs["document_ids"] = b["document_ids"]
        if self.stage.last:
            kwargs["labels"] = b["labels"]
        return ((b["tokens"],) if self.stage.first else ()), kwargs, (b["labels"] if self.stage.last else None)

    def _from_last_stage(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, group=self.group, group_src=self.ds.pp - 1)
        return float(t.item())

    def forward_backward(self) -> tuple[float, int, int]:
        """Run one optimizer step's micro-batches through the pipeline; gradients are left in the stage's parameters.
        Returns (mean loss over the step's global target tokens, those tokens, this rank's input tokens)."""
        ctx = self.ctx
        b = self._batch([r for _ in range(ctx.t.grad_accum) for r in ctx.next_rows()])
        units = int(dp_sum(int((b["labels"] != -100).sum()), self.ds, self.device))
        n_tokens = int((b["positions"] >= 0).sum())
        args, kwargs, target = self._inputs(b)
        self.scale = self.ds.dp / max(units, 1)
        self.module.train()
        losses: list[torch.Tensor] = []
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        local = float(sum(float(x.detach()) for x in losses)) / self.scale if losses else 0.0  # the loss sum
        total = dp_sum(self._from_last_stage(local), self.ds, self.device) / max(units, 1)
        return total, units, n_tokens

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss over the validation rows (every rank sees all of them), batches of a training step's shape; a short
        last batch is filled with unlabelled rows."""
        t = self.ctx.t
        data, per_batch = self.ctx.val_data, t.micro_batch_size * t.grad_accum
        limit = len(data) if not t.eval_max_batches else min(len(data), t.eval_max_batches * t.micro_batch_size)
        self.module.eval()
        self.scale = 1.0
        total, count = 0.0, 0
        for start in range(0, limit, per_batch):
            rows = [data[i] for i in range(start, min(start + per_batch, limit))]
            rows += [{"tokens": rows[0]["tokens"][:1], "labels": [-100]}] * (per_batch - len(rows))
            b = self._batch(rows)
            count += int((b["labels"] != -100).sum())
            args, kwargs, target = self._inputs(b)
            losses: list[torch.Tensor] = []
            self.schedule.eval(*args, target=target, losses=losses, return_outputs=False, **kwargs)
            total += self._from_last_stage(float(sum(float(x) for x in losses)) if losses else 0.0)
        loss = total / max(count, 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}
