"""Alignment on the one trainer: reward model, PPO, DPO (+ IPO, SimPO), ORPO, GRPO (+ DAPO, Dr. GRPO).

- ``data``: preference pairs and rankings (``PreferenceDataset``), PPO prompts (``PromptDataset``);
- ``reward``: ``RewardModel`` (decoder + scalar head), ``RewardObjective``, ``save_reward_model``/``load_reward_model``;
- ``dpo``: ``DPOObjective`` (reference = the LoRA-off model, or log-probs precomputed once);
- ``ppo``: ``PolicyWithValue``, ``PPOObjective`` (rollouts, KL penalty, GAE, clipped losses);
- ``orpo``: ``ORPOObjective`` (chosen NLL + odds-ratio term, no reference);
- ``kto``: ``KTOObjective`` and its data (unpaired replies labelled desirable or not);
- ``grpo``: ``GRPOObjective`` (engine rollouts on the live policy, group advantages, clipped loss), ``rewards``:
  ``RewardSet`` (built-in verifiers, Python functions, a reward model);
- ``run``: ``AlignConfig`` (``stage: rm | dpo | ppo | grpo | orpo | kto``) and ``run_alignment(cfg)``.

Names are loaded on first use, so ``lmforge.train`` can import the config sections without an import cycle.
"""
from __future__ import annotations

import importlib

from .config import DPOSection, GRPOSection, KTOSection, ORPOSection, PairSection, PPOSection, RewardSection, RewardSpec

_LAZY = {
    "PreferencePair": "data", "PromptExample": "data", "PreferenceDataset": "data", "PromptDataset": "data",
    "build_preference_datasets": "data", "build_prompt_datasets": "data", "parse_preference": "data",
    "parse_prompt": "data", "collate_pairs": "data",
    "adapters_disabled": "common", "token_logps": "common", "WithHeads": "common",
    "RewardModel": "reward", "RewardObjective": "reward", "save_reward_model": "reward", "load_reward_model": "reward",
    "pair_accuracy": "reward",
    "DPOObjective": "dpo", "logp_margin": "dpo",
    "GRPOObjective": "grpo", "group_advantages": "grpo", "grpo_token_loss": "grpo", "RewardSet": "rewards",
    "ORPOObjective": "orpo", "orpo_losses": "orpo",
    "KTOObjective": "kto", "kto_losses": "kto", "build_kto_datasets": "kto", "parse_kto": "kto",
    "PolicyWithValue": "ppo", "PPOObjective": "ppo", "gae": "ppo", "load_reward_fn": "ppo",
    "AlignConfig": "run", "run_alignment": "run", "ALIGN_STAGES": "run",
}

__all__ = ["DPOSection", "GRPOSection", "KTOSection", "ORPOSection", "PPOSection", "PairSection", "RewardSection",
           "RewardSpec"] + list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
