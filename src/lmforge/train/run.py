"""A training run = config → tokenizer → model (+ method applied) → data → the one loop → saved result."""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import save_tokenizer_files
from ..config import dump_config
from ..data import build_datasets, check_bad_share
from ..data.mixing import MixedDataset
from ..errors import ConfigError, NonFiniteError
from ..models import ModelConfig, Transformer, config_from_hf, load_hf, preset_config
from ..peft.methods import build_method
from ..runtime import pick_device
from ..tokenizer import Tokenizer
from ..atomic import atomic_dir
from ..hub import resolve_model
from .checkpoint import nonfinite_tensors
from .config import TrainConfig, run_steps
from .distributed import DistState, init_distributed, local_device
from .trainable import restrict_trainable
from .trainer import Trainer, resolve_precision



def build_model(cfg: TrainConfig, tokenizer: Tokenizer, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Load the checkpoint, or build a random model from a preset / field overrides (vocab from the tokenizer)."""
    if cfg.model.path is not None:
        return load_hf(resolve_model(cfg.model.path), dtype=dtype, device=device, progress=cfg.train.progress)
    with torch.device(device):
        return Transformer(model_config(cfg, tokenizer)).to(dtype)


def model_config(cfg: TrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The architecture the run trains: the checkpoint's config.json, or the preset / field overrides."""
    m = cfg.model
    if m.path is not None:
        return config_from_hf(resolve_model(m.path))
    fields = {"vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_id,
              "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id, **m.config}
    try:
        model_cfg = preset_config(m.preset, **fields) if m.preset else ModelConfig(**fields)
    except ConfigError:
        raise  # already one line naming its key (an unknown preset)
    except ValueError as e:
        raise ConfigError(f"model.config: {str(e).splitlines()[-1].strip()}") from None
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model vocab_size {model_cfg.vocab_size} < tokenizer vocab {tokenizer.vocab_size}")
    return model_cfg


def method_from_config(cfg: TrainConfig, total_steps: int):
    """The chosen method built from its section (`lora:`, `qlora:`, ...), options that follow the run's length
    (AdaLoRA's total_step) filled in from `total_steps` when unset."""
    section = cfg.method_options()
    options = section.model_dump() if section is not None else {}
    if "total_step" in options and options["total_step"] is None:
        options["total_step"] = total_steps
    return build_method(cfg.method, **options)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def write_final(final: Path, state: dict[str, torch.Tensor], write: Callable[[Path], None]) -> Path:
    """Write a run's output directory like a checkpoint: ``write(tmp)`` fills a temporary directory that is renamed
    to ``final`` only when complete (a kill leaves the previous ``final`` or the new one, never a model without its
    config or tokenizer), and only if the trained ``state`` is finite."""
    bad = nonfinite_tensors(state.items())
    if bad:
        raise NonFiniteError(f"'{bad[0]}' holds inf/NaN: {final} is not written; lower optim.lr or check the data")
    with atomic_dir(final) as tmp:
        write(tmp)
    return final


@dataclass
class RunSetup:
    """What every training stage (train, align) starts from; see `prepare_run`."""

    out: Path  # train.output_dir
    device: torch.device
    dist: DistState  # a world of one unless launched by torchrun
    tok_dir: Path | str
    tokenizer: Tokenizer
    pad_id: int
    precision: str  # resolved: fp32 | bf16 | fp16 | bf16-pure

    @property
    def master_dtype(self) -> torch.dtype:
        """The dtype weights are built in: bf16 for bf16-pure, else fp32 master weights."""
        return torch.bfloat16 if self.precision == "bf16-pure" else torch.float32

    def say(self, *args, **kwargs) -> None:
        """print, on the main rank only."""
        if self.dist.is_main:
            print(*args, **kwargs)


def prepare_run(cfg: TrainConfig) -> RunSetup:
    """The start every stage shares: the device, the process group and mesh under torchrun (`cfg.parallel`), the
    output directory with the resolved config (main rank), the seed, the tokenizer and the precision."""
    out = Path(cfg.train.output_dir)
    device = local_device(pick_device(cfg.train.device, "train.device"))
    ds = init_distributed(cfg.parallel, device)  # torchrun → process group + (dp, tp) mesh; else a world of one
    if ds.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
    seed_everything(cfg.train.seed)  # adapter init, dropout and data order all follow the seed (same on all ranks)
    tok_dir = resolve_model(cfg.model.tokenizer or cfg.model.path)  # a directory or a Hugging Face id
    tokenizer = Tokenizer.from_dir(tok_dir, chat_template=cfg.model.chat_template)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    return RunSetup(out, device, ds, tok_dir, tokenizer, pad_id, resolve_precision(cfg.train.precision, device))


def prepare_trainable(model: nn.Module, backbone: nn.Module, method, cfg: TrainConfig, run: RunSetup):
    """After the method is applied to `model` (the `backbone` Transformer, or a wrapper around it): `trainable:`
    restricts what trains, and frozen weights under bf16/fp16 autocast drop their fp32 master copy (half the
    memory). Returns the `RowRestriction` to attach to the optimizer (`trainable: new_embeddings`), else None."""
    model_dir = resolve_model(cfg.model.path) if cfg.model.path else None
    row_mask = restrict_trainable(backbone, cfg.trainable, cfg.method, model_dirs=(model_dir, run.tok_dir))
    if run.precision in ("bf16", "fp16") and (cfg.method != "full" or cfg.trainable.params != "all"):
        half = torch.bfloat16 if run.precision == "bf16" else torch.float16
        trainable = {id(p) for _, p in method.trainable_parameters(model)}
        for p in model.parameters():
            if id(p) not in trainable and p.is_floating_point():
                p.data = p.data.to(half)
    return row_mask


def run_training(cfg: TrainConfig) -> dict:
    """Train as the config says; returns the final metrics. Output: `output_dir/final` (HF checkpoint for full
    fine-tuning, PEFT adapter for LoRA), checkpoints, metrics.jsonl, the resolved config."""
    run = prepare_run(cfg)
    out, device, ds, say, tokenizer, tok_dir = run.out, run.device, run.dist, run.say, run.tokenizer, run.tok_dir

    train_data, val_data, report = build_datasets(cfg.data, tokenizer)
    say(report.summary())
    check_bad_share(report, cfg.data.max_bad_row_share)  # a mostly broken file stops here, before any training
    if len(train_data) == 0:
        raise ConfigError("data: no usable training samples (see the report above)")

    precision = run.precision
    if not ds.enabled and device.type == "cuda":  # the planner's verdict before any weight is allocated
        from ..plan.planner import check_training_fits  # (train.force skips it)

        check_training_fits(cfg, model_config(cfg, tokenizer), device, say)
    model = build_model(cfg, tokenizer, device, run.master_dtype)
    method = method_from_config(cfg, run_steps(cfg.train, len(train_data)))
    method.apply(model)
    method.check_save(model)  # what the final save would refuse fails now, not after the run
    row_mask = prepare_trainable(model, model, method, cfg, run)

    pad_id = run.pad_id
    n_train = sum(p.numel() for _, p in method.trainable_parameters(model))
    n_all = sum(p.numel() for p in model.parameters())
    # data.mix: a weighted interleave, its position saved like the default sampler's
    sampler = train_data.sampler(cfg.train.seed) if isinstance(train_data, MixedDataset) else None
    trainer = Trainer(model, method, train_data, val_data, cfg, pad_id=pad_id, device=device, dist_state=ds,
                      sampler=sampler)
    if row_mask is not None:  # trainable: new_embeddings keeps the old rows exact through weight decay too
        row_mask.attach(trainer.optimizer)
    say(f"method {cfg.method}: {n_train:,} trainable of {n_all:,} parameters ({100 * n_train / n_all:.2f}%), "
        f"precision {precision}, {trainer.total_steps} steps on {device}"
        + (f", {ds.world} ranks (dp {ds.dp} × tp {ds.tp}, zero {cfg.parallel.zero})" if ds.enabled else ""))
    result = trainer.fit()
    final = out / "final"
    if ds.enabled:  # gather the full weights once, save from rank 0 into a plain model of the same method
        model = gather_to_plain_model(model, method, ds)
    if ds.is_main:
        def write(tmp: Path) -> None:
            method.save(model, tmp, base_model_name_or_path=cfg.model.path)
            save_tokenizer_files(tok_dir, tmp)

        write_final(final, method.state_dict(model), write)
    return {**result, "output": str(final), "model": model, "tokenizer": tokenizer, "method": method,
            "optimizer": trainer.optimizer}


def gather_to_plain_model(model, method, ds):
    """Full (unsharded) weights of a DDP/FSDP/TP/pipeline model, loaded into a plain CPU model on the main rank."""
    from .distributed import full_state_dict

    full = full_state_dict(model, ds)
    if not ds.is_main:
        return model
    with torch.device("meta"):
        plain = Transformer(model.cfg)
    plain.to_empty(device="cpu")
    method.apply(plain)
    plain.load_state_dict({k: v.to(plain.state_dict()[k].dtype) for k, v in full.items()}, strict=False)
    plain.reset_buffers()
    return plain
