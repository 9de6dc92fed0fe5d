"""Alignment as in instructGPT, on the one trainer: reward model, PPO, DPO (+ IPO, SimPO).

- ``data``: preference pairs and rankings (``PreferenceDataset``), PPO prompts (``PromptDataset``);
- ``reward``: ``RewardModel`` (decoder + scalar head), ``RewardObjective``, ``save_reward_model``/``load_reward_model``;
- ``dpo``: ``DPOObjective`` (reference = the LoRA-off model, or log-probs precomputed once);
- ``ppo``: ``PolicyWithValue``, ``PPOObjective`` (rollouts, KL penalty, GAE, clipped losses);
- ``run``: ``AlignConfig`` (``stage: rm | dpo | ppo``) and ``run_alignment(cfg)``.

Names are loaded on first use, so ``lmforge.train`` can import the config sections without an import cycle.
"""
from __future__ import annotations

import importlib

from .config import DPOSection, PairSection, PPOSection, RewardSection

_LAZY = {
    "PreferencePair": "data", "PromptExample": "data", "PreferenceDataset": "data", "PromptDataset": "data",
    "build_preference_datasets": "data", "build_prompt_datasets": "data", "parse_preference": "data",
    "parse_prompt": "data", "collate_pairs": "data",
    "adapters_disabled": "common", "token_logps": "common", "WithHeads": "common",
    "RewardModel": "reward", "RewardObjective": "reward", "save_reward_model": "reward", "load_reward_model": "reward",
    "pair_accuracy": "reward",
    "DPOObjective": "dpo", "logp_margin": "dpo",
    "PolicyWithValue": "ppo", "PPOObjective": "ppo", "gae": "ppo", "load_reward_fn": "ppo",
    "AlignConfig": "run", "run_alignment": "run", "ALIGN_STAGES": "run",
}

__all__ = ["DPOSection", "PPOSection", "PairSection", "RewardSection"] + list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
