"""LoRA DPO step: lmforge's DPO objective on the one trainer vs a transformers + peft DPO step written the usual way,
same shapes, same run.

Llama-3.2-1B shape with random weights, bf16 autocast (frozen base in bf16, adapters in fp32), LoRA r=16 on all
linear layers, activation checkpointing on; B pairs of T tokens each (the first half prompt, the second half reply).
Both variants hold one model: the reference is the same model with its adapters off (lmforge: LoRA layers bypassed;
peft: `disable_adapter()`). The reference variant computes reply log-probs from full (2B, T, vocab) logits, as
TRL's `concatenated_forward` does; lmforge computes them only at reply positions, in recomputed chunks.
Both start at loss log 2 (policy == reference). Prints one JSON line per variant, then a table.

    python bench/align_dpo.py --preset llama-3.2-1b --pairs 4 --seq 1024 --steps 10
    python bench/align_dpo.py --n-layers 2 --pairs 2 --seq 64 --steps 2 --warmup 1     # CPU smoke
"""
from __future__ import annotations

import argparse
import json

import torch
from _common import mem_reset, peak_gib, time_steps  # noqa: E402 (run as a script)
import torch.nn.functional as F


def _pairs(args, vocab: int, n: int) -> list[dict]:
    """n pairs sharing a prompt of T/2 tokens, replies of T/2 random tokens; labels on the reply only."""
    g = torch.Generator().manual_seed(0)
    half = args.seq // 2
    rows = []
    for _ in range(n):
        prompt = torch.randint(0, vocab, (half,), generator=g).tolist()
        row = {}
        for side in ("chosen", "rejected"):
            tokens = prompt + torch.randint(0, vocab, (args.seq - half,), generator=g).tolist()
            row[f"{side}_tokens"] = tokens
            row[f"{side}_labels"] = [-100] * (half - 1) + tokens[half:] + [-100]
        rows.append(row)
    return rows


def lmforge_variant(args, cfg, device, rows):
    from lmforge.align.config import DPOSection
    from lmforge.align.data import PreferenceDataset
    from lmforge.align.dpo import DPOObjective
    from lmforge.align.run import AlignConfig
    from lmforge.data import DataConfig
    from lmforge.models import Transformer
    from lmforge.peft.methods import build_method
    from lmforge.train import Trainer
    from lmforge.train.config import ModelSection, TrainSection

    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    method = build_method("lora", r=args.rank, alpha=2 * args.rank, target_modules="all-linear")
    method.apply(model)
    precision = "bf16" if device.type == "cuda" else "fp32"
    trainable = {id(p) for _, p in method.trainable_parameters(model)}
    for p in model.parameters():  # frozen base in bf16, as run_alignment does for adapters under bf16 autocast
        if id(p) not in trainable and precision == "bf16":
            p.data = p.data.to(torch.bfloat16)
    tcfg = AlignConfig(stage="dpo", model=ModelSection(tokenizer="unused"), data=DataConfig(path="unused"),
                       dpo=DPOSection(beta=0.1),
                       train=TrainSection(precision=precision, micro_batch_size=args.pairs, max_steps=10**6,
                                          activation_checkpointing=True, progress=False, tensorboard=False))
    obj = DPOObjective(tcfg.dpo)
    trainer = Trainer(model, method, PreferenceDataset(rows, []), None, tcfg, pad_id=0, device=device, objective=obj)
    assert obj.reference == "adapters_off"
    trainer.sampler.take = lambda n, it=iter(range(len(rows))): [next(it) for _ in range(n)]  # in order
    mem_reset()
    losses = []
    seconds = time_steps(lambda: losses.append(trainer.train_step()["loss"]), args.warmup, args.steps)
    return seconds, peak_gib(), losses[0]


def hf_peft_variant(args, cfg, device, rows):
    import peft
    import transformers

    from lmforge.models.hf import hf_config_dict

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hf_cfg = transformers.AutoConfig.for_model(**hf_config_dict(cfg, dtype))
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" or None)
    it = iter(range(0, len(rows), args.pairs))
    losses = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def logps(ids, labels):  # (2B,) summed reply log-probs from full logits, as TRL's concatenated_forward
        logits = model(input_ids=ids).logits.float()  # (2B, T, V); labels are pre-shifted: labels[t] follows ids[:t+1]
        lp = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0)[..., None]).squeeze(-1)
        return (lp * (labels != -100)).sum(-1)

    def step():
        s = next(it)
        batch = rows[s:s + args.pairs]
        ids = torch.tensor([r[f"{k}_tokens"] for k in ("chosen", "rejected") for r in batch], device=device)
        labels = torch.tensor([r[f"{k}_labels"] for k in ("chosen", "rejected") for r in batch], device=device)
        with autocast:
            with torch.no_grad(), model.disable_adapter():
                ref = logps(ids, labels)
            pol = logps(ids, labels)
        ratio = pol - ref
        c, r = ratio.chunk(2)
        loss = -F.logsigmoid(0.1 * (c - r)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    model.train()
    mem_reset()
    seconds = time_steps(step, args.warmup, args.steps)
    return seconds, peak_gib(), losses[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--n-layers", type=int, default=None)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default="lmforge,transformers+peft")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import transformers

    from lmforge.models import preset_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = preset_config(args.preset, **({"n_layers": args.n_layers} if args.n_layers else {}))
    rows = _pairs(args, cfg.vocab_size, args.pairs * (args.steps + args.warmup))
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "preset": args.preset, "n_layers": cfg.n_layers,
           "pairs": args.pairs, "seq": args.seq, "lora_r": args.rank, "activation_checkpointing": True,
           "dtype": "bf16" if device.type == "cuda" else "fp32"}
    results = []
    for name in args.variants.split(","):
        fn = hf_peft_variant if name == "transformers+peft" else lmforge_variant
        seconds, peak, first_loss = fn(args, cfg, device, rows)
        results.append({"variant": name, "pairs_per_s": round(args.pairs / seconds, 2), "step_s": round(seconds, 4),
                        "peak_mem_gib": round(peak, 2), "first_loss": round(first_loss, 4), **env})
        print(json.dumps(results[-1]), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    ref = next((r for r in results if r["variant"] == "transformers+peft"), None)
    print(f"\n{'variant':18} {'pairs/s':>9} {'step s':>8} {'peak GiB':>9} {'first loss':>11} {'speed vs HF':>12}")
    for r in results:
        ratio = f"{r['pairs_per_s'] / ref['pairs_per_s']:.2f}x" if ref else "-"
        print(f"{r['variant']:18} {r['pairs_per_s']:>9} {r['step_s']:>8} {r['peak_mem_gib']:>9} "
              f"{r['first_loss']:>11} {ratio:>12}")


if __name__ == "__main__":
    main()
