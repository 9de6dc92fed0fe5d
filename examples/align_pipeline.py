"""instructGPT's pipeline end to end on a CPU in minutes, with nothing downloaded: SFT -> reward model -> PPO, and
SFT -> DPO, on a preference task with a known answer (lmforge.align.demo).

1. SFT: a 2-layer model learns the quickstart's task (``reverse: a b c`` -> ``reversed: c b a``) from scratch;
2. preference data: pairs where the reply that mentions the letter ``z`` is preferred (the hidden rule);
3. reward model: the SFT model + a scalar head, trained on the pairs, scored on held-out pairs;
4. PPO (LoRA) against that reward model, with a KL penalty to the SFT policy;
5. DPO (LoRA) on the same pairs, with the LoRA-off model as the reference (+ the chosen replies' NLL, RPO-style,
   so replies keep their form).

It prints, before and after each stage, what the stage should move: held-out pair accuracy, the log-prob margin of
chosen over rejected replies, and how many greedy replies to held-out prompts follow the rule.

    python examples/align_pipeline.py --out runs/align          # a few minutes on 2 CPU cores
    lmforge train runs/align/dpo/config.yaml                     # every stage left its config: rerun, change, resume
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lmforge.align import demo
from lmforge.align.config import DPOSection, PPOSection
from lmforge.align.data import build_preference_datasets
from lmforge.align.dpo import logp_margin
from lmforge.align.reward import pair_accuracy
from lmforge.align.run import AlignConfig, run_alignment
from lmforge.data import DataConfig
from lmforge.models import load_hf
from lmforge.peft.lora import LoraConfig
from lmforge.quickstart import QuickstartConfig, make_data, make_tokenizer
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import ModelSection, OptimSection, ScheduleSection, TrainConfig, TrainSection
from lmforge.train.run import run_training


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/align")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--rm-steps", type=int, default=60)
    ap.add_argument("--ppo-steps", type=int, default=128)
    ap.add_argument("--dpo-steps", type=int, default=60)
    ap.add_argument("--kl-coef", type=float, default=0.2, help="PPO's KL penalty (0.05 lets it write only z's)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = Path(args.out)
    common = dict(device=args.device, precision="fp32" if args.device == "cpu" else "auto", progress=False,
                  tensorboard=False, save_every=0, resume=False)
    lora = LoraConfig(r=8, alpha=16, target_modules="all-linear")

    # 1. SFT from scratch on the reverse-letters task
    files = make_data(out / "data", QuickstartConfig(min_len=3, max_len=5, eval_prompts=100))
    tok_dir = make_tokenizer(out / "tokenizer", files)
    sft = run_training(TrainConfig(
        stage="sft", method="full",
        model=ModelSection(tokenizer=str(tok_dir), config=dict(d_model=64, n_layers=2, n_heads=4, d_ff=128,
                                                                max_seq_len=64)),
        data=DataConfig(path=str(files["sft"]), format="openai", max_seq_len=64),
        optim=OptimSection(lr=3e-3), schedule=ScheduleSection(warmup_steps=20),
        train=TrainSection(output_dir=str(out / "sft"), max_steps=args.sft_steps, micro_batch_size=32, **common)))
    base, tok = sft["output"], Tokenizer.from_dir(sft["output"])

    # 2. preference data with a known answer, and held-out prompts
    task = demo.make_task_files(out / "task", n_pairs=800, n_val=200, n_prompts=800)
    held_out = build_preference_datasets(DataConfig(path=str(task["pairs_val"]), max_seq_len=64), tok)[0]
    prompts = [json.loads(line)["prompt"] for line in task["prompts_val"].read_text().splitlines()]
    sft_model = load_hf(base)
    rate_sft = demo.greedy_reward(sft_model, tok, prompts)
    margin_sft = logp_margin(sft_model, held_out, tok.pad_id)
    exact_sft = _exact(sft_model, tok, prompts)

    # 3. reward model
    rm = run_alignment(AlignConfig(
        stage="rm", method="full", model=ModelSection(path=base),
        data=DataConfig(path=str(task["pairs"]), val_path=str(task["pairs_val"]), max_seq_len=64),
        optim=OptimSection(lr=3e-3), schedule=ScheduleSection(warmup_steps=5),
        train=TrainSection(output_dir=str(out / "rm"), max_steps=args.rm_steps, micro_batch_size=16, **common)))
    rm_acc = pair_accuracy(rm["model"], held_out, tok.pad_id)

    # 4. PPO against the reward model
    ppo = run_alignment(AlignConfig(
        stage="ppo", method="lora", lora=lora, model=ModelSection(path=base),
        ppo=PPOSection(reward_model=rm["output"], max_new_tokens=12, rollout_batch_size=32, ppo_epochs=4,
                       kl_coef=args.kl_coef),
        data=DataConfig(path=str(task["prompts"]), val_path=str(task["prompts_val"]), max_seq_len=64),
        optim=OptimSection(lr=1e-3), schedule=ScheduleSection(kind="constant"),
        train=TrainSection(output_dir=str(out / "ppo"), max_steps=args.ppo_steps, micro_batch_size=16,
                           eval_every=args.ppo_steps // 4, **common)))
    policy = ppo["model"].policy
    rate_ppo, exact_ppo = demo.greedy_reward(policy, tok, prompts), _exact(policy, tok, prompts)
    score_curve = {r["step"]: (r["eval_reward_mean"], r["eval_kl"]) for r in _records(out / "ppo") if "eval_kl" in r}

    # 5. DPO on the same pairs
    dpo = run_alignment(AlignConfig(
        stage="dpo", method="lora", lora=lora, model=ModelSection(path=base), dpo=DPOSection(beta=0.5, sft_coef=1.0),
        data=DataConfig(path=str(task["pairs"]), max_seq_len=64),
        optim=OptimSection(lr=3e-3), schedule=ScheduleSection(warmup_steps=5),
        train=TrainSection(output_dir=str(out / "dpo"), max_steps=args.dpo_steps, micro_batch_size=16, **common)))
    rate_dpo, margin_dpo = demo.greedy_reward(dpo["model"], tok, prompts), logp_margin(dpo["model"], held_out,
                                                                                        tok.pad_id)

    n = len(prompts)
    print(f"\n[align] the hidden preference: replies mentioning '{demo.TARGET}'; {len(held_out)} held-out pairs, "
          f"{n} held-out prompts (none contains '{demo.TARGET}')")
    print(f"[align] SFT     exact reversals {exact_sft:.0%}, greedy replies mentioning '{demo.TARGET}' {rate_sft:.0%}, "
          f"log p(chosen) - log p(rejected) {margin_sft:+.2f} nats")
    print(f"[align] RM      held-out pair accuracy 50% (chance; an untrained head scores all replies 0) -> "
          f"{rm_acc:.1%} after {args.rm_steps} steps")
    print(f"[align] PPO     greedy replies mentioning '{demo.TARGET}' {rate_sft:.0%} -> {rate_ppo:.0%} "
          f"(exact reversals {exact_sft:.0%} -> {exact_ppo:.0%})")
    for step, (score, kl) in score_curve.items():
        print(f"          step {step:4d}: reward-model score of greedy replies {score:+.2f}, KL to SFT {kl:.2f} nats")
    print(f"[align] DPO     greedy replies mentioning '{demo.TARGET}' {rate_sft:.0%} -> {rate_dpo:.0%}, "
          f"margin {margin_sft:+.2f} -> {margin_dpo:+.2f} nats")
    for p in prompts[:3]:
        got = [demo.greedy_replies(m, tok, [p])[0] for m in (sft_model, policy, dpo["model"])]
        print(f"  {p!r:22} SFT {got[0]!r:22} PPO {got[1]!r:22} DPO {got[2]!r}")
    print(f"[align] done in {(time.perf_counter() - t0) / 60:.1f} min; reward model {rm['output']}, PPO adapter "
          f"{ppo['output']}, DPO adapter {dpo['output']}")


def _exact(model, tok, prompts: list[str]) -> float:
    replies = demo.greedy_replies(model, tok, prompts)
    return sum(r.strip() == "reversed: " + " ".join(p.split(":", 1)[1].split()[::-1])
               for p, r in zip(prompts, replies)) / len(prompts)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


if __name__ == "__main__":
    main()
