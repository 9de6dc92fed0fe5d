"""`lmforge quickstart --from-scratch`: the whole main job on a CPU in a few minutes, with no pretrained model.

1. generate data: a pretraining text of "copy" lines and an instruction task with exact answers (reverse a sequence
   of letters), with held-out evaluation prompts that never appear in training;
2. train a byte-level BPE tokenizer on it and build a small Llama-style model;
3. pretrain the model (full training, packed rows) on the text;
4. measure exact-match accuracy on the held-out prompts, LoRA-fine-tune on the instruction task, measure again;
5. print before/after accuracy and a few sample generations.

Every step goes through the same code a user's run does: `run_training`, `build_datasets`, `generate`.
"""
from __future__ import annotations

import json
import random
import string
import time
from pathlib import Path

from ..data import DataConfig
from ..infer import SamplingParams, generate
from ..peft.lora import LoraConfig
from ..tokenizer import Tokenizer, get_template, save_pretrained_tokenizer, train_bpe
from ..train.config import ModelSection, OptimSection, ScheduleSection, TrainConfig, TrainSection
from ..train.run import run_training

LETTERS = string.ascii_lowercase


def _letters(rng: random.Random, cfg) -> str:
    return " ".join(rng.choice(LETTERS) for _ in range(rng.randint(cfg.min_len, cfg.max_len)))


def _answer(s: str) -> str:
    # "reversed:" first, so every answer letter is the same " x" token the prompt and the pretraining text use
    return "reversed: " + " ".join(reversed(s.split()))


SFT_STEPS, BATCH_SIZE, EVAL_PROMPTS = 400, 32, 200  # the from-scratch defaults of QuickstartConfig's shared fields


def make_data(out: Path, cfg) -> dict[str, Path]:
    """Pretraining text (copy lines), SFT conversations (reverse), and held-out eval prompts with answers."""
    rng = random.Random(cfg.seed)
    held_out: set[str] = set()
    while len(held_out) < (cfg.eval_prompts or EVAL_PROMPTS):
        held_out.add(_letters(rng, cfg))
    pretrain = [f"copy: {s} => {s}" for s in (_letters(rng, cfg) for _ in range(6000))]
    sft = []
    while len(sft) < 4000:
        s = _letters(rng, cfg)
        if s not in held_out:  # the evaluation measures generalisation, not memory
            sft.append({"messages": [{"role": "user", "content": f"reverse: {s}"},
                                     {"role": "assistant", "content": _answer(s)}]})
    files = {"pretrain": out / "pretrain.txt", "sft": out / "sft.jsonl", "eval": out / "eval.jsonl"}
    out.mkdir(parents=True, exist_ok=True)
    files["pretrain"].write_text("\n".join(pretrain) + "\n")
    files["sft"].write_text("".join(json.dumps(r) + "\n" for r in sft))
    files["eval"].write_text("".join(json.dumps({"prompt": f"reverse: {s}", "answer": _answer(s)}) + "\n"
                                     for s in sorted(held_out)))
    return files


def make_tokenizer(out: Path, files: dict[str, Path]) -> Path:
    texts = [files["pretrain"].read_text(), files["sft"].read_text()]
    tok = train_bpe(texts, vocab_size=400)
    save_pretrained_tokenizer(tok, out, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                              unk_token="<unk>", chat_template=get_template("chatml"))
    return out


def exact_match(model, tokenizer: Tokenizer, eval_file: Path, show: int = 0) -> tuple[float, list[tuple]]:
    rows = [json.loads(line) for line in eval_file.read_text(encoding="utf-8").split("\n") if line.strip()]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                             tokenize=True) for r in rows]
    outs = generate(model, prompts, SamplingParams(temperature=0, max_new_tokens=16), tokenizer=tokenizer)
    answers = [o.text.strip() for o in outs]
    hits = sum(a == r["answer"] for a, r in zip(answers, rows))
    return hits / len(rows), [(r["prompt"], r["answer"], a) for r, a in zip(rows[:show], answers[:show])]


def run_from_scratch(cfg) -> dict:
    """The from-scratch demo for a `QuickstartConfig`: tokenizer, pretraining, LoRA, exact match before/after."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    sft_steps, batch_size = cfg.sft_steps or SFT_STEPS, cfg.batch_size or BATCH_SIZE
    files = make_data(out / "data", cfg)
    tok_dir = make_tokenizer(out / "tokenizer", files)
    print(f"[quickstart] data and tokenizer in {out} ({time.perf_counter() - t0:.0f}s)")

    common = dict(device=cfg.device, micro_batch_size=batch_size, save_every=0, seed=cfg.seed,
                  precision="fp32" if cfg.device == "cpu" else "auto")
    pretrain = TrainConfig(
        stage="pretrain", method="full",
        model=ModelSection(tokenizer=str(tok_dir), config=dict(d_model=128, n_layers=4, n_heads=4, d_ff=256,
                                                                max_seq_len=128)),
        data=DataConfig(path=str(files["pretrain"]), format="text", text_mode="lines", max_seq_len=128,
                        packing=True),
        optim=OptimSection(lr=3e-3, weight_decay=0.01), schedule=ScheduleSection(warmup_steps=20),
        train=TrainSection(output_dir=str(out / "pretrain"), max_steps=cfg.pretrain_steps, **common),
    )
    print("[quickstart] 1/2 pretraining a small Llama-style model on generated text")
    base = run_training(pretrain)

    before, _ = exact_match(base["model"], base["tokenizer"], files["eval"])
    sft = TrainConfig(
        stage="sft", method="lora", lora=LoraConfig(r=16, alpha=32, target_modules="all-linear"),
        model=ModelSection(path=base["output"]),
        data=DataConfig(path=str(files["sft"]), format="openai", max_seq_len=128),
        optim=OptimSection(lr=3e-3), schedule=ScheduleSection(warmup_steps=20),
        train=TrainSection(output_dir=str(out / "sft-lora"), max_steps=sft_steps, **common),
    )
    print("[quickstart] 2/2 LoRA fine-tuning on the instruction task (reverse a sequence of letters)")
    tuned = run_training(sft)
    after, samples = exact_match(tuned["model"], tuned["tokenizer"], files["eval"], show=5)

    minutes = (time.perf_counter() - t0) / 60
    n_eval = cfg.eval_prompts or EVAL_PROMPTS
    print(f"\n[quickstart] exact match on {n_eval} held-out prompts: before LoRA {before:.1%} → "
          f"after LoRA {after:.1%}  ({minutes:.1f} min)")
    for prompt, answer, got in samples:
        print(f"  {prompt!r:28} expected {answer!r:16} got {got!r}")
    print(f"[quickstart] base model: {base['output']}\n[quickstart] LoRA adapter (PEFT format): {tuned['output']}")
    return {"before": before, "after": after, "minutes": minutes, "base": base["output"], "adapter": tuned["output"]}
