"""The training config: one YAML file, validated in full before any work starts."""
from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ..config import Section, changed_fields
from ..data import DataConfig
from ..peft import (AdaLoraMethod, AdapterMethod, BitFitMethod, DoraMethod, IA3Method, PrefixTuningMethod,
                    PriLoraMethod, PromptTuningMethod, PTuningMethod, PTuningV2Method, QLoraMethod)
from ..peft.lora import LoraConfig
from ..quant.bitnet import BitNetMethod
from ..quant.qat import QATMethod
from .distributed import ParallelSection
from .trainable import TrainableSection


class ModelSection(Section):
    path: str | None = None
    """HF checkpoint directory to start from (config.json + safetensors), or a Hugging Face id (org/name)."""
    preset: str | None = None
    """Random init from a named preset (see `lmforge info PRESET`), e.g. for pretraining from scratch."""
    config: dict = {}
    """ModelConfig field overrides for random init (e.g. {n_layers: 4, d_model: 256}); vocab_size defaults to the
    tokenizer's."""
    tokenizer: str | None = None
    """Directory with tokenizer.json; defaults to `path`."""
    chat_template: str | None = None
    """Built-in chat template name or Jinja text, when the tokenizer has none (SFT on conversations)."""

    @model_validator(mode="after")
    def _source(self):
        if self.path is None and self.tokenizer is None:
            raise ValueError("set model.path (a checkpoint) or model.tokenizer (for a randomly initialised model)")
        if self.path is not None and (self.preset or self.config):
            raise ValueError("model.path loads a checkpoint; model.preset/model.config only describe random init")
        return self


class LomoOptions(Section):
    clip_value: float | None = Field(None, gt=0)
    """Clip each gradient element to [-v, v] (global-norm clipping would need a second backward pass)."""


class AdaLomoOptions(LomoOptions):
    clip_threshold: float = Field(1.0, gt=0)
    """Cap on the RMS of each normalised update."""
    decay_rate: float = Field(-0.8, lt=0)
    """Second-moment decay exponent: beta2 at step t is 1 - t^decay_rate."""


class BAdamOptions(Section):
    switch_every: int = Field(50, ge=1)
    """Optimizer steps per active block."""
    order: Literal["ascending", "descending", "random"] = "ascending"
    """Order in which blocks take turns in each sweep."""


class GaLoreOptions(Section):
    rank: int = Field(128, ge=1)
    """Rank of the gradient projection; a block matrix is projected only when its shorter side exceeds it."""
    update_proj_gap: int = Field(200, ge=1)
    """Steps between projection refreshes (an SVD of the gradient)."""
    scale: float = Field(0.25, gt=0)
    """Multiplier of the projected-back update."""
    min_dim: int = Field(0, ge=0)
    """Project only block matrices whose shorter side is at least this (others get plain AdamW)."""


# optimizer name -> the OptimSection field holding its options (optimizers without options have none)
OPTIMIZER_OPTIONS = {"lomo": "lomo", "adalomo": "adalomo", "adamw_backward": "adamw_backward", "badam": "badam",
                     "galore": "galore"}


class OptimSection(Section):
    name: str = "adamw"
    """Optimizer: adamw (fused kernel where this torch and device have it), sgd, lomo, adalomo, adamw_backward,
    badam, galore, or one registered in lmforge.train.optim.OPTIMIZERS."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay; never applied to 1-D parameters (biases, norm weights)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas (adamw, adamw_backward, badam, galore)."""
    eps: float = 1e-8
    """Adam's epsilon, added to the root of the second moment."""
    momentum: float = 0.0
    """SGD momentum."""
    lomo: LomoOptions = LomoOptions()
    """LOMO: SGD fused into backward."""
    adalomo: AdaLomoOptions = AdaLomoOptions()
    """AdaLomo: LOMO with a factored second moment."""
    adamw_backward: LomoOptions = LomoOptions()
    """AdamW applied inside backward, each gradient freed after its update."""
    badam: BAdamOptions = BAdamOptions()
    """BAdam: one transformer block trains at a time."""
    galore: GaLoreOptions = GaLoreOptions()
    """GaLore: Adam on low-rank projections of the block matrices' gradients."""

    @model_validator(mode="after")
    def _one_optimizer(self):
        for field in set(OPTIMIZER_OPTIONS.values()) - {OPTIMIZER_OPTIONS.get(self.name)}:
            changed = changed_fields(getattr(self, field))
            if changed:
                raise ValueError(f"optim.{field}.{changed[0]} is an option of optimizer '{field}', but optim.name is "
                                 f"'{self.name}': set optim.name={field} or drop it")
        # the shared fields of the built-ins that do not read them (an optimizer registered elsewhere may)
        if self.momentum != 0.0 and self.name in _NOT_SGD:
            raise ValueError(f"optim.momentum is an option of optimizer 'sgd', but optim.name is '{self.name}': set "
                             "optim.name=sgd or drop it")
        for key in ("betas", "eps"):
            if self.name in _NOT_ADAM and getattr(self, key) != OptimSection.model_fields[key].default:
                raise ValueError(f"optim.{key} is an option of the Adam optimizers ({', '.join(_ADAM)}), but "
                                 f"optim.name is '{self.name}': drop it")
        return self


_ADAM = ("adamw", "adamw_backward", "badam", "galore")  # read optim.betas and optim.eps
_NOT_ADAM = ("sgd", "lomo", "adalomo")
_NOT_SGD = (*_ADAM, "lomo", "adalomo")  # optim.momentum is SGD's alone


class ScheduleSection(Section):
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup from 0 to the peak learning rate."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Final learning rate as a fraction of the peak."""


class TrainSection(Section):
    output_dir: str = "runs/train"
    """Where checkpoints, metrics.jsonl, TensorBoard events and the final model go."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps; None → `epochs` over the training data."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data when max_steps is None (fractions allowed)."""
    micro_batch_size: int = Field(4, ge=1)
    """Sequences per forward/backward pass (per rank)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step; the loss is normalised by the step's target tokens."""
    precision: Literal["auto", "fp32", "bf16", "fp16", "bf16-pure"] = "auto"
    """auto = bf16 autocast on a GPU that supports it, else fp32. bf16/fp16: autocast with fp32 master weights
    (fp16 adds dynamic loss scaling); bf16-pure: weights and optimizer in bf16."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm (None = off)."""
    max_nonfinite_steps: int = Field(3, ge=1)
    """Stop the run (one line, exit status 2) after this many optimizer steps in a row whose loss or gradient norm is
    inf/NaN. Such a step is skipped: its gradient never reaches the weights or the optimizer state, so one bad batch
    or spike costs one step, while a run that keeps diverging (lr too high, broken data) stops within a few steps
    instead of training on NaN. Nothing is saved during such a streak, and nothing at the stop: the last checkpoint
    stays the last good one and final/ is not written. fp16 steps skipped by loss scaling for overflowing gradients
    do not count (lowering the scale is how fp16 recovers); optimizers that update inside backward (lomo, adalomo,
    adamw_backward) cannot skip, only stop."""
    activation_checkpointing: bool = False
    """Recompute blocks in backward instead of storing their activations."""
    checkpoint_every: int = Field(1, ge=1)
    """With activation checkpointing: checkpoint every N-th block."""
    checkpoint_blocks: int | None = Field(None, ge=0)
    """With activation checkpointing: recompute at most this many of those blocks (the lowest, whose activations
    would live longest); the rest keep their activations, trading spare memory for less recompute. None = all."""
    compile: bool = False
    """torch.compile each transformer block."""
    cuda_graphs: bool = False
    """Run each optimizer step as one CUDA graph (the first step of each batch shape runs eagerly, the second is
    captured, later ones replay): removes the host's kernel-launch time, which bounds small models. Rows are padded
    to a multiple of 256 tokens so few shapes occur. Language modelling only; not with fp16, MoE, distributed runs or
    optimizers other than adamw / adamw_backward. Elsewhere than CUDA the same fixed-shape step runs eagerly."""
    eval_every: int = Field(0, ge=0)
    """Evaluate loss/perplexity on the held-out split every N steps (0 = only at the end)."""
    eval_max_batches: int | None = Field(None, ge=1)
    """Held-out batches per evaluation (None = the whole held-out split)."""
    save_every: int = Field(0, ge=0)
    """Write a resumable checkpoint every N steps (0 = only at the end)."""
    keep_last: int = Field(2, ge=1)
    """Checkpoints kept on disk."""
    resume: bool = True
    """Resume from the latest checkpoint in output_dir if there is one."""
    log_every: int = Field(1, ge=1)
    """Write a line to metrics.jsonl (and TensorBoard) every N optimizer steps."""
    seed: int = 0
    """Seed of adapter init, dropout and data order (the same on every rank)."""
    device: str = "auto"
    """cpu, cuda or cuda:N; auto = cuda when available, else cpu."""
    tensorboard: bool = True
    """Also write TensorBoard events to output_dir."""
    progress: bool = True
    """Show a progress bar on the terminal."""
    force: bool = False
    """Skip the pre-flight memory check: on CUDA, `lmforge train` asks the planner (docs/planner.md) whether the run
    fits the device and refuses one predicted not to."""
    aux_loss_coef: float = Field(0.01, ge=0)
    """Weight of the model's auxiliary loss (e.g. MoE load balancing), when the model reports one."""


class TrainConfig(Section):
    elsewhere: ClassVar[dict[str, str]] = {  # the alignment stages' sections live in lmforge.align's AlignConfig
        s: f"{s}.* are the options of stage {s}: set stage={s} too" for s in ("rm", "dpo", "ppo", "grpo", "orpo", "kto")}
    # a switch changed on the command line takes the file's section of the value it replaces (`load_config`)
    switches: ClassVar[dict] = {"method": lambda name: name,
                                "optim.name": lambda name: name in OPTIMIZER_OPTIONS and f"optim.{OPTIMIZER_OPTIONS[name]}"}

    stage: Literal["pretrain", "sft"] = "sft"
    """pretrain: plain text, every token trained. sft: conversations, only assistant turns trained."""
    method: str = "full"
    """What trains: full, lora, dora, qlora, prilora, adalora, ia3, bitfit, adapter, prefix, ptuning_v2,
    prompt_tuning, ptuning, qat, bitnet (see `lmforge methods`). Its options live in the section of the same name
    (lora.r, qlora.r, adalora.target_r, ...); options of another method than this one are an error."""
    lora: LoraConfig = LoraConfig()
    dora: DoraMethod = DoraMethod()
    qlora: QLoraMethod = QLoraMethod()
    prilora: PriLoraMethod = PriLoraMethod()
    adalora: AdaLoraMethod = AdaLoraMethod()
    ia3: IA3Method = IA3Method()
    bitfit: BitFitMethod = BitFitMethod()
    adapter: AdapterMethod = AdapterMethod()
    prefix: PrefixTuningMethod = PrefixTuningMethod()
    ptuning_v2: PTuningV2Method = PTuningV2Method()
    prompt_tuning: PromptTuningMethod = PromptTuningMethod()
    ptuning: PTuningMethod = PTuningMethod()
    qat: QATMethod = QATMethod()
    bitnet: BitNetMethod = BitNetMethod()
    model: ModelSection
    data: DataConfig
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    train: TrainSection = TrainSection()
    parallel: ParallelSection = ParallelSection()
    trainable: TrainableSection = TrainableSection()
    """Restrict training to the token embedding and output layer (`embeddings`) or their new rows
    (`new_embeddings`), e.g. stage 1 after a vocabulary expansion; `all` = what the method trains."""

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from ..errors import did_you_mean
        from ..peft.methods import METHODS

        if name not in METHODS:
            raise ValueError(f"unknown method '{name}'{did_you_mean(name, METHODS)}; available: {', '.join(METHODS)}")
        return name

    @model_validator(mode="after")
    def _one_method(self):
        own = self.method_options()
        fixed = [k for k in changed_fields(own) if k in getattr(own, "derived", ())] if own is not None else []
        if fixed:
            raise ValueError(f"{self.method}.{fixed[0]} is set by method '{self.method}' itself; leave it out")
        for field in method_sections(type(self)):
            changed = changed_fields(getattr(self, field)) if field != self.method else []
            if changed:
                key, own = changed[0], self.method_options()
                fix = (f"{self.method}.{key}" if own is not None and key in type(own).model_fields else
                       f"method={field}")
                raise ValueError(f"{field}.{key} is an option of method '{field}', but method is '{self.method}': "
                                 f"set {fix} instead")
        return self

    def method_options(self) -> Section | None:
        """The chosen method's option section (None for `full` and methods without one)."""
        return getattr(self, self.method, None) if self.method in method_sections(type(self)) else None


def method_sections(cls: type[Section]) -> list[str]:
    """Fields of a training config that hold a method's options (named after the method)."""
    from ..peft.methods import METHODS

    return [name for name in cls.model_fields if name in METHODS]


def run_steps(t: TrainSection, n_samples: int) -> int:
    """Optimizer steps of a run: train.max_steps, else train.epochs over `n_samples` rows."""
    return t.max_steps or max(1, math.ceil(t.epochs * n_samples / (t.micro_batch_size * t.grad_accum)))
