"""Perplexity / size / speed table of lmforge's quantization methods on a small model trained in the same run.

Trains a byte-level BPE tokenizer and a quickstart-shaped Llama (d_model 128, 4 layers, d_ff 256) on the first 90% of
tinyshakespeare (or, without it, on the quickstart's generated text), then evaluates the full-precision reference and
every method on the held-out 10%: fp32, bf16, INT8 (per channel), LLM.int8() (W8A8 + outliers), INT4 RTN, AWQ, GPTQ
(INT4, group 128), NF4. Per variant: safetensors size on disk, bytes per quantized weight, held-out perplexity, and
batch-1 greedy decode speed -- in fp32 through the dequantize-and-matmul reference path, and in bf16 with PyTorch's
fused INT8/INT4 kernels where they apply -- as tokens per wall-clock second and per CPU-second (the table shows the
latter, which a busy shared machine does not distort). Prints one JSON line per variant, then a markdown table.

    python bench/quant_ppl.py                      # trains 300 steps of 8 x 128 tokens (minutes on 2 CPU cores)
    python bench/quant_ppl.py --steps 20 --n-layers 2 --eval-tokens 4096   # smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
import time
from pathlib import Path

import torch

SHAKESPEARE = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "text" / "tinyshakespeare.txt").resolve()


def split_text(src: Path | None, work: Path) -> tuple[Path, Path, str]:
    """train.txt / val.txt (last 10%, cut at a blank line) from tinyshakespeare, else the quickstart text."""
    if src is not None and src.is_file():
        text, name = src.read_text(encoding="utf-8"), src.name
    else:
        from lmforge.quickstart import QuickstartConfig, make_data

        text, name = make_data(work / "qs", QuickstartConfig())["pretrain"].read_text(), "quickstart copy task"
    cut = text.find("\n\n", int(len(text) * 0.9))
    cut = cut if cut > 0 else int(len(text) * 0.9)
    (work / "train.txt").write_text(text[:cut])
    (work / "val.txt").write_text(text[cut:].lstrip("\n"))
    return work / "train.txt", work / "val.txt", name


def train_model(args, work: Path, train_file: Path) -> Path:
    from lmforge.data import DataConfig
    from lmforge.tokenizer import save_pretrained_tokenizer, train_bpe
    from lmforge.train.config import ModelSection, OptimSection, ScheduleSection, TrainConfig, TrainSection
    from lmforge.train.run import run_training

    tok_dir = work / "tokenizer"
    tok = train_bpe([train_file.read_text()], vocab_size=args.vocab)
    save_pretrained_tokenizer(tok, tok_dir, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    cfg = TrainConfig(
        stage="pretrain", method="full",
        model=ModelSection(tokenizer=str(tok_dir), config=dict(
            d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, d_ff=args.d_ff,
            max_seq_len=args.seq_len)),
        data=DataConfig(path=str(train_file), format="text", text_mode="blocks", max_seq_len=args.seq_len,
                        packing=True),
        optim=OptimSection(lr=args.lr, weight_decay=0.01), schedule=ScheduleSection(warmup_steps=args.steps // 10),
        train=TrainSection(output_dir=str(work / "train"), max_steps=args.steps, micro_batch_size=args.batch,
                           save_every=0, device=args.device, precision="fp32" if args.device == "cpu" else "auto",
                           tensorboard=False, progress=False, log_every=10),
    )
    return Path(run_training(cfg)["output"])


@torch.no_grad()
def score(model, ids: torch.Tensor, seq_len: int, batch: int, reference: list[torch.Tensor] | None = None):
    """Held-out perplexity over non-overlapping windows of seq_len + 1 tokens of `ids`, the per-batch log-probs (to
    serve as the reference), and against `reference` log-probs: mean KL(reference || model) per token and top-1
    agreement -- the quantization error itself, which the perplexity of a small model can hide in its noise."""
    n = (len(ids) - 1) // seq_len
    windows = torch.stack([ids[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])  # (n, T+1)
    device = model.embed.weight.device
    nll, kl, agree, count, logprobs = 0.0, 0.0, 0, 0, []
    for i, b in enumerate(windows.split(batch)):
        b = b.to(device)
        lp = torch.log_softmax(model(b[:, :-1]).float(), dim=-1)  # (B, T, vocab)
        nll -= lp.gather(-1, b[:, 1:, None]).sum().item()
        count += b[:, 1:].numel()
        logprobs.append(lp.cpu())
        if reference is not None:
            ref = reference[i].to(device)
            kl += (ref.exp() * (ref - lp)).sum().item()
            agree += (ref.argmax(-1) == lp.argmax(-1)).sum().item()
    return math.exp(nll / count), logprobs, kl / count, agree / count


def decode_speed(model, prompt: list[int], new_tokens: int, repeats: int = 5) -> tuple[float, float]:
    """Greedy batch-1 decode: (tokens per wall-clock second, tokens per CPU-second of this process), each the best
    of `repeats` runs after a warm-up, on one thread. On a shared machine the CPU-time figure is the comparable one: it counts only
    the time this process ran, not the time it waited for the cores."""
    from lmforge.infer import SamplingParams, generate

    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 decode of a small model: one thread, no spinning workers billed as CPU time
    try:
        generate(model, [prompt], params)  # warm-up
        wall = cpu = float("inf")
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            generate(model, [prompt], params)
            wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    finally:
        torch.set_num_threads(threads)
    return new_tokens / wall, new_tokens / cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=str(SHAKESPEARE), help="training/evaluation text (90/10 split)")
    ap.add_argument("--work", default="runs/quant_ppl", help="where data, model and quantized checkpoints go")
    ap.add_argument("--retrain", action="store_true", help="train again even if WORK has a model")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens scored (at most)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    args = ap.parse_args()

    from lmforge.models import load_hf, save_hf
    from lmforge.quant import (calibration_tokens, prepare_fast_path, quantize_model, quantized_linears,
                               save_quantized)
    from lmforge.tokenizer import Tokenizer

    torch.manual_seed(0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_file, val_file, source = split_text(Path(args.text) if args.text else None, work)
    ckpt = work / "train" / "final"
    t0 = time.perf_counter()
    if args.retrain or not (ckpt / "config.json").is_file():
        ckpt = train_model(args, work, train_file)
    train_s = time.perf_counter() - t0
    tok = Tokenizer.from_dir(ckpt)
    val_ids = torch.tensor(tok.encode(val_file.read_text()))[: args.eval_tokens + 1]
    calib = calibration_tokens(train_file, tok, args.calib_samples, args.seq_len)
    prompt = tok.encode(val_file.read_text()[:200])[:32]
    g = args.group_size
    variants = {
        "fp32": None, "bf16": None,
        "int8": dict(method="int8"), "llm.int8 (W8A8+outliers)": dict(method="int8", llm_int8=True),
        f"int4 RTN g{g}": dict(method="int4", group_size=g),
        f"AWQ int4 g{g}": dict(method="awq", group_size=g, calib=calib),
        f"GPTQ int4 g{g}": dict(method="gptq", group_size=g, calib=calib),
        f"GPTQ int4 g{g} act-order": dict(method="gptq", group_size=g, calib=calib, act_order=True),
        "NF4 (block 64, double quant)": dict(method="nf4"),
    }
    base = load_hf(ckpt, dtype="float32", device=args.device, progress=False)
    env = {"source": source, "device": args.device, "torch": torch.__version__, "params": sum(
        p.numel() for p in base.parameters()), "d_model": args.d_model, "n_layers": args.n_layers,
        "steps": args.steps, "train_s": round(train_s, 1), "eval_tokens": len(val_ids) - 1}
    rows, reference = [], None
    for name, spec in variants.items():
        out = work / "variants" / re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")
        t1 = time.perf_counter()
        if spec is None:
            model = copy.deepcopy(base).to(torch.float32 if name == "fp32" else torch.bfloat16)
            save_hf(model, out)
            linear_bytes = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
                               if isinstance(m, torch.nn.Linear) and n != "lm_head")
        else:
            model = quantize_model(copy.deepcopy(base), **spec)
            save_quantized(model, out)
            linear_bytes = sum(m.nbytes for m in quantized_linears(model).values())
        quant_s = time.perf_counter() - t1
        n_linear = sum(m.in_features * m.out_features for n, m in model.named_modules()
                       if hasattr(m, "in_features") and n.startswith("layers."))
        row = {"variant": name, "file_mb": round((out / "model.safetensors").stat().st_size / 1e6, 2),
               "linear_mb": round(linear_bytes / 1e6, 2), "bytes_per_linear_weight": round(linear_bytes / n_linear, 3),
               "ppl": None, "kl_vs_fp32": None, "top1_agree_vs_fp32": None}
        wall, cpu = decode_speed(model, prompt, args.decode_tokens)
        row.update(decode_tok_s=round(wall, 1), decode_tok_per_cpu_s=round(cpu, 1))
        ppl, logprobs, kl, agree = score(model, val_ids, args.seq_len, 8, reference)
        if reference is None:
            reference = logprobs
        row.update(ppl=round(ppl, 3), kl_vs_fp32=round(kl, 6), top1_agree_vs_fp32=round(agree, 4))
        # the same model computing in bf16, with PyTorch's fused INT8/INT4 kernels where they apply
        model = model.to(torch.bfloat16)
        kernels = prepare_fast_path(model, torch.bfloat16)
        wall, cpu = decode_speed(model, prompt, args.decode_tokens)
        row.update(decode_bf16_tok_s=round(wall, 1), decode_bf16_tok_per_cpu_s=round(cpu, 1), bf16_kernels=kernels,
                   quantize_s=round(quant_s, 1), **env)
        rows.append(row)
        print(json.dumps(row), flush=True)

    ref = rows[0]["ppl"]
    lines = ["| variant | file (MB) | block linears (MB) | bytes / weight | held-out ppl | Δ ppl vs fp32 | "
             "KL vs fp32 (nats/token) | top-1 = fp32 | decode tok / CPU-s, fp32 | decode tok / CPU-s, bf16 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows[0].update(kl_vs_fp32=0.0, top1_agree_vs_fp32=1.0)  # the reference itself
    for r in rows:
        fused = " (fused kernel)" if any(k.startswith("aten") for k in r["bf16_kernels"]) else ""
        lines.append(f"| {r['variant']} | {r['file_mb']} | {r['linear_mb']} | {r['bytes_per_linear_weight']} | "
                     f"{r['ppl']} | {r['ppl'] - ref:+.3f} | {r['kl_vs_fp32']:.2e} | {r['top1_agree_vs_fp32']:.2%} | "
                     f"{r['decode_tok_per_cpu_s']} | {r['decode_bf16_tok_per_cpu_s']}{fused} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
