"""LoRA fine-tuning throughput and peak memory: lmforge's trainer vs transformers + peft, same shapes, same run.

Llama-3.2-1B shape with random weights, bf16 autocast (frozen base in bf16, adapters in fp32 as peft keeps them),
LoRA r=16 on all linear layers, activation checkpointing on, batch B × seq T of random tokens, every token trained.
Prints one JSON line per variant, then a table.

    python bench/train_lora.py --preset llama-3.2-1b --batch 4 --seq 2048 --steps 10
"""
from __future__ import annotations

import argparse
import json

import torch
from _common import hf_lm_step, mem_reset, peak_gib, time_steps  # noqa: E402 (run as a script)


def lmforge_variant(args, cfg, device, packed: bool, attention_backend: str = "auto"):
    from lmforge.data import DataConfig
    from lmforge.models import Transformer
    from lmforge.peft.methods import build_method
    from lmforge.train import Trainer, TrainConfig
    from lmforge.train.config import ModelSection, TrainSection

    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    model.attention_backend = attention_backend  # packed rows: flex BlockMask (auto on CUDA) or dense SDPA mask
    method = build_method("lora", r=args.rank, alpha=2 * args.rank, target_modules="all-linear")
    method.apply(model)
    trainable = {id(p) for _, p in method.trainable_parameters(model)}
    for p in model.parameters():  # frozen base in bf16, as run_training does for adapters under bf16 autocast
        if id(p) not in trainable:
            p.data = p.data.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(args.batch * (args.steps + args.warmup)):
        tokens = torch.randint(0, cfg.vocab_size, (args.seq,), generator=g).tolist()
        if packed:  # 4 documents per row, positions restart, attention stays inside each document
            n = args.seq // 4
            positions = [i % n for i in range(args.seq)]
            docs = [i // n for i in range(args.seq)]
            labels = [tokens[i + 1] if (i + 1) % n else -100 for i in range(args.seq - 1)] + [-100]
            rows.append({"tokens": tokens, "labels": labels, "positions": positions, "document_ids": docs})
        else:
            rows.append({"tokens": tokens, "labels": tokens[1:] + [-100], "positions": list(range(args.seq))})
    tcfg = TrainConfig(model=ModelSection(tokenizer="unused"), data=DataConfig(path="unused"),
                       train=TrainSection(precision="bf16", micro_batch_size=args.batch, max_steps=10**6,
                                          activation_checkpointing=True, progress=False, tensorboard=False,
                                          compile=args.compile))
    trainer = Trainer(model, method, rows, None, tcfg, pad_id=0, device=device)
    trainer.sampler.take = lambda n, it=iter(range(len(rows))): [next(it) for _ in range(n)]  # in order, no shuffle
    mem_reset()
    losses = []
    seconds = time_steps(lambda: losses.append(trainer.train_step()["loss"]), args.warmup, args.steps)
    return seconds, peak_gib(), losses[-1]


def hf_peft_variant(args, cfg, device):
    import peft
    import transformers

    from lmforge.models.hf import hf_config_dict

    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(**hf_config_dict(cfg, torch.bfloat16))
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16,
                                                              attn_implementation="sdpa")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
               for _ in range(args.steps + args.warmup)]
    losses = []
    step = hf_lm_step(model, batches, params, opt, losses=losses)

    model.train()
    mem_reset()
    seconds = time_steps(step, args.warmup, args.steps)
    return seconds, peak_gib(), losses[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--n-layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile each lmforge block")
    ap.add_argument("--variants", default="lmforge,lmforge-packed,lmforge-packed-sdpa,transformers+peft")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import transformers

    from lmforge.models import preset_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = preset_config(args.preset, **({"n_layers": args.n_layers} if args.n_layers else {}))
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "preset": args.preset, "batch": args.batch, "seq": args.seq,
           "lora_r": args.rank, "activation_checkpointing": True, "dtype": "bf16"}
    rows = []
    for name in args.variants.split(","):
        if name == "transformers+peft":
            seconds, peak, loss = hf_peft_variant(args, cfg, device)
        else:
            seconds, peak, loss = lmforge_variant(args, cfg, device, packed=name.startswith("lmforge-packed"),
                                                  attention_backend="sdpa" if name.endswith("-sdpa") else "auto")
        tok_s = args.batch * args.seq / seconds
        rows.append({"variant": name, "tokens_per_s": round(tok_s), "step_s": round(seconds, 4),
                     "peak_mem_gib": round(peak, 2), "last_loss": round(loss, 4), **env})
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    ref = next((r for r in rows if r["variant"] == "transformers+peft"), None)
    print(f"\n{'variant':20} {'tokens/s':>10} {'peak GiB':>9} {'vs HF+peft':>11}")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        print(f"{r['variant']:20} {r['tokens_per_s']:>10} {r['peak_mem_gib']:>9} {ratio:>11}")


if __name__ == "__main__":
    main()
