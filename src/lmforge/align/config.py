"""Options of the alignment stages, one section per stage (`rm:`, `dpo:`, `ppo:` in a training YAML).

These sections import nothing from `lmforge.train`, so the training config can hold them without an import cycle.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..config import Section, changed_fields


class PairSection(Section):
    """What the pairwise stages (rm, dpo) share: how a (prompt, reply) pair is fitted into data.max_seq_len."""

    max_prompt_len: int | None = Field(None, ge=1)
    """Prompt tokens kept (its end, where the question is) when prompt + reply exceed data.max_seq_len; the reply is
    then cut to fit. Default: half of data.max_seq_len. With data.truncation=drop, such pairs are dropped instead."""


class RewardSection(PairSection):
    """Reward model: the decoder plus a scalar head on the last real token, trained on pairs with
    -log sigmoid(r_chosen - r_rejected) (instructGPT)."""

    center_coef: float = Field(0.0, ge=0)
    """Adds center_coef * (r_chosen + r_rejected)^2 per pair, keeping rewards centred on zero (Eisenstein et al.
    2023); 0 = off. Rewards are then directly usable as PPO scores without a bias."""


class DPOSection(PairSection):
    """Direct preference optimisation and its variants, on the policy itself (no reward model)."""

    loss: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    """sigmoid: DPO (Rafailov et al. 2023), -log sigmoid(beta * (policy - reference log-ratio margin)).
    ipo: IPO (Azar et al. 2023), (margin of length-averaged log-ratios - 1/(2 beta))^2.
    simpo: SimPO (Meng et al. 2024), -log sigmoid(beta * (avg logp chosen - avg logp rejected) - gamma), no reference."""
    beta: float = Field(0.1, gt=0)
    """Strength of the implicit KL constraint (DPO/IPO, typically 0.01-0.5); SimPO's reward scale (typically 2-2.5)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Conservative DPO: the probability that a pair's label is flipped (sigmoid loss only)."""
    simpo_gamma: float = Field(0.5, ge=0)
    """SimPO's target reward margin gamma."""
    sft_coef: float = Field(0.0, ge=0)
    """Adds sft_coef * (the chosen reply's mean token NLL) per pair, so the chosen likelihood cannot collapse
    (RPO, Pang et al. 2024); 0 = off."""
    reference: Literal["auto", "adapters_off", "precomputed"] = "auto"
    """Where the reference log-probs come from. adapters_off: the same model with its LoRA layers bypassed, computed
    per step (LoRA/DoRA/QLoRA runs whose trained weights all sit in LoRA layers, i.e. no modules_to_save).
    precomputed: one pass over the data before training, with the starting weights. auto: adapters_off where
    possible, else precomputed. Neither holds a second model."""

    @model_validator(mode="after")
    def _options_of_this_loss(self):
        """Options another loss reads are errors naming it (they were silently ignored)."""
        owners = {"label_smoothing": ("sigmoid",), "simpo_gamma": ("simpo",), "reference": ("sigmoid", "ipo")}
        for key in changed_fields(self):
            if key in owners and self.loss not in owners[key]:
                raise ValueError(f"dpo.{key} is an option of dpo.loss {' / '.join(owners[key])}, but dpo.loss is "
                                 f"'{self.loss}': set dpo.loss={owners[key][0]} or drop it")
        return self


class PPOSection(Section):
    """PPO against a reward model or a Python reward function, with a per-token KL penalty to the starting policy
    (instructGPT). Rollouts come from lmforge's generator; data.path holds the prompts."""

    reward_model: str | None = None
    """Directory written by the rm stage (HF backbone + score.safetensors); it must share the policy's tokenizer."""
    reward_fn: str | None = None
    """'package.module:function' or 'path/to/file.py:function', called as fn(prompts, completions) -> list of floats:
    prompts are message lists (the conversation so far), completions the generated texts."""
    rollout_batch_size: int | None = Field(None, ge=1)
    """Prompts per rollout; a multiple of train.micro_batch_size * train.grad_accum (default: exactly that)."""
    ppo_epochs: int = Field(4, ge=1)
    """Optimisation passes over each rollout batch (shuffled into micro-batches each time)."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest reply sampled in a rollout."""
    max_prompt_len: int | None = Field(None, ge=1)
    """Prompts longer than this keep their last tokens (default: data.max_seq_len - max_new_tokens)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of rollouts; log-probs are taken at the same temperature, so ratios stay exact."""
    top_k: int = Field(0, ge=0)
    """Rollouts keep only the k most likely tokens (0 = off)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Rollouts sample from the smallest set with this much probability (1 = off)."""
    kl_coef: float = Field(0.05, ge=0)
    """beta of the per-token penalty -beta * (log pi(a) - log pi_ref(a)) added to the rewards."""
    clip_range: float = Field(0.2, gt=0)
    """PPO's epsilon: the policy ratio is clipped to [1 - eps, 1 + eps]."""
    value_clip: float = Field(0.2, gt=0)
    """New values may move at most this far from the rollout's values before the value loss stops rewarding it."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss (the value head shares the policy's backbone)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus weight (0 = off; entropy is logged either way)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount of GAE."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda: 1 = Monte-Carlo returns, 0 = one-step TD."""
    whiten_rewards: bool = True
    """Whiten the scores over each rollout batch (zero mean, unit variance) before they enter the rewards, so the
    KL coefficient means the same whatever the reward's scale. Advantages are always whitened."""
    score_clip: float | None = Field(None, gt=0)
    """Clip raw scores to [-score_clip, score_clip] (None = off)."""
    missing_eos_penalty: float | None = Field(None, ge=0)
    """Subtracted from the score of replies that hit max_new_tokens without ending (None = off)."""
    reference: Literal["auto", "adapters_off", "copy"] = "auto"
    """The KL reference: adapters_off (the policy with its LoRA layers bypassed; LoRA-family runs without
    modules_to_save) or copy (a frozen copy of the starting weights). auto: adapters_off where possible."""
    seed: int = 0
    """Seed of rollout sampling and of the micro-batch shuffles."""

    @model_validator(mode="after")
    def _one_reward(self):
        if self.reward_model is not None and self.reward_fn is not None:
            raise ValueError("set either ppo.reward_model or ppo.reward_fn, not both")
        return self


class RewardSpec(Section):
    """One reward of GRPO: a built-in or a Python function, and its weight in the sum."""

    fn: str
    """A built-in (exact_match, number_match, format, code_tests, reward_model) or 'package.module:function' /
    'path/to/file.py:function', called as fn(prompts=[messages...], completions=[text...], **columns) where each
    column of the prompts file comes as a list aligned with the completions; returns one float (or None) each."""
    weight: float = 1.0
    """Weight of this reward in the total (total = sum of weight × reward over the rewards that scored a sample)."""
    column: str = "answer"
    """Built-ins: the column holding the reference (exact_match, number_match: the answer, GSM8K's '... #### 42'
    works; code_tests: the test code)."""
    pattern: str | None = None
    """format: the regex a completion must match whole (re.DOTALL); default
    '<think>.*?</think>\\s*<answer>.*?</answer>'."""
    model: str | None = None
    """reward_model: a directory written by stage rm (same tokenizer as the policy); scores prompt + completion."""
    timeout: float = Field(10.0, gt=0)
    """code_tests: seconds each program may run."""


class GRPOSection(Section):
    """GRPO (Shao et al. 2024) with verifiable rewards: G completions per prompt sampled by lmforge's engine from
    the live policy, group-normalised rewards as advantages, a clipped ratio loss; DAPO and Dr. GRPO as options."""

    rewards: list[RewardSpec] = []
    """The rewards, summed with their weights (at least one). Each: {fn: a built-in (exact_match, number_match,
    format, code_tests, reward_model) or 'module:function' / 'file.py:function', weight: 1.0, column: 'answer' (the
    reference column of exact_match / number_match, the tests of code_tests), pattern: (format's regex), model:
    (reward_model's stage-rm directory), timeout: 10 (code_tests, seconds)}."""
    num_generations: int = Field(8, ge=2)
    """G: completions sampled per prompt (a group)."""
    prompts_per_step: int | None = Field(None, ge=1)
    """Prompts (groups) per optimizer step; default train.micro_batch_size × train.grad_accum / G (at least 1).
    A step's G × prompts_per_step completions go through the model train.micro_batch_size at a time."""
    steps_per_rollout: int = Field(1, ge=1)
    """Optimizer steps fed by one rollout (each on its own prompts_per_step groups); >1 makes later steps slightly
    off-policy, so old log-probs are kept."""
    num_iterations: int = Field(1, ge=1)
    """Passes over each rollout (mu of the GRPO paper); old log-probs from the rollout are kept for the ratio."""
    max_new_tokens: int = Field(256, ge=1)
    """Longest completion."""
    max_prompt_len: int | None = Field(None, ge=1)
    """Prompts longer than this keep their last tokens (default: data.max_seq_len - max_new_tokens)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of rollouts; log-probs are taken at the same temperature."""
    top_k: int = Field(0, ge=0)
    """Rollouts keep only the k most likely tokens (0 = off)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Rollouts sample from the smallest set with this much probability (1 = off)."""
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "dapo"
    """How per-token losses become the step's loss. grpo: mean over each completion's tokens, then over
    completions. dapo: token-level, sum over all tokens / the step's tokens (long completions weigh what their
    length says). dr_grpo: sum / (completions × max_new_tokens), no length bias (Liu et al. 2025)."""
    scale_rewards: bool | None = None
    """Divide advantages by the group's reward std. None = yes, except for loss_type dr_grpo (which drops it)."""
    epsilon: float = Field(0.2, gt=0)
    """Lower clip: the ratio is clipped to [1 - epsilon, 1 + epsilon_high]."""
    epsilon_high: float | None = Field(None, gt=0)
    """Upper clip (DAPO's clip-higher, e.g. 0.28); default epsilon."""
    beta: float = Field(0.0, ge=0)
    """KL coefficient to the reference policy (k3 estimator per token); 0 = no reference (current practice)."""
    reference: Literal["auto", "adapters_off", "copy"] = "auto"
    """The KL reference when beta > 0: adapters_off (the LoRA policy with its adapters bypassed) or copy (a frozen
    copy of the starting weights); auto: adapters_off where possible."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal (no signal) and sample more prompts to refill the step."""
    max_resample_rounds: int = Field(3, ge=0)
    """Dynamic sampling: extra rollouts tried per step to refill it; then the step runs with what it has."""
    overlong_buffer: int = Field(0, ge=0)
    """DAPO's soft overlong punishment: completions longer than max_new_tokens - overlong_buffer lose up to
    overlong_penalty, linearly; 0 = off."""
    overlong_penalty: float = Field(1.0, ge=0)
    """The most the soft overlong punishment takes off (at max_new_tokens)."""
    mask_truncated: bool = False
    """DAPO's overlong filtering: completions cut at max_new_tokens add nothing to the loss."""
    release_kv_cache: bool = True
    """Free the engine's KV cache (and its CUDA graphs) after every rollout so the update has the memory; False
    keeps it allocated (faster rollouts, less memory for training)."""
    cuda_graphs: bool = True
    """Decode rollouts through CUDA graphs (CUDA only)."""
    max_num_batched_tokens: int = Field(8192, ge=1)
    """The engine's token budget per step (prefill chunks)."""
    seed: int = 0
    """Seed of rollout sampling and of the shuffles."""

    @model_validator(mode="after")
    def _consistent(self):
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise ValueError(f"grpo.epsilon_high ({self.epsilon_high}) is below grpo.epsilon ({self.epsilon}); "
                             "clip-higher means epsilon_high >= epsilon")
        if self.overlong_buffer >= self.max_new_tokens:
            raise ValueError(f"grpo.overlong_buffer ({self.overlong_buffer}) must be below grpo.max_new_tokens "
                             f"({self.max_new_tokens})")
        # options read only under another setting (they were silently ignored): key -> (is it read?, what reads it)
        readers = {"reference": (self.beta > 0, "grpo.beta > 0 (the KL term)"),
                   "max_resample_rounds": (self.dynamic_sampling, "grpo.dynamic_sampling=true"),
                   "overlong_penalty": (self.overlong_buffer > 0, "grpo.overlong_buffer > 0")}
        for key in changed_fields(self):
            if key in readers and not readers[key][0]:
                raise ValueError(f"grpo.{key} is read only with {readers[key][1]}: set that or drop grpo.{key}")
        return self


class ORPOSection(PairSection):
    """ORPO (Hong et al. 2024): SFT on the chosen reply plus an odds-ratio preference term, no reference model."""

    beta: float = Field(0.1, gt=0)
    """lambda of the paper: weight of -log sigmoid(log odds(chosen) - log odds(rejected)) beside the chosen NLL
    (odds from length-averaged log-probs)."""


class KTOSection(PairSection):
    """KTO (Ethayarajh et al. 2024): unpaired replies labelled desirable or undesirable, a prospect-theory loss
    against a reference point (the policy's KL to the reference, estimated on mismatched prompt/reply pairs)."""

    beta: float = Field(0.1, gt=0)
    """Scale of the implicit reward beta * log(pi / pi_ref)."""
    desirable_weight: float = Field(1.0, gt=0)
    """lambda_D; with unbalanced data keep desirable_weight × #desirable / (undesirable_weight × #undesirable) in
    [1, 4/3] (the paper's advice)."""
    undesirable_weight: float = Field(1.0, gt=0)
    """lambda_U."""
    reference: Literal["auto", "adapters_off", "precomputed"] = "auto"
    """As dpo.reference: adapters_off (the LoRA policy with its adapters bypassed) or precomputed (one pass over the
    data before training); auto picks adapters_off where possible."""
