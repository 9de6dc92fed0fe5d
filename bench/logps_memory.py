"""Peak memory of the per-token log-probs and entropies every alignment stage computes (GRPO's largest temporary):
lmforge's chunked `token_logps` against one whole-vocabulary `log_softmax` (what a 4,096-token chunk amounted to
before), forward and backward, each variant in its own process (peak RSS on the CPU, or peak CUDA memory).

    python bench/logps_memory.py --tokens 2048 --d-model 256 --vocab 128256 --out logps_memory.jsonl
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def full_log_softmax(head, hidden, labels, temperature: float, with_entropy: bool = True):
    logp = torch.log_softmax(head(hidden).float() / temperature, dim=-1)  # (B, T, V) fp32, as one piece
    chosen = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return chosen, -(logp.exp() * logp).sum(-1)


def one(args) -> dict:
    from lmforge.align.common import token_logps

    dev = torch.device(args.device)
    torch.manual_seed(0)
    head = torch.nn.Linear(args.d_model, args.vocab, bias=False, device=dev)
    hidden = torch.randn(4, args.tokens // 4, args.d_model, device=dev, requires_grad=True)
    labels = torch.randint(0, args.vocab, (4, args.tokens // 4), device=dev)
    fn = token_logps if args.variant == "lmforge" else full_log_softmax
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    logp, ent = fn(head, hidden, labels, 0.9, with_entropy=True)
    (logp.sum() + ent.sum()).backward()
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": args.variant, "peak_gib_above_inputs": (peak - base) / 2**30,
            "seconds": time.perf_counter() - t, "logp_sum": float(logp.detach().sum()),
            "grad_abs_sum": float(hidden.grad.abs().sum()), "tokens": args.tokens, "vocab": args.vocab,
            "d_model": args.d_model, "device": args.device, "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # the child process's one variant
    ap.add_argument("--out", default="logps_memory.jsonl")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(one(args)))
        return
    rows = []
    for variant in ("full-log-softmax", "lmforge"):
        cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
