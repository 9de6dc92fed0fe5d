"""PPO with a KL penalty to the starting policy (instructGPT step 3), as an objective of the one training loop.

The objective's `micro_batches` pops from an experience buffer and refills it with a rollout when it runs dry:

1. rollout: `rollout_batch_size` prompts from the trainer's sampler, replies sampled by `lmforge.infer.generate`;
2. scoring: a reward model (`RewardModel`) or a Python function gives each reply a score; optional clipping, a
   penalty for replies that never ended, and whitening over the batch;
3. per-token rewards: -kl_coef * (log pi_old(a_t) - log pi_ref(a_t)) at every reply token, plus the score at the last;
4. GAE (gamma, lambda) from the value head's estimates -> advantages (whitened) and returns;
5. `ppo_epochs` shuffled passes over the rollout in micro-batches: clipped policy loss + vf_coef * clipped value loss
   (- entropy_coef * entropy), normalised by the step's reply tokens like any other loss of the loop.

The value head sits on the policy's final hidden states (`PolicyWithValue`), so one forward gives both. With a LoRA
policy the reference is the same model with its adapters bypassed; otherwise a frozen copy of the starting weights.

Shapes: a rollout of N sequences is left-padded to a common prompt length P and right-padded to reply length R;
``tokens``/``positions`` (N, P + R), per-reply-token tensors (N, R), the action at reply column t is predicted from
the hidden state at column P - 1 + t.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..data.encode import IGNORE
from ..errors import ConfigError, LmforgeError
from ..infer import SamplingParams, generate
from ..models import Transformer
from ..train.objective import Objective
from .common import adapters_disabled, can_disable_adapters, scalar_head, token_logps, whiten
from .config import PPOSection
from .reward import RewardModel

__all__ = ["PPOObjective", "PolicyWithValue", "gae", "load_reward_fn", "pad_rollout", "ppo_total_steps", "reply_logps"]

RewardFn = Callable[[list[list[dict]], list[str]], Sequence[float]]


class PolicyWithValue(torch.nn.Module):
    """A policy (`Transformer`, LoRA or not) and a scalar value head on its final hidden states."""

    def __init__(self, policy: Transformer, value_head: torch.nn.Linear | None = None):
        super().__init__()
        self.backbone = policy
        self.value_head = value_head if value_head is not None else scalar_head(policy.cfg.d_model, policy.embed.weight)

    @property
    def policy(self) -> Transformer:
        return self.backbone


def load_reward_fn(spec: str) -> RewardFn:
    """'package.module:function' or 'path/to/file.py:function' -> the function (one-line ConfigError otherwise)."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ConfigError(f"ppo.reward_fn '{spec}' must look like 'package.module:function' or 'file.py:function'")
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise ConfigError(f"ppo.reward_fn: file not found: {where}")
            spec_obj = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(spec_obj)
            spec_obj.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as e:
        raise ConfigError(f"ppo.reward_fn: cannot import '{where}': {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"ppo.reward_fn: '{where}' has no function '{name}'")
    return fn


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over reply tokens: rewards, values, mask (N, R), each reply a prefix of its
    row -> (advantages, returns) (N, R), 0 past each reply's end."""
    mask = mask.float()
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    R = rewards.shape[1]
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, advantages + values


def pad_rollout(prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]], pad_id: int) -> dict:
    """Left-pad prompts to P, right-pad replies to R: tokens/positions (N, P + R) int64 (-1 positions = padding),
    mask (N, R) bool, prompt_lens (N,) and the scalar prompt_len P."""
    N, P, R = len(prompts), max(len(p) for p in prompts), max(len(r) for r in replies)
    tokens = torch.full((N, P + R), pad_id, dtype=torch.long)
    positions = torch.full((N, P + R), -1, dtype=torch.long)
    mask = torch.zeros(N, R, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        tokens[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        tokens[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        positions[i, P - len(p):P + len(r)] = torch.arange(len(p) + len(r))
        mask[i, :len(r)] = True
    return {"tokens": tokens, "positions": positions, "mask": mask,
            "prompt_lens": torch.tensor([len(p) for p in prompts]), "prompt_len": torch.tensor(P)}


def reply_logps(policy: Transformer, tokens, positions, mask, P: int, temperature: float, value_head=None,
                with_entropy: bool = False):
    """Per reply token: log-prob of the sampled token and (with_entropy) the entropy, (N, R) float32, and values
    (N, R) when given a value head; 0 past the reply's end."""
    hidden = policy.hidden_states(tokens, positions)[:, P - 1:-1]  # (N, R, d): the states that chose each token
    labels = tokens[:, P:].masked_fill(~mask, IGNORE)
    logp, entropy = token_logps(policy.logits, hidden, labels, temperature, with_entropy)
    values = None
    if value_head is not None:
        values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float() * mask
    return logp, entropy, values


class PPOObjective(Objective):
    """PPO on rollouts from the policy; logs reward_mean and kl per sequence, clip_fraction, entropy, approx_kl,
    policy/value losses per reply token. Evaluation decodes the validation prompts greedily and reports their
    mean score (eval_reward_mean), KL to the reference (eval_kl) and eval_loss = -(score - kl_coef * KL)."""

    unit = "reply_tokens"

    def __init__(self, cfg: PPOSection, tokenizer, reward: RewardModel | RewardFn):
        if not isinstance(reward, RewardModel) and not callable(reward):
            raise ConfigError("PPO needs a reward: a RewardModel (ppo.reward_model) or a function (ppo.reward_fn)")
        self.cfg, self.tokenizer, self.reward = cfg, tokenizer, reward
        self.buffer: list[dict] = []
        self.reference: str | None = None
        self.ref_model: Transformer | None = None
        self.stop_id: int | None = None

    # ---------------------------------------------------------------- setup
    def setup(self, ctx) -> None:
        t, c = ctx.t, self.cfg
        per_step = t.micro_batch_size * t.grad_accum
        self.rollout_batch_size = c.rollout_batch_size or per_step
        if self.rollout_batch_size % per_step:
            raise ConfigError(f"ppo.rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                              f"train.micro_batch_size × train.grad_accum ({per_step})")
        policy = ctx.model.policy
        can_bypass = can_disable_adapters(policy)
        mode = "adapters_off" if c.reference == "auto" and can_bypass else c.reference
        if mode == "auto":
            mode = "copy"
        if mode == "adapters_off" and not can_bypass:
            raise ConfigError("ppo.reference=adapters_off needs a LoRA policy whose trained weights all sit in its "
                              "LoRA layers (no lora.modules_to_save); use ppo.reference=copy")
        self.reference = mode
        if mode == "copy":  # the starting weights (setup runs before any step or resume)
            self.ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
        stops = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else list(policy.cfg.stop_token_ids)
        if not stops:
            raise ConfigError("PPO needs an end-of-sequence token: the tokenizer and the model config have none")
        self.stop_id = stops[0]
        if isinstance(self.reward, RewardModel) and self.reward.backbone.cfg.vocab_size != policy.cfg.vocab_size:
            raise ConfigError(f"ppo.reward_model has vocab_size {self.reward.backbone.cfg.vocab_size}, the policy "
                              f"{policy.cfg.vocab_size}: train the reward model with the policy's tokenizer")

    # ---------------------------------------------------------------- rollouts
    def _ref_logps(self, ctx, tokens, positions, mask, P) -> torch.Tensor:
        if self.reference == "copy":
            return reply_logps(self.ref_model, tokens, positions, mask, P, self.cfg.temperature)[0]
        with adapters_disabled(ctx.model.policy) as base:
            return reply_logps(base, tokens, positions, mask, P, self.cfg.temperature)[0]

    def _scores(self, rows: list[dict], texts: list[str], batch: dict, device) -> torch.Tensor:
        if isinstance(self.reward, RewardModel):
            return self.reward(batch["tokens"].to(device), batch["positions"].to(device)).float().cpu()
        scores = self.reward([r["messages"] for r in rows], texts)
        if len(scores) != len(texts):
            raise LmforgeError(f"the reward function returned {len(scores)} scores for {len(texts)} completions")
        try:
            return torch.tensor([float(s) for s in scores], dtype=torch.float32)
        except (TypeError, ValueError):
            raise LmforgeError("the reward function must return numbers, one per completion") from None

    @torch.no_grad()
    def rollout(self, ctx, rows: list[dict], greedy: bool = False) -> dict:
        """Generate replies to `rows` (prompt rows) and compute everything PPO needs about them, on the CPU: the
        padded batch, old log-probs, reference log-probs, values, raw scores, per-sequence KL, and (for sampled
        rollouts) advantages and returns."""
        c, model, device = self.cfg, ctx.model, ctx.device
        model.eval()
        params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=0.0 if greedy else c.temperature,
                                top_k=c.top_k, top_p=c.top_p, seed=c.seed + ctx.steps_taken())
        outs = generate(model.policy, [r["tokens"] for r in rows], params, tokenizer=self.tokenizer)
        replies = [o.token_ids + ([self.stop_id] if o.finish_reason == "stop" else []) for o in outs]
        replies = [r or [self.stop_id] for r in replies]
        batch = pad_rollout([r["tokens"] for r in rows], replies, ctx.pad_id)
        P = int(batch["prompt_len"])
        parts: dict[str, list[torch.Tensor]] = {"old_logps": [], "ref_logps": [], "values": [], "scores": []}
        bs = ctx.t.micro_batch_size
        for s in range(0, len(rows), bs):
            tok, pos, mask = (batch[k][s:s + bs].to(device) for k in ("tokens", "positions", "mask"))
            with ctx.autocast():
                logp, _, values = reply_logps(model.policy, tok, pos, mask, P, c.temperature, model.value_head)
                ref = self._ref_logps(ctx, tok, pos, mask, P)
                sub = {"tokens": tok, "positions": pos}
                score = self._scores(rows[s:s + bs], [o.text for o in outs[s:s + bs]], sub, device)
            for k, v in (("old_logps", logp), ("ref_logps", ref), ("values", values), ("scores", score)):
                parts[k].append(v.float().cpu())
        batch.update({k: torch.cat(v) for k, v in parts.items()})
        mask = batch["mask"]
        kl = (batch["old_logps"] - batch["ref_logps"]) * mask  # (N, R) per-token log-ratio to the reference
        batch["kl_seq"] = kl.sum(-1)
        batch["ended"] = torch.tensor([o.finish_reason == "stop" for o in outs])
        if greedy:
            return batch
        score = batch["scores"].clone()
        if c.score_clip is not None:
            score = score.clamp(-c.score_clip, c.score_clip)
        if c.missing_eos_penalty is not None:
            score = score - c.missing_eos_penalty * (~batch["ended"]).float()
        if c.whiten_rewards and len(score) > 1:
            score = whiten(score)
        rewards = -c.kl_coef * kl
        last = mask.sum(-1) - 1  # (N,) column of each reply's final token
        rewards[torch.arange(len(rows)), last] += score
        advantages, returns = gae(rewards, batch["values"], mask, c.gamma, c.lam)
        batch["advantages"] = whiten(advantages, mask)
        batch["returns"] = returns
        return batch

    def _experience(self, ctx) -> list[dict]:
        """One rollout cut into ppo_epochs shuffled passes of micro-batches (each trimmed to its own padding)."""
        rows = [ctx.train_data[i] for i in ctx.sampler.take(self.rollout_batch_size)]
        ro = self.rollout(ctx, rows)
        n, bs = len(rows), ctx.t.micro_batch_size
        g = torch.Generator().manual_seed(self.cfg.seed + ctx.steps_taken())
        keys = ("tokens", "positions", "mask", "old_logps", "values", "advantages", "returns", "scores", "kl_seq")
        out = []
        for _ in range(self.cfg.ppo_epochs):
            order = torch.randperm(n, generator=g)
            for s in range(0, n, bs):
                idx = order[s:s + bs]
                mb = {k: ro[k][idx] for k in keys}
                P = int(ro["prompt_len"])
                left = P - int(ro["prompt_lens"][idx].max())  # columns that are padding in every row
                R = int(mb["mask"].sum(-1).max())
                mb["tokens"], mb["positions"] = mb["tokens"][:, left:P + R], mb["positions"][:, left:P + R]
                for k in ("mask", "old_logps", "values", "advantages", "returns"):
                    mb[k] = mb[k][:, :R]
                mb["prompt_len"] = torch.tensor(P - left)
                mb["step_sequences"] = torch.tensor(bs * ctx.t.grad_accum)
                out.append(mb)
        return out

    def micro_batches(self, ctx) -> list[dict]:
        if not self.buffer:
            self.buffer = self._experience(ctx)
        return [self.buffer.pop(0) for _ in range(ctx.t.grad_accum)]

    # ---------------------------------------------------------------- the loop's seams
    def collate(self, rows: list[dict], ctx) -> dict:
        """Evaluation batches (the loop calls collate on validation rows): greedy replies with their scores and KL."""
        ro = self.rollout(ctx, rows, greedy=True)
        return {"eval_scores": ro["scores"], "eval_kl": ro["kl_seq"]}

    def normalizer(self, batch: dict) -> int:
        return len(batch["eval_scores"]) if "eval_scores" in batch else int(batch["mask"].sum())

    def loss_sum(self, ctx, batch, step_units):
        c = self.cfg
        if "eval_scores" in batch:
            score, kl = batch["eval_scores"], batch["eval_kl"]
            return -(score - c.kl_coef * kl).sum(), {"reward_mean": float(score.sum()), "kl": float(kl.sum())}
        model, mask, P = ctx.model, batch["mask"], int(batch["prompt_len"])
        logp, entropy, values = reply_logps(model.policy, batch["tokens"], batch["positions"], mask, P,
                                            c.temperature, model.value_head, with_entropy=True)
        m = mask.float()
        log_ratio = (logp - batch["old_logps"]) * m
        ratio = log_ratio.exp()
        adv, old_v, ret = batch["advantages"], batch["values"], batch["returns"]
        policy_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - c.clip_range, 1 + c.clip_range))
        clipped_v = old_v + (values - old_v).clamp(-c.value_clip, c.value_clip)
        value_loss = 0.5 * torch.max((values - ret) ** 2, (clipped_v - ret) ** 2)
        per_token = policy_loss + c.vf_coef * value_loss - c.entropy_coef * entropy
        loss = (per_token * m).sum()
        # sequence-level figures: the loop divides every metric by the step's reply tokens, so scale them by
        # tokens / sequences of the step to get per-sequence means
        per_seq = step_units / max(int(batch["step_sequences"]), 1) if step_units else 0.0
        with torch.no_grad():
            metrics = {
                "policy_loss": float((policy_loss * m).sum()), "value_loss": float((value_loss * m).sum()),
                "clip_fraction": float((((ratio - 1).abs() > c.clip_range).float() * m).sum()),
                "entropy": float((entropy * m).sum()),
                "approx_kl": float((((ratio - 1) - log_ratio) * m).sum()),  # KL(old || new), k3 estimator
                "reward_mean": float(batch["scores"].sum()) * per_seq, "kl": float(batch["kl_seq"].sum()) * per_seq,
                "reply_len": float(m.sum()) * per_seq,
            }
        return loss, metrics


def ppo_total_steps(epochs: float, n_prompts: int, rollout_batch_size: int, ppo_epochs: int, per_step: int) -> int:
    """Optimizer steps for `epochs` passes over the prompts: rollouts x ppo_epochs x steps per pass of a rollout."""
    rollouts = max(1, math.ceil(epochs * n_prompts / rollout_batch_size))
    return rollouts * ppo_epochs * (rollout_batch_size // per_step)
