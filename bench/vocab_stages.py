"""The two training stages of a vocabulary expansion: step time and peak memory, lmforge vs transformers (+ peft).

Chinese-LLaMA's setting on a Llama-2-vocabulary model: TinyLlama-1.1B's shape (random weights), its 32,000-token
vocabulary grown to 49,953 (Chinese-LLaMA's merged size); batch B x seq T of random token ids (new ids included),
every token trained, bf16 autocast, frozen weights stored in bf16, trained ones in fp32, activation checkpointing on.

- stage 1, `trainable: embeddings` (transformer frozen; embedding + LM head train) and `new_embeddings` (only rows
  >= the old vocabulary get updates: a gradient mask hook), vs transformers with requires_grad only on
  embed_tokens / lm_head (what Chinese-LLaMA's scripts do);
- stage 2, LoRA r=16 on every linear + modules_to_save [embed, lm_head], vs peft's LoRA with the same
  modules_to_save;
- full fine-tuning for scale.

Prints one JSON line per variant, then a table (tokens/s and peak GiB relative to the matching transformers run).

    python bench/vocab_stages.py                                   # the GPU run (defaults)
    python bench/vocab_stages.py --n-layers 2 --batch 1 --seq 128 --steps 2 --warmup 1   # CPU smoke test
"""
from __future__ import annotations

import argparse
import json

import torch
from _common import hf_lm_step, mem_reset, peak_gib, time_steps  # noqa: E402 (run as a script)

REFERENCE = {"lmforge-embeddings": "transformers-embeddings", "lmforge-new-embeddings": "transformers-embeddings",
             "lmforge-lora+embed": "transformers+peft-lora+embed"}


def _batches(args, vocab: int, device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
            for _ in range(args.steps + args.warmup)]


def _embedding_names(cfg) -> list[str]:
    return ["embed"] if cfg.tie_embeddings else ["embed", "lm_head"]


def lmforge_variant(name: str, args, cfg, device) -> tuple[float, float, float, dict]:
    from lmforge.data import DataConfig
    from lmforge.models import Transformer
    from lmforge.peft.methods import build_method
    from lmforge.train import Trainer, TrainConfig
    from lmforge.train.config import ModelSection, TrainSection
    from lmforge.train.trainable import TrainableSection, restrict_trainable

    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    method_name = {"lmforge-lora+embed": "lora", "lmforge-full": "full"}.get(name, "full")
    options = dict(r=args.rank, alpha=2 * args.rank, target_modules="all-linear",
                   modules_to_save=_embedding_names(cfg)) if method_name == "lora" else {}
    method = build_method(method_name, **options)
    method.apply(model)
    trainable = {"lmforge-embeddings": "embeddings", "lmforge-new-embeddings": "new_embeddings"}.get(name, "all")
    rows = restrict_trainable(model, TrainableSection(params=trainable, new_token_start=args.old_vocab), method_name)
    if name != "lmforge-full":  # frozen weights in bf16, as run_training does under bf16 autocast
        keep = {id(p) for _, p in method.trainable_parameters(model)}
        for p in model.parameters():
            if id(p) not in keep:
                p.data = p.data.to(torch.bfloat16)
    old_rows = model.embed.weight[: args.old_vocab].detach().clone() if rows is not None else None
    data = [{"tokens": t.tolist(), "labels": t[1:].tolist() + [-100], "positions": list(range(args.seq))}
            for b in _batches(args, cfg.vocab_size, "cpu") for t in b]
    tcfg = TrainConfig(model=ModelSection(tokenizer="unused"), data=DataConfig(path="unused"),
                       train=TrainSection(precision="bf16", micro_batch_size=args.batch, max_steps=10**6,
                                          activation_checkpointing=True, progress=False, tensorboard=False))
    trainer = Trainer(model, method, data, None, tcfg, pad_id=0, device=device)
    if rows is not None:
        rows.attach(trainer.optimizer)
    trainer.sampler.take = lambda n, it=iter(range(len(data))): [next(it) for _ in range(n)]  # in order
    mem_reset()
    losses = []
    seconds = time_steps(lambda: losses.append(trainer.train_step()["loss"]), args.warmup, args.steps)
    extra = {"trainable_params": sum(p.numel() for _, p in trainer.params)}
    if old_rows is not None:
        extra["old_rows_unchanged"] = bool(torch.equal(model.embed.weight[: args.old_vocab], old_rows))
    return seconds, peak_gib(), losses[-1], extra


def hf_variant(name: str, args, cfg, device) -> tuple[float, float, float, dict]:
    import transformers

    from lmforge.models.hf import hf_config_dict

    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(**hf_config_dict(cfg, torch.bfloat16))
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if name == "transformers+peft-lora+embed":
        import peft

        hf_names = ["embed_tokens"] if cfg.tie_embeddings else ["embed_tokens", "lm_head"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                           target_modules="all-linear", modules_to_save=hf_names,
                                                           task_type="CAUSAL_LM"))
    else:  # stage 1: freeze all but the embedding and the output layer
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
        model.get_output_embeddings().weight.requires_grad_(True)
    for p in model.parameters():  # frozen in bf16, trained in fp32 (as the lmforge runs)
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" or None)
    losses = []
    step = hf_lm_step(model, _batches(args, cfg.vocab_size, device), params, opt, losses=losses)

    model.train()
    mem_reset()
    seconds = time_steps(step, args.warmup, args.steps)
    return seconds, peak_gib(), losses[-1], {"trainable_params": sum(p.numel() for p in params)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tinyllama-1.1b")
    ap.add_argument("--vocab", type=int, default=49953, help="the expanded vocabulary (Chinese-LLaMA: 49,953)")
    ap.add_argument("--n-layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default="lmforge-embeddings,lmforge-new-embeddings,transformers-embeddings,"
                                          "lmforge-lora+embed,transformers+peft-lora+embed,lmforge-full")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import transformers

    from lmforge.models import preset_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = preset_config(args.preset, **({"n_layers": args.n_layers} if args.n_layers else {}))
    args.old_vocab = base.vocab_size
    cfg = base.model_copy(update={"vocab_size": args.vocab})
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "preset": args.preset, "n_layers": cfg.n_layers,
           "vocab": f"{args.old_vocab}->{args.vocab}", "batch": args.batch, "seq": args.seq, "dtype": "bf16",
           "activation_checkpointing": True}
    rows = []
    for name in args.variants.split(","):
        run = hf_variant if name.startswith("transformers") else lmforge_variant
        try:
            seconds, peak, loss, extra = run(name, args, cfg, device)
        except torch.OutOfMemoryError:
            rows.append({"variant": name, "error": "out of memory", **env})
            print(json.dumps(rows[-1]), flush=True)
            continue
        rows.append({"variant": name, "tokens_per_s": round(args.batch * args.seq / seconds),
                     "step_s": round(seconds, 4), "peak_mem_gib": round(peak, 2), "last_loss": round(loss, 4),
                     **extra, **env})
        print(json.dumps(rows[-1]), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    by_name = {r["variant"]: r for r in rows if "error" not in r}
    print(f"\n{'variant':30} {'tokens/s':>10} {'peak GiB':>9} {'trainable':>14} {'speed vs ref':>13} "
          f"{'mem vs ref':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:30} {r['error']}")
            continue
        ref = by_name.get(REFERENCE.get(r["variant"], ""))
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        mem = f"{r['peak_mem_gib'] / ref['peak_mem_gib']:.2f}x" if ref and ref["peak_mem_gib"] == ref["peak_mem_gib"] \
            else "-"
        print(f"{r['variant']:30} {r['tokens_per_s']:>10} {r['peak_mem_gib']:>9} {r['trainable_params']:>14,} "
              f"{speed:>13} {mem:>11}")


if __name__ == "__main__":
    main()
