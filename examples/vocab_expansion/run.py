"""Vocabulary expansion and continued pretraining on the quickstart model, as Chinese-LLaMA-Alpaca did, on a CPU.

1. the quickstart model: a byte-level BPE (336 ids) learned from generated English-letter data, and a small
   Llama-style model pretrained on it (it has never seen Chinese: every CJK character costs ~3 byte tokens);
2. a Chinese BPE learned from the training part of a Chinese sample (BELLE's seed tasks in `../shared/data/zh/`,
   plus LLaMA-Factory's alpaca_zh_demo.json when present), merged into the base tokenizer (`lmforge tokenizer
   merge`: every old id kept) -> tokens per character before/after on held-out Chinese (the Li Bai article and
   held-out seed tasks, which neither the tokenizer nor the model sees);
3. the model resized for the merged vocabulary with both new-row inits (mean, sub-token mean) -> held-out loss of
   each, right after the resize;
4. stage 1: `trainable: embeddings` (the transformer frozen), on a mix of Chinese and the quickstart text
   (`data.mix`, domain:general = 1:5 by default);
5. stage 2: LoRA on every linear + `modules_to_save: [embed, lm_head]`, same mix;
6. a control without expansion: the same two stages on the original tokenizer.

Held-out loss is reported in nats per *character* (tokenizations differ, characters do not) on held-out Chinese and
on held-out quickstart text (forgetting check), plus nats per token. Everything each stage used is in its output
directory (config.yaml: `lmforge train runs/vocab_expansion/stage2/config.yaml` reruns it).

    python examples/vocab_expansion/run.py                      # a few minutes on 2 CPU cores
    python examples/vocab_expansion/run.py --stage1-steps 20 --stage2-steps 20 --pretrain-steps 50   # smoke test
    python examples/vocab_expansion/run.py --general-weight 0 --no-control --out runs/vx_zh   # no mixing: forgetting
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from lmforge.data import DataConfig
from lmforge.data.mixing import MixSource
from lmforge.eval.model import LocalModel
from lmforge.models import load_hf
from lmforge.tokenizer.expand import expand_checkpoint
from lmforge.peft.lora import LoraConfig
from lmforge.quickstart import QuickstartConfig, make_data, make_tokenizer
from lmforge.tokenizer import Tokenizer, save_pretrained_tokenizer
from lmforge.tokenizer.merge import merge_tokenizer_dirs, tokens_per_char
from lmforge.tokenizer.train_cli import train_tokenizer
from lmforge.train.config import ModelSection, OptimSection, ScheduleSection, TrainConfig, TrainSection
from lmforge.train.run import run_training
from lmforge.train.trainable import TrainableSection

ROOT = Path(__file__).resolve().parents[2]
SEQ = 128


def chinese_data(zh_dir: Path, out: Path, extra: Path | None = None, every: int = 8) -> dict[str, Path]:
    """BELLE seed tasks as documents (instruction, input, output): every `every`-th held out, with the Li Bai
    article (held out entirely: neither the tokenizer nor the model sees it). `extra`: more Chinese training
    documents (an alpaca-format .json, e.g. LLaMA-Factory's alpaca_zh_demo.json)."""
    tasks = [json.loads(line) for line in (zh_dir / "belle_zh_seed_tasks.jsonl").read_text().splitlines()]
    docs = ["\n".join(x for x in (t["instruction"], i["input"], i["output"]) if x) for t in tasks
            for i in t["instances"]]
    train = [d for k, d in enumerate(docs) if k % every]
    held = [d for k, d in enumerate(docs) if not k % every] + [(zh_dir / "libai_doc.txt").read_text().strip()]
    if extra is not None:
        train += ["\n".join(x for x in (r["instruction"], r["input"], r["output"]) if x)
                  for r in json.loads(extra.read_text())]
    out.mkdir(parents=True, exist_ok=True)
    files = {"zh_train": out / "zh_train.txt", "zh_heldout": out / "zh_heldout.jsonl"}
    files["zh_train"].write_text("\n\n".join(d.replace("\n\n", "\n") for d in train) + "\n")
    files["zh_heldout"].write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in held))
    return files


def general_heldout(out: Path, n: int = 300) -> Path:
    """Fresh quickstart-style pretraining lines (another seed): what the model must not forget."""
    rng = random.Random(12345)
    lines = []
    for _ in range(n):
        s = " ".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        lines.append(f"copy: {s} => {s}")
    path = out / "general_heldout.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def heldout_loss(model, tokenizer: Tokenizer, docs: list[str]) -> dict:
    """NLL of held-out documents, each laid out as training saw it (bos + text, from position 0; sliding windows of
    SEQ tokens inside long ones): nats per character (comparable across tokenizers) and per token."""
    scorer = LocalModel(model, tokenizer, batch_size=16)
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    nll = tokens = chars = 0
    for doc in docs:
        ids = bos + tokenizer.encode(doc, add_special_tokens=False)
        loss, n = scorer.rolling_nll(ids, window=SEQ, stride=SEQ // 2)
        nll, tokens, chars = nll + loss, tokens + n, chars + len(doc)
    return {"nats_per_char": nll / chars, "nats_per_token": nll / tokens}


def evaluate(name: str, model, tokenizer: Tokenizer, docs: dict[str, list[str]], table: list) -> dict:
    row = {"model": name, **{f"{k}_{m}": v for k, d in docs.items()
                             for m, v in heldout_loss(model, tokenizer, d).items()}}
    table.append(row)
    print(f"  {name:34} zh {row['zh_nats_per_char']:.3f} nats/char ({row['zh_nats_per_token']:.3f}/token)   "
          f"general {row['general_nats_per_char']:.3f} nats/char", flush=True)
    return row


def stage(name: str, model_dir: Path, out: Path, files: dict, args, method: str, trainable: str, steps: int,
          lr: float, lora: LoraConfig | None = None) -> dict:
    sources = [MixSource(path=str(files["zh_train"]), weight=args.zh_weight, text_mode="blocks")]
    if args.general_weight > 0:  # 0: Chinese only (shows the forgetting that mixing prevents)
        sources.append(MixSource(path=str(files["pretrain"]), weight=args.general_weight, text_mode="lines"))
    data = DataConfig(mix=sources, format="text", max_seq_len=SEQ, packing=True)
    cfg = TrainConfig(stage="pretrain", method=method, model=ModelSection(path=str(model_dir)), data=data,
                      trainable=TrainableSection(params=trainable), lora=lora or LoraConfig(),
                      optim=OptimSection(lr=lr), schedule=ScheduleSection(warmup_steps=10),
                      train=TrainSection(output_dir=str(out / name), max_steps=steps, micro_batch_size=args.batch,
                                         device=args.device, precision="fp32", progress=False, tensorboard=False,
                                         seed=args.seed))
    print(f"[vocab] {name}: method {method}, trainable {trainable}, {steps} steps", flush=True)
    return run_training(cfg)


def pretrain_quickstart_model(tokenizer_dir: Path, text: Path, out: Path, args) -> Path:
    """The quickstart's base model: a small Llama-style model pretrained on the generated "copy" lines."""
    cfg = TrainConfig(
        stage="pretrain", method="full",
        model=ModelSection(tokenizer=str(tokenizer_dir), config=dict(d_model=128, n_layers=4, n_heads=4, d_ff=256,
                                                                     max_seq_len=SEQ)),
        data=DataConfig(path=str(text), format="text", text_mode="lines", max_seq_len=SEQ, packing=True),
        optim=OptimSection(lr=3e-3, weight_decay=0.01), schedule=ScheduleSection(warmup_steps=20),
        train=TrainSection(output_dir=str(out / "pretrain"), max_steps=args.pretrain_steps, micro_batch_size=32,
                           device=args.device, precision="fp32", progress=False, tensorboard=False, seed=args.seed))
    return Path(run_training(cfg)["output"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/vocab_expansion")
    ap.add_argument("--zh-dir", default=str(ROOT.parent / "shared" / "data" / "zh"))
    ap.add_argument("--extra-zh", default=str(ROOT.parent / "shared" / "data" / "llamafactory" / "alpaca_zh_demo.json"),
                    help="more Chinese training text (alpaca-format .json); '' for none")
    ap.add_argument("--base", default=None, help="reuse a quickstart model pretrained by an earlier run")
    ap.add_argument("--zh-vocab", type=int, default=3000, help="size of the Chinese BPE learned before merging")
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--stage1-steps", type=int, default=150)
    ap.add_argument("--stage2-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--zh-weight", type=float, default=1.0)
    ap.add_argument("--general-weight", type=float, default=5.0)
    ap.add_argument("--no-control", action="store_true", help="skip the run without vocabulary expansion")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = Path(args.out)
    zh_dir = Path(args.zh_dir)
    if not (zh_dir / "belle_zh_seed_tasks.jsonl").is_file():
        raise SystemExit(f"no Chinese sample in {zh_dir}; pass --zh-dir (a folder with belle_zh_seed_tasks.jsonl "
                         "and libai_doc.txt)")

    # 1. the quickstart model
    files = make_data(out / "data", QuickstartConfig(seed=args.seed))
    extra = Path(args.extra_zh) if args.extra_zh and Path(args.extra_zh).is_file() else None
    files.update(chinese_data(zh_dir, out / "data", extra))
    files["general_heldout"] = general_heldout(out / "data")
    base_tok = make_tokenizer(out / "tokenizer", files)
    texts = {"zh": [json.loads(line)["text"] for line in files["zh_heldout"].read_text().splitlines()],
             "general": files["general_heldout"].read_text().splitlines()}
    if args.base is None:
        print(f"[vocab] pretraining the quickstart model ({args.pretrain_steps} steps)", flush=True)
    base_dir = Path(args.base) if args.base else pretrain_quickstart_model(base_tok, files["pretrain"], out, args)

    # 2. tokenizer: learn Chinese pieces, merge
    zh_texts = files["zh_train"].read_text().split("\n\n")
    save_pretrained_tokenizer(train_tokenizer(zh_texts, args.zh_vocab, "bpe"), out / "zh_tokenizer")
    report = merge_tokenizer_dirs(base_dir, out / "zh_tokenizer", out / "merged_tokenizer",
                                  sample_text="\n".join(texts["zh"]))
    print(f"[vocab] {report.summary()}", flush=True)
    general = "\n".join(texts["general"])
    general_tpc = (tokens_per_char(Tokenizer.from_dir(base_dir), general),
                   tokens_per_char(Tokenizer.from_dir(out / "merged_tokenizer"), general))

    # 3. resize with both inits; held-out loss right away
    table: list[dict] = []
    print("[vocab] held-out loss", flush=True)
    evaluate("base (original tokenizer)", load_hf(base_dir, progress=False), Tokenizer.from_dir(base_dir), texts, table)
    start = {}
    for init in ("mean", "subtoken"):
        expand_checkpoint(base_dir, out / "merged_tokenizer", out / f"expanded-{init}", init=init)
        start[init] = evaluate(f"resized, {init} init", load_hf(out / f"expanded-{init}", progress=False),
                               Tokenizer.from_dir(out / f"expanded-{init}"), texts, table)
    init = min(start, key=lambda k: start[k]["zh_nats_per_char"])
    print(f"[vocab] {init} init starts lower; stages 1-2 continue from it", flush=True)

    # 4-5. stage 1 (embeddings only) and stage 2 (LoRA + embeddings) on the expanded model
    lora = LoraConfig(r=16, alpha=32, target_modules="all-linear", modules_to_save=["embed", "lm_head"])
    s1 = stage("stage1", out / f"expanded-{init}", out, files, args, "full", "embeddings", args.stage1_steps, 3e-3)
    evaluate("expanded, after stage 1", s1["model"], s1["tokenizer"], texts, table)
    s2 = stage("stage2", Path(s1["output"]), out, files, args, "lora", "all", args.stage2_steps, 2e-3, lora)
    evaluate("expanded, after stage 2", s2["model"], s2["tokenizer"], texts, table)

    # 6. control: the same recipe without expansion
    if not args.no_control:
        c1 = stage("control-stage1", base_dir, out, files, args, "full", "embeddings", args.stage1_steps, 3e-3)
        evaluate("original vocab, after stage 1", c1["model"], c1["tokenizer"], texts, table)
        c2 = stage("control-stage2", Path(c1["output"]), out, files, args, "lora", "all", args.stage2_steps, 2e-3,
                   lora)
        evaluate("original vocab, after stage 2", c2["model"], c2["tokenizer"], texts, table)

    summary = {"tokens_per_char_zh": [report.tokens_per_char_before, report.tokens_per_char_after],
               "tokens_per_char_general": list(general_tpc), "merge": report.to_dict(), "init_chosen": init,
               "loss": table, "minutes": (time.perf_counter() - t0) / 60, "args": vars(args)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    zh_before, zh_after = summary["tokens_per_char_zh"]
    print(f"\n[vocab] tokens per character on held-out Chinese: {zh_before:.3f} -> {zh_after:.3f} "
          f"({zh_after / zh_before:.2f}x); on held-out quickstart text: {general_tpc[0]:.3f} -> {general_tpc[1]:.3f}")
    print(f"{'model':36} {'zh nats/char':>12} {'zh nats/tok':>12} {'general nats/char':>18}")
    for r in table:
        print(f"{r['model']:36} {r['zh_nats_per_char']:12.3f} {r['zh_nats_per_token']:12.3f} "
              f"{r['general_nats_per_char']:18.4f}")
    print(f"[vocab] {summary['minutes']:.1f} min; summary in {out / 'summary.json'}")


if __name__ == "__main__":
    main()
