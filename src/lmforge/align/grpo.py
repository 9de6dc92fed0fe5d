"""GRPO on the one training loop, with lmforge's engine in the loop for rollouts (no second model, no weight copy).

Each rollout (`GRPOObjective._experience`):

1. takes prompts_per_step × steps_per_rollout prompts from the trainer's sampler and asks the engine
   (`lmforge.infer.engine.Engine`: paged KV cache, continuous batching, CUDA graphs) for G completions of each.
   The engine is built once on the policy module itself: LoRA layers are the trained ones, full fine-tuning reads
   the trained parameters in place, so every rollout samples the current weights. After the rollout the engine's
   prefix cache is reset (its K/V came from weights about to change) and, by default, its KV cache freed;
2. scores every completion with the configured rewards (`lmforge.align.rewards`), adds DAPO's overlong shaping,
   and turns rewards into group-normalised advantages (`group_advantages`); with dynamic sampling, groups whose
   rewards are all equal are dropped and more prompts sampled to refill the step;
3. computes the old log-probs (when a rollout feeds more than one update) and the reference's (beta > 0), and cuts
   the completions into steps of micro-batches, num_iterations passes over them.

The loss per reply token is -min(ratio·A, clip(ratio, 1-eps, 1+eps_high)·A) + beta·KL_k3(ref‖policy); `loss_type`
says how tokens are averaged (`aggregate`). Shapes as in `lmforge.align.ppo`: tokens/positions (N, P + R), per
reply token (N, R), advantages (N,).
"""
from __future__ import annotations

import copy
import math
import time

import torch

from ..errors import ConfigError
from ..infer import SamplingParams
from ..models import Transformer
from ..train.objective import Objective
from .common import adapters_disabled, can_disable_adapters
from .config import GRPOSection
from .ppo import pad_rollout, reply_logps
from .rewards import RewardSet

__all__ = ["GRPOObjective", "aggregate", "group_advantages", "grpo_token_loss", "grpo_total_steps",
           "overlong_penalty"]


def group_advantages(rewards: torch.Tensor, G: int, scale: bool = True, eps: float = 1e-4
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards (N,) in groups of G consecutive completions (NaN = missing) -> advantages (N,) = (r - group mean),
    divided by (group std + eps) when `scale` (std with Bessel's correction, over the group's present rewards), 0
    for missing rewards; and (N // G,) bool: groups with no spread (all equal, or fewer than two present)."""
    r = rewards.view(-1, G)
    present = ~r.isnan()
    n = present.sum(-1, keepdim=True)
    mean = r.nan_to_num(0.0).sum(-1, keepdim=True) / n.clamp(min=1)
    dev = (r - mean).nan_to_num(0.0) * present
    std = (dev.pow(2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    adv = dev / (std + eps) if scale else dev
    flat = (std.squeeze(-1) < 1e-6) | (n.squeeze(-1) < 2)
    return adv.masked_fill(~present, 0.0).reshape(-1), flat


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (N,): 0 up to max_len - buffer tokens, then falling linearly to -penalty at
    max_len."""
    if buffer <= 0:
        return torch.zeros(lengths.shape)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -penalty * (over / buffer).clamp(max=1.0)


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                    eps_high: float, beta: float = 0.0, ref_logp: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss (N, R) of the clipped objective plus beta × k3 KL to the reference, and per-token figures:
    clipped (the clip took the gradient away), kl (k3 estimate, zero without a reference), ratio."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    a = advantages[:, None].to(logp.dtype)  # (N, 1)
    loss = -torch.min(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = d.exp() - d - 1  # k3: unbiased, >= 0 (Schulman 2020)
        loss = loss + beta * kl
    clipped = ((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
    return loss, {"clipped": clipped.float(), "kl": kl.detach(), "ratio": ratio.detach()}


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The micro-batch's share of the step's loss *sum* (the loop divides by `units` over the step):
    grpo: sum over completions of their token mean; dapo, dr_grpo: sum over tokens."""
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum()
    return (per_token * m).sum()


def units(mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> int:
    """What the step's loss sum is divided by: completions (grpo), their tokens (dapo), completions × max_new_tokens
    (dr_grpo)."""
    if loss_type == "grpo":
        return mask.shape[0]
    if loss_type == "dapo":
        return int(mask.sum())
    return mask.shape[0] * max_new_tokens


def grpo_total_steps(epochs: float, n_prompts: int, prompts_per_step: int, num_iterations: int) -> int:
    return max(1, math.ceil(epochs * n_prompts / prompts_per_step)) * num_iterations


class GRPOObjective(Objective):
    """GRPO / DAPO / Dr. GRPO on rollouts from the engine; see the module docstring. Logs per step (as the step's
    own figures, `step_metrics`): reward and reward_std overall and per reward (reward_<name>), clip_fraction,
    kl (to the reference, beta > 0), approx_kl (to the rollout policy), entropy, completion lengths, the share of
    groups with no reward spread, rollout tokens/s and the time split gen_s / train_s. Evaluation: greedy
    completions of the validation prompts, eval_reward (eval_loss = -eval_reward)."""

    def __init__(self, cfg: GRPOSection, tokenizer, rewards: RewardSet):
        self.cfg, self.tokenizer, self.rewards = cfg, tokenizer, rewards
        self.unit = {"grpo": "completions", "dapo": "completion_tokens", "dr_grpo": "completion_token_slots"}[
            cfg.loss_type]
        self.scale = cfg.scale_rewards if cfg.scale_rewards is not None else cfg.loss_type != "dr_grpo"
        self.eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
        self.buffer: list[list[dict]] = []
        self.engine = None
        self.reference: str | None = None
        self.ref_model: Transformer | None = None
        self._log: dict[str, float] = {}
        self._acc: dict[str, float] = {}
        self._t_rollout_end: float | None = None

    # ---------------------------------------------------------------- setup
    def setup(self, ctx) -> None:
        t, c = ctx.t, self.cfg
        if ctx.dist.enabled or ctx.pipelined:
            raise ConfigError("stage grpo runs on one device (the engine samples from the whole policy in this "
                              "process): launch without torchrun and leave parallel.* at 1")
        self.prompts_per_step = c.prompts_per_step or max(1, t.micro_batch_size * t.grad_accum // c.num_generations)
        policy = ctx.model
        self.keep_old = c.num_iterations > 1 or c.steps_per_rollout > 1
        if c.beta > 0:
            can_bypass = can_disable_adapters(policy)
            mode = "adapters_off" if c.reference == "auto" and can_bypass else c.reference
            mode = "copy" if mode == "auto" else mode
            if mode == "adapters_off" and not can_bypass:
                raise ConfigError("grpo.reference=adapters_off needs a LoRA policy whose trained weights all sit in "
                                  "its LoRA layers (no lora.modules_to_save); use grpo.reference=copy")
            self.reference = mode
            if mode == "copy":
                self.ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
        stops = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else list(policy.cfg.stop_token_ids)
        if not stops:
            raise ConfigError("GRPO needs an end-of-sequence token: the tokenizer and the model config have none")
        self.stop_id = stops[0]
        self.rewards.check_columns(ctx.train_data, "data.path")
        if ctx.val_data is not None and len(ctx.val_data):
            self.rewards.check_columns(ctx.val_data, "the validation prompts")

    def build_engine(self, ctx):
        """The rollout engine on the policy module itself (built on first use): sized for one rollout."""
        from ..infer.engine import Engine, EngineConfig

        c = self.cfg
        n = max(self.prompts_per_step * c.steps_per_rollout * c.num_generations, ctx.t.micro_batch_size)
        longest = max(len(ctx.train_data[i]["tokens"]) for i in range(len(ctx.train_data)))
        if ctx.val_data is not None and len(ctx.val_data):
            longest = max(longest, max(len(r["tokens"]) for r in ctx.val_data.rows))
        max_len = longest + c.max_new_tokens
        block = 16
        cfg = EngineConfig(block_size=block, num_blocks=n * math.ceil((max_len + 1) / block) + 2, max_model_len=max_len,
                           max_num_seqs=n, max_num_batched_tokens=max(c.max_num_batched_tokens, max_len),
                           fast_decode=False, cuda_graphs=c.cuda_graphs, enable_prefix_caching=True)
        self.engine = Engine(ctx.model, self.tokenizer, cfg)
        return self.engine

    # ---------------------------------------------------------------- rollouts
    @torch.no_grad()
    def sample(self, ctx, prompts: list[list[int]], greedy: bool = False, seed: int = 0) -> list:
        """Completions of `prompts` (token ids) from the engine on the live weights: the engine's outputs, in order.
        Afterwards the prefix cache is reset and (release_kv_cache) the KV cache freed."""
        c = self.cfg
        engine = self.engine or self.build_engine(ctx)
        ctx.model.eval()
        ids = []
        for i, p in enumerate(prompts):
            params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=0.0 if greedy else c.temperature,
                                    top_k=c.top_k, top_p=c.top_p, seed=None if greedy else seed + i,
                                    stop_token_ids=[self.stop_id])
            ids.append(engine.add_request(p, params))
        done, wanted = {}, set(ids)
        try:
            while len(done) < len(ids):
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                if not engine.has_unfinished() and len(done) < len(ids):
                    raise RuntimeError("the engine stopped with requests unfinished")
        finally:
            for rid in ids:
                if rid not in done:
                    engine.abort(rid)
            engine.reset_prefix_cache()  # the weights change before the next rollout: cached K/V go stale
            if c.release_kv_cache:
                engine.release_kv_cache()
        return [done[r] for r in ids]

    def _score(self, rows: list[dict], outs: list, G: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        prompts = [r["messages"] for r in rows for _ in range(G)]
        records = [r.get("record", {}) for r in rows for _ in range(G)]
        prompt_ids = [r["tokens"] for r in rows for _ in range(G)]
        scores, missing = self.rewards(prompts, [o.text or "" for o in outs], records, prompt_ids,
                                       [o.token_ids for o in outs], group=G)
        return scores, self.rewards.total(scores), missing

    def _groups(self, ctx, n_prompts: int, round_: int) -> dict:
        """Sample and score `n_prompts` groups."""
        c, G = self.cfg, self.cfg.num_generations
        rows = [ctx.train_data[i] for i in ctx.sampler.take(n_prompts)]
        t0 = time.perf_counter()
        seed = c.seed + 1_000_003 * (ctx.steps_taken() + 1) + 7919 * round_ * n_prompts * G
        outs = self.sample(ctx, [r["tokens"] for r in rows for _ in range(G)], seed=seed)
        gen_s = time.perf_counter() - t0
        scores, total, missing = self._score(rows, outs, G)
        lengths = torch.tensor([len(o.token_ids) for o in outs])
        truncated = torch.tensor([o.finish_reason == "length" for o in outs])
        shaped = total + overlong_penalty(lengths, c.max_new_tokens, c.overlong_buffer, c.overlong_penalty)
        adv, flat = group_advantages(shaped, G, self.scale)
        return {"rows": rows, "outs": outs, "scores": scores, "total": total, "adv": adv, "flat": flat,
                "lengths": lengths, "truncated": truncated, "missing": missing, "gen_s": gen_s}

    def _experience(self, ctx) -> list[list[dict]]:
        c, G = self.cfg, self.cfg.num_generations
        want = self.prompts_per_step * c.steps_per_rollout
        parts = [self._groups(ctx, want, 0)]
        if c.dynamic_sampling:
            for r in range(1, c.max_resample_rounds + 1):
                if sum(int((~p["flat"]).sum()) for p in parts) >= want:
                    break
                parts.append(self._groups(ctx, want, r))
        t0 = time.perf_counter()
        # flatten the groups, then (dynamic sampling) keep those with spread, at most `want`
        groups = [(p, g) for p in parts for g in range(len(p["rows"]))]
        first = parts[0]
        if c.dynamic_sampling:
            kept = [(p, g) for p, g in groups if not p["flat"][g]][:want]
            groups = kept or [(first, g) for g in range(len(first["rows"]))]  # nothing to learn: zero advantages
        else:
            groups = groups[:want]
        idx = [(p, g * G + k) for p, g in groups for k in range(G)]
        prompt_ids = [p["rows"][i // G]["tokens"] for p, i in idx]
        replies = [p["outs"][i].token_ids + ([self.stop_id] if p["outs"][i].finish_reason == "stop" else [])
                   for p, i in idx]
        replies = [r or [self.stop_id] for r in replies]
        batch = pad_rollout(prompt_ids, replies, ctx.pad_id)
        batch["advantages"] = torch.stack([p["adv"][i] for p, i in idx])
        if c.mask_truncated:
            cut = torch.tensor([bool(p["truncated"][i]) for p, i in idx])
            batch["mask"] &= ~cut[:, None]
        P = int(batch["prompt_len"])
        if self.keep_old or c.beta > 0:
            self._logps(ctx, batch, P)
        n = len(idx)
        # rollout figures, logged with the step that ran it
        every = [(p, i) for p in parts for i in range(len(p["outs"]))]
        scores = torch.cat([p["scores"] for p in parts])
        total = torch.cat([p["total"] for p in parts])
        lengths = torch.cat([p["lengths"] for p in parts]).float()
        gen_s = sum(p["gen_s"] for p in parts)
        log = {"reward": _nanmean(total), "reward_std": _nanstd(total),
               "completion_len": float(lengths.mean()), "completion_len_min": float(lengths.min()),
               "completion_len_max": float(lengths.max()),
               "truncated_share": float(torch.cat([p["truncated"] for p in parts]).float().mean()),
               "zero_std_groups": float(torch.cat([p["flat"] for p in parts]).float().mean()),
               "reward_missing": float(sum(p["missing"] for p in parts)),
               "rollout_tokens_per_s": float(lengths.sum()) / max(gen_s, 1e-9), "gen_s": gen_s,
               "rollout_prompts": float(len(every) // G), "groups_kept": float(len(groups))}
        for f, name in enumerate(self.rewards.names):
            log[f"reward_{name}"], log[f"reward_{name}_std"] = _nanmean(scores[:, f]), _nanstd(scores[:, f])
        self._log, self._prep_s = log, time.perf_counter() - t0
        # steps_per_rollout steps of micro-batches; num_iterations passes, shuffled anew each pass
        g = torch.Generator().manual_seed(c.seed + ctx.steps_taken())
        bs, steps = ctx.t.micro_batch_size, []
        per_step = math.ceil(n / c.steps_per_rollout)
        for _ in range(c.num_iterations):
            order = torch.randperm(n, generator=g)
            for s in range(0, n, per_step):
                sel = order[s:s + per_step]
                steps.append([self._micro(batch, sel[m:m + bs], P) for m in range(0, len(sel), bs)])
        return steps

    @torch.no_grad()
    def _logps(self, ctx, batch: dict, P: int) -> None:
        """old_logps (the rollout policy's) and ref_logps (beta > 0) of every reply token, (N, R) on the CPU."""
        model, bs, c = ctx.model, ctx.t.micro_batch_size, self.cfg
        model.eval()
        old, ref = [], []
        for s in range(0, batch["tokens"].shape[0], bs):
            tok, pos, mask = (batch[k][s:s + bs].to(ctx.device) for k in ("tokens", "positions", "mask"))
            with ctx.autocast():
                if self.keep_old:
                    old.append(reply_logps(model, tok, pos, mask, P, c.temperature)[0].float().cpu())
                if c.beta > 0:
                    ref.append(self._ref_logps(ctx, tok, pos, mask, P).float().cpu())
        if old:
            batch["old_logps"] = torch.cat(old)
        if ref:
            batch["ref_logps"] = torch.cat(ref)

    def _ref_logps(self, ctx, tok, pos, mask, P) -> torch.Tensor:
        if self.reference == "copy":
            return reply_logps(self.ref_model, tok, pos, mask, P, self.cfg.temperature)[0]
        with adapters_disabled(ctx.model) as base:
            return reply_logps(base, tok, pos, mask, P, self.cfg.temperature)[0]

    @staticmethod
    def _micro(batch: dict, sel: torch.Tensor, P: int) -> dict:
        """Rows `sel` of the rollout, trimmed to their own padding."""
        left = P - int(batch["prompt_lens"][sel].max())
        R = max(int(batch["mask"][sel].sum(-1).max()), 1)
        mb = {"tokens": batch["tokens"][sel, left:P + R], "positions": batch["positions"][sel, left:P + R],
              "mask": batch["mask"][sel, :R], "advantages": batch["advantages"][sel],
              "prompt_len": torch.tensor(P - left)}
        for k in ("old_logps", "ref_logps"):
            if k in batch:
                mb[k] = batch[k][sel, :R]
        return mb

    def micro_batches(self, ctx) -> list[dict]:
        self._step_log = {}
        if not self.buffer:
            self.buffer = self._experience(ctx)
            self._step_log = self._log
        self._acc = {}
        self._t_rollout_end = time.perf_counter()
        return self.buffer.pop(0)

    # ---------------------------------------------------------------- the loop's seams
    def collate(self, rows: list[dict], ctx) -> dict:
        """Evaluation batches: greedy completions of the validation prompts and their total reward."""
        outs = self.sample(ctx, [r["tokens"] for r in rows], greedy=True)
        _, total, _ = self._score(rows, outs, 1)
        return {"eval_rewards": total.nan_to_num(0.0)}

    def normalizer(self, batch: dict) -> int:
        if "eval_rewards" in batch:
            return len(batch["eval_rewards"])
        return units(batch["mask"], self.cfg.loss_type, self.cfg.max_new_tokens)

    def tokens(self, batch: dict) -> int:
        return int((batch["positions"] >= 0).sum()) if "positions" in batch else 0

    def loss_sum(self, ctx, batch, step_units):
        c = self.cfg
        if "eval_rewards" in batch:
            r = batch["eval_rewards"]
            return -r.sum(), {"reward": float(r.sum())}
        mask, P = batch["mask"], int(batch["prompt_len"])
        logp, entropy, _ = reply_logps(ctx.model, batch["tokens"], batch["positions"], mask, P, c.temperature,
                                       with_entropy=True)
        old = batch["old_logps"] if "old_logps" in batch else logp.detach()
        per_token, fig = grpo_token_loss(logp, old, batch["advantages"], c.epsilon, self.eps_high, c.beta,
                                         batch.get("ref_logps"))
        loss = aggregate(per_token, mask, c.loss_type)
        with torch.no_grad():
            m = mask.float()
            ratio = fig["ratio"]
            for k, v in (("clip_fraction", fig["clipped"]), ("kl", fig["kl"]), ("entropy", entropy),
                         ("approx_kl", (ratio - 1) - ratio.log())):
                self._acc[k] = self._acc.get(k, 0.0) + float((v * m).sum())
            self._acc["_tokens"] = self._acc.get("_tokens", 0.0) + float(m.sum())
        return loss, {}

    def step_metrics(self) -> dict[str, float]:
        n = max(self._acc.pop("_tokens", 0.0), 1.0)
        out = {k: v / n for k, v in self._acc.items()}
        if self.cfg.beta == 0:
            out.pop("kl", None)
        out.update(self._step_log)
        if self._t_rollout_end is not None:
            out["train_s"] = time.perf_counter() - self._t_rollout_end
        self._acc, self._step_log = {}, {}
        return out


def _nanmean(x: torch.Tensor) -> float:
    x = x[~x.isnan()]
    return float(x.mean()) if len(x) else float("nan")


def _nanstd(x: torch.Tensor) -> float:
    x = x[~x.isnan()]
    return float(x.std()) if len(x) > 1 else 0.0
