"""GRPO step throughput: lmforge's stage grpo (engine rollouts on the live policy + the one trainer) against TRL's
`GRPOTrainer` with its default generation (transformers `generate`), same model shape, G, prompt and completion
lengths, same run.

A random-weight model of a preset shape (default Llama-3.2-1B) and a word-level tokenizer over the preset's whole
vocabulary (token i is the word "w<i>", written to a temporary directory), so both sides tokenize the same prompts to
the same ids. Prompts are random words; the reward is the share of even token ids in a completion (cheap, the same
function for both). Random weights almost never sample the end token, so completions run to max_new_tokens on both
sides. bf16 on CUDA: LoRA (r=16, all linear layers, frozen base in bf16) or full fine-tuning (weights and AdamW in
bf16 on both sides); activation checkpointing on both; beta 0 (no reference model), loss_type dapo, one update per
rollout. Each optimizer step takes prompts × G completions, micro_batch completions per forward/backward.

Prints one JSON line per variant (also to --out): step_s (seconds per optimizer step, generation included),
completions_per_s, rollout tokens/s, the generation / training split, peak GPU memory.

    python bench/grpo.py --preset llama-3.2-1b --method lora --prompts 4 --G 8 --prompt-len 128 --max-new 512 \
        --micro-batch 8 --steps 4 --warmup 1 --out grpo_h100.jsonl
    python bench/grpo.py --preset llama-3.2-1b --override n_layers=2 d_model=128 n_heads=4 n_kv_heads=2 \
        head_dim=32 d_ff=256 vocab_size=1024 --prompts 2 --G 4 --prompt-len 16 --max-new 16 --steps 2 --warmup 1
        # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from _common import mem_reset, peak_gib, sync  # noqa: E402 (run as a script)


def even_tokens(prompts=None, completions=None, completion_ids=None, **kwargs):
    """The bench reward: share of even token ids in each completion."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def make_tokenizer(out: Path, vocab_size: int, eos_id: int) -> Path:
    """A word-level tokenizer over `vocab_size` ids ("w<i>"; `eos_id` is <|eos|>, the last id <|pad|>), saved where
    transformers' AutoTokenizer and lmforge's Tokenizer both read it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {f"w{i}": i for i in range(vocab_size)}
    pad_id = vocab_size - 1 if eos_id != vocab_size - 1 else vocab_size - 2
    specials = {eos_id: "<|eos|>", pad_id: "<|pad|>"}
    for i, s in specials.items():
        del vocab[f"w{i}"]
        vocab[s] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(s, special=True) for s in specials.values()])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
        "chat_template": template, "model_max_length": 1 << 20}))
    return out


def prompts_of(args, vocab_size: int, n: int, specials: set[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab_size, (args.prompt_len,), generator=g).tolist()
        out.append([i if i not in specials else 1 for i in ids])
    return out


def lmforge_variant(args, cfg, device, tok_dir: Path, prompts: list[list[int]]) -> dict:
    from lmforge.align.config import GRPOSection, RewardSpec
    from lmforge.align.data import PromptDataset
    from lmforge.align.grpo import GRPOObjective
    from lmforge.align.rewards import RewardSet
    from lmforge.align.run import AlignConfig
    from lmforge.data import DataConfig
    from lmforge.models import Transformer
    from lmforge.peft.methods import build_method
    from lmforge.tokenizer import Tokenizer
    from lmforge.train import Trainer
    from lmforge.train.config import ModelSection, OptimSection, TrainSection

    cuda = device.type == "cuda"
    precision = ("bf16" if args.method == "lora" else "bf16-pure") if cuda else "fp32"
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg).to(torch.bfloat16 if precision == "bf16-pure" else torch.float32)
    method = build_method(args.method, **({"r": 16, "alpha": 32, "target_modules": "all-linear"}
                                          if args.method == "lora" else {}))
    method.apply(model)
    if precision == "bf16":  # frozen base in bf16, adapters in fp32: what run_alignment does
        trainable = {id(p) for _, p in method.trainable_parameters(model)}
        for p in model.parameters():
            if id(p) not in trainable:
                p.data = p.data.to(torch.bfloat16)
    tok = Tokenizer.from_dir(tok_dir)
    grpo = GRPOSection(rewards=[RewardSpec(fn=f"{Path(__file__).resolve()}:even_tokens")], num_generations=args.G,
                       prompts_per_step=args.prompts, max_new_tokens=args.max_new, loss_type="dapo",
                       release_kv_cache=not args.keep_kv_cache, cuda_graphs=cuda)
    tcfg = AlignConfig(stage="grpo", model=ModelSection(tokenizer="unused"), data=DataConfig(path="unused"),
                       grpo=grpo, optim=OptimSection(lr=1e-6),
                       train=TrainSection(precision=precision, micro_batch_size=args.micro_batch, max_steps=10**6,
                                          activation_checkpointing=True, progress=False, tensorboard=False,
                                          output_dir=tempfile.mkdtemp()))
    obj = GRPOObjective(grpo, tok, RewardSet(grpo.rewards, pad_id=tok.pad_id))
    data = PromptDataset([{"tokens": p, "messages": [{"role": "user", "content": tok.decode(p)}], "record": {}}
                          for p in prompts])
    trainer = Trainer(model, method, data, None, tcfg, pad_id=tok.pad_id, device=device, objective=obj)
    recs = []
    mem_reset()
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        rec = trainer.train_step()
        sync()
        rec["step_s"] = time.perf_counter() - t0
        if i >= args.warmup:
            recs.append(rec)
    n = len(recs)
    step_s = sum(r["step_s"] for r in recs) / n
    gen_s = sum(r["gen_s"] for r in recs) / n
    gen_tokens = sum(r["completion_len"] * args.prompts * args.G for r in recs) / n
    return {"step_s": step_s, "gen_s": gen_s, "train_s": step_s - gen_s, "completion_len": gen_tokens /
            (args.prompts * args.G), "rollout_tokens_per_s": gen_tokens / gen_s, "peak_mem_gib": peak_gib(),
            "reward": sum(r["reward"] for r in recs) / n}


def trl_variant(args, cfg, device, tok_dir: Path, prompts: list[list[int]]) -> dict:
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from lmforge.models.hf import hf_config_dict

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(**hf_config_dict(cfg, dtype))
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    texts = [" ".join(f"w{i}" for i in p) for p in prompts]
    assert tok(texts[0], add_special_tokens=False)["input_ids"] == prompts[0]
    steps = args.warmup + args.steps
    data = Dataset.from_list([{"prompt": t} for t in texts])
    peft_config = None
    if args.method == "lora":
        import peft

        peft_config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    per_step = args.prompts * args.G
    gconf = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.micro_batch,
                       gradient_accumulation_steps=per_step // args.micro_batch, num_generations=args.G,
                       max_completion_length=args.max_new, temperature=1.0, beta=0.0, loss_type="dapo",
                       learning_rate=1e-6, max_steps=steps, bf16=cuda, gradient_checkpointing=True,
                       logging_steps=1, report_to=[], save_strategy="no", use_vllm=False, seed=0,
                       use_cpu=not cuda, dataloader_num_workers=0)
    ends: list[float] = []  # wall clock at every optimizer step's end: a step is end - previous end (all included)
    records: list[dict] = []

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            sync()
            ends.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            sync()
            ends.append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                records.append(dict(logs))

    trainer = GRPOTrainer(model=model, reward_funcs=[even_tokens], args=gconf, train_dataset=data,
                          processing_class=tok, peft_config=peft_config, callbacks=[Clock()])
    mem_reset()
    trainer.train()
    timed = [b - a for a, b in zip(ends, ends[1:])][args.warmup:]
    step_s = sum(timed) / len(timed)
    late = records[args.warmup:]
    comp_len = sum(r.get("completions/mean_length", args.max_new) for r in late) / max(len(late), 1)
    return {"step_s": step_s, "completion_len": comp_len, "peak_mem_gib": peak_gib(),
            "reward": sum(r["reward"] for r in late) / max(len(late), 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--override", nargs="*", default=[], help="ModelConfig fields, key=value (CPU smoke)")
    ap.add_argument("--method", default="lora", choices=["lora", "full"])
    ap.add_argument("--prompts", type=int, default=4, help="prompts (groups) per optimizer step")
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-new", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--keep-kv-cache", action="store_true", help="lmforge: keep the KV cache between rollouts")
    ap.add_argument("--variants", default="lmforge,trl")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import transformers

    from lmforge.models import preset_config

    overrides = {k: int(v) if v.lstrip("-").isdigit() else v for k, v in (o.split("=", 1) for o in args.override)}
    cfg = preset_config(args.preset, **overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) and cfg.eos_token_id < cfg.vocab_size else 0
    tok_dir = make_tokenizer(Path(tempfile.mkdtemp()) / "tok", cfg.vocab_size, eos)
    specials = {eos, cfg.vocab_size - 1, cfg.vocab_size - 2}
    prompts = prompts_of(args, cfg.vocab_size, args.prompts * (args.steps + args.warmup) * 2, specials)
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "preset": args.preset, "overrides": overrides,
           "method": args.method, "prompts_per_step": args.prompts, "G": args.G, "prompt_len": args.prompt_len,
           "max_new_tokens": args.max_new, "micro_batch": args.micro_batch, "steps": args.steps}
    results = []
    for name in args.variants.split(","):
        if name == "trl":
            import trl

            env_v = {**env, "trl": trl.__version__}
            r = trl_variant(args, cfg, device, tok_dir, prompts)
        else:
            env_v = {**env, "keep_kv_cache": args.keep_kv_cache}
            r = lmforge_variant(args, cfg, device, tok_dir, prompts)
        r["completions_per_s"] = args.prompts * args.G / r["step_s"]
        results.append({"variant": name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()},
                        **env_v})
        print(json.dumps(results[-1]), flush=True)
        mem_reset()
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    ref = next((r for r in results if r["variant"] == "trl"), None)
    print(f"\n{'variant':10} {'step s':>8} {'compl/s':>8} {'peak GiB':>9} {'vs TRL':>7}")
    for r in results:
        ratio = f"{r['completions_per_s'] / ref['completions_per_s']:.2f}x" if ref else "-"
        print(f"{r['variant']:10} {r['step_s']:>8} {r['completions_per_s']:>8.2f} {r['peak_mem_gib']:>9} {ratio:>7}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
