"""An alignment run = config -> tokenizer -> preference or prompt data -> model (+ method, + head) -> the one loop.

`AlignConfig` is the training config with ``stage: rm | dpo | ppo`` and one section per stage; everything else
(model, method, lora, data, optim, schedule, train) means what it means for SFT.

Outputs in ``train.output_dir/final``:
- rm:  the reward model (HF backbone with any LoRA merged + ``score.safetensors``), see `lmforge.align.reward`;
- dpo: what the method saves for SFT (HF checkpoint for full fine-tuning, PEFT adapter for LoRA);
- ppo: the same for the policy, plus ``value_head.safetensors`` beside ``final/`` (the critic, to continue PPO);
- grpo, orpo, kto: what the method saves for SFT.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import model_validator
from safetensors.torch import save_file

from ..checkpoint import save_tokenizer_files
from ..config import changed_fields
from ..data import check_bad_share
from ..errors import ConfigError
from ..train.config import TrainConfig, run_steps
from ..train.run import build_model, method_from_config, prepare_run, prepare_trainable, write_final
from ..train.trainer import Trainer
from .common import WithHeads
from .config import DPOSection, GRPOSection, KTOSection, ORPOSection, PPOSection, RewardSection
from .data import build_preference_datasets, build_prompt_datasets
from .dpo import DPOObjective
from .grpo import GRPOObjective, grpo_total_steps
from .kto import KTOObjective, build_kto_datasets
from .orpo import ORPOObjective
from .ppo import PolicyWithValue, PPOObjective, load_reward_fn, ppo_total_steps
from .reward import RewardModel, RewardObjective, load_reward_model, save_reward_model

__all__ = ["ALIGN_STAGES", "AlignConfig", "run_alignment"]

ALIGN_STAGES = ("rm", "dpo", "ppo", "grpo", "orpo", "kto")


class AlignConfig(TrainConfig):
    switches: ClassVar[dict] = {**TrainConfig.switches, "stage": lambda name: name}
    stage: Literal["rm", "dpo", "ppo", "grpo", "orpo", "kto"] = "dpo"
    """rm: reward model on preference pairs. dpo: DPO/IPO/SimPO on preference pairs. ppo: PPO on prompts against a
    reward model or function (data.path holds the prompts). grpo: GRPO/DAPO on prompts with verifiable rewards,
    rollouts from lmforge's engine. orpo: ORPO (SFT + odds-ratio preference term, no reference) on preference
    pairs. kto: KTO on unpaired replies labelled desirable / undesirable."""
    rm: RewardSection = RewardSection()
    dpo: DPOSection = DPOSection()
    ppo: PPOSection = PPOSection()
    grpo: GRPOSection = GRPOSection()
    orpo: ORPOSection = ORPOSection()
    kto: KTOSection = KTOSection()

    @model_validator(mode="after")
    def _one_stage(self):
        """An option of another stage than this one is an error naming both (it would be silently ignored)."""
        for other in ALIGN_STAGES:
            changed = changed_fields(getattr(self, other)) if other != self.stage else []
            if changed:
                key, own = changed[0], getattr(self, self.stage)
                fix = f"{self.stage}.{key}" if key in type(own).model_fields else f"stage={other}"
                raise ValueError(f"{other}.{key} is an option of stage '{other}', but stage is '{self.stage}': "
                                 f"set {fix} instead")
        return self

    @model_validator(mode="after")
    def _ppo_reward(self):
        if self.stage == "ppo" and self.ppo.reward_model is None and self.ppo.reward_fn is None:
            raise ValueError("stage ppo needs a reward: set ppo.reward_model (a directory from stage rm) or "
                             "ppo.reward_fn ('module:function')")
        if self.stage == "grpo" and not self.grpo.rewards:
            raise ValueError("stage grpo needs at least one reward: set grpo.rewards, e.g. "
                             "[{fn: number_match, column: answer}]")
        return self


def run_alignment(cfg: AlignConfig) -> dict:
    """Run the rm, dpo or ppo stage as `cfg` says; returns the final metrics plus ``output``, ``model`` (the trained
    module: RewardModel, policy Transformer or PolicyWithValue), ``tokenizer`` and the data ``report``."""
    if cfg.stage not in ALIGN_STAGES:
        raise ConfigError(f"stage '{cfg.stage}' is not an alignment stage ({', '.join(ALIGN_STAGES)})")
    if cfg.stage == "ppo" and cfg.ppo.reward_model is None and cfg.ppo.reward_fn is None:
        raise ConfigError("stage ppo needs a reward: set ppo.reward_model (a directory from stage rm) or "
                          "ppo.reward_fn ('module:function')")
    if cfg.data.packing:
        raise ConfigError(f"data.packing does not apply to stage {cfg.stage} (pairs and prompts are never packed); "
                          "remove it")
    if cfg.data.format == "text":
        raise ConfigError(f"data.format=text has no prompts or replies for stage {cfg.stage}; leave data.format "
                          "at auto (the record's fields decide)")
    par = cfg.parallel
    for bad, what in ((par.tensor > 1, "parallel.tensor"), (par.pipeline > 1, "parallel.pipeline"),
                      (par.zero > 0, "parallel.zero"), (par.cpu_offload, "parallel.cpu_offload")):
        if bad:
            raise ConfigError(f"{what} does not apply to stage {cfg.stage} yet (alignment stages run data-parallel "
                              "with replicated weights under torchrun); remove it")
    run = prepare_run(cfg)
    out, device, tok_dir, tokenizer, pad_id, say = run.out, run.device, run.tok_dir, run.tokenizer, run.pad_id, run.say

    if cfg.stage in ("ppo", "grpo"):
        rl = getattr(cfg, cfg.stage)
        max_prompt = rl.max_prompt_len or cfg.data.max_seq_len - rl.max_new_tokens
        if max_prompt < 1:
            raise ConfigError(f"data.max_seq_len ({cfg.data.max_seq_len}) leaves no room for prompts after "
                              f"{cfg.stage}.max_new_tokens ({rl.max_new_tokens}); raise it or set "
                              f"{cfg.stage}.max_prompt_len")
        train_data, val_data, report = build_prompt_datasets(cfg.data, tokenizer, max_prompt)
    elif cfg.stage == "kto":
        train_data, val_data, report = build_kto_datasets(cfg.data, tokenizer, cfg.kto.max_prompt_len)
    else:
        section = {"rm": cfg.rm, "orpo": cfg.orpo}.get(cfg.stage, cfg.dpo)
        train_data, val_data, report = build_preference_datasets(cfg.data, tokenizer, section.max_prompt_len)
    say(report.summary())
    check_bad_share(report, cfg.data.max_bad_row_share)  # as SFT: a mostly broken file stops before any training

    precision = run.precision
    backbone = build_model(cfg, tokenizer, device, run.master_dtype)
    if cfg.stage == "ppo" and cfg.train.max_steps is None:  # the loop counts optimizer steps; PPO takes several
        per_step = cfg.train.micro_batch_size * cfg.train.grad_accum  # per rollout
        rollout = cfg.ppo.rollout_batch_size or per_step
        cfg = copy.deepcopy(cfg)
        cfg.train.max_steps = ppo_total_steps(cfg.train.epochs, len(train_data), rollout, cfg.ppo.ppo_epochs, per_step)
    if cfg.stage == "grpo" and cfg.train.max_steps is None:  # one optimizer step per prompts_per_step groups,
        per_step = cfg.grpo.prompts_per_step or max(  # num_iterations passes
            1, cfg.train.micro_batch_size * cfg.train.grad_accum // cfg.grpo.num_generations)
        cfg = copy.deepcopy(cfg)
        cfg.train.max_steps = grpo_total_steps(cfg.train.epochs, len(train_data), per_step, cfg.grpo.num_iterations)
    method = method_from_config(cfg, run_steps(cfg.train, len(train_data)))  # AdaLoRA's schedule: the run's length
    if cfg.stage == "rm":
        model, trained = RewardModel(backbone), WithHeads(method, ["score"])
        objective = RewardObjective(cfg.rm)
    elif cfg.stage == "dpo":
        model, trained = backbone, method
        objective = DPOObjective(cfg.dpo)
    elif cfg.stage == "kto":
        model, trained = backbone, method
        objective = KTOObjective(cfg.kto)
    elif cfg.stage == "orpo":
        model, trained = backbone, method
        objective = ORPOObjective(cfg.orpo)
    elif cfg.stage == "grpo":
        from .rewards import RewardSet

        model, trained = backbone, method
        reward_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16-pure": torch.bfloat16}.get(precision)
        rewards = RewardSet(cfg.grpo.rewards, device=device, dtype=reward_dtype or torch.float32, pad_id=pad_id)
        objective = GRPOObjective(cfg.grpo, tokenizer, rewards)
    else:
        model, trained = PolicyWithValue(backbone), WithHeads(method, ["value_head"])
        if cfg.ppo.reward_model is not None:
            reward_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16-pure": torch.bfloat16}.get(precision)
            reward = load_reward_model(cfg.ppo.reward_model, dtype=reward_dtype or torch.float32, device=device)
            reward.requires_grad_(False)
        else:
            reward = load_reward_fn(cfg.ppo.reward_fn)
        objective = PPOObjective(cfg.ppo, tokenizer, reward)
    trained.apply(model)
    method.check_save(backbone)  # what the final save would refuse fails now, not after the run
    row_mask = prepare_trainable(model, backbone, trained, cfg, run)

    ds = run.dist
    trainer = Trainer(model, trained, train_data, val_data, cfg, pad_id=pad_id, device=device, objective=objective,
                      dist_state=ds)
    if row_mask is not None:  # trainable: new_embeddings keeps the old rows exact through weight decay too
        row_mask.attach(trainer.optimizer)
    n_train = sum(p.numel() for _, p in trainer.params)
    n_all = sum(p.numel() for p in model.parameters())
    say(f"stage {cfg.stage}, method {cfg.method}: {n_train:,} trainable of {n_all:,} parameters "
        f"({100 * n_train / n_all:.2f}%), precision {precision}, {trainer.total_steps} steps on {device}"
        + (f", {ds.world} data-parallel ranks" if ds.enabled else ""))
    result = trainer.fit()
    if not ds.is_main:  # the weights are replicated: the main rank writes the outputs
        return {**result, "output": str(out / "final"), "model": model, "tokenizer": tokenizer, "report": report}

    def write(tmp: Path) -> None:
        if cfg.stage == "rm":
            save_reward_model(model, tmp, method)
        else:
            method.save(backbone, tmp, base_model_name_or_path=cfg.model.path)
        save_tokenizer_files(tok_dir, tmp)

    final = write_final(out / "final", trained.state_dict(model), write)
    if cfg.stage == "ppo":  # one file beside final/: written whole, then renamed over the old one
        head = out / "value_head.safetensors"
        save_file({"value_head.weight": model.value_head.weight.detach().float().cpu().contiguous()},
                  str(head.with_name(head.name + ".tmp")))
        os.replace(head.with_name(head.name + ".tmp"), head)
    return {**result, "output": str(final), "model": model, "tokenizer": tokenizer, "report": report}
