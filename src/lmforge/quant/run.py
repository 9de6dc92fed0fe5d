"""`lmforge quantize MODEL --method ... --out DIR`: load an HF checkpoint, quantize it, save it (and/or a GGUF file)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..atomic import atomic_dir, check_replaceable
from ..config import Section
from ..errors import ConfigError
from ..hub import is_hub_id, resolve_model
from ..runtime import pick_device
from .formats import FORMAT_METHODS

__all__ = ["QuantizeConfig", "run_quantize"]


class QuantizeConfig(Section):
    model: str
    """HF checkpoint directory (config.json + safetensors), .gguf file or Hugging Face id to quantize."""
    method: Literal["int8", "int4", "rtn", "nf4", "awq", "gptq", "bitnet", "none"] = "int4"
    """int8 (per channel), int4/rtn (group-wise round-to-nearest), nf4, awq and gptq (INT4 with calibration),
    bitnet (ternary, for models trained with BitLinear), none (only write the GGUF file)."""
    out: str | None = None
    """Output directory; default: MODEL-METHOD next to the model."""
    format: Literal["lmforge", "gptq", "awq"] = "lmforge"
    """Checkpoint layout: lmforge (every method), or gptq (int4, rtn, awq, gptq; int8 as 8-bit per channel) / awq
    (the INT4 methods) as transformers and vLLM load them (int32-packed qweight/qzeros, scales; g_idx for gptq)."""
    group_size: int = Field(128, ge=2)
    """INT4 group size (input columns per scale and zero point): 32, 64 or 128."""
    targets: list[str] | str = "all-linear"
    """Linears to quantize (names as in LoRA target_modules); 'all-linear' = every linear except lm_head."""
    lm_head: Literal["keep", "int8", "int4", "nf4"] = "keep"
    """The output head: keep (full precision, as AWQ/GPTQ checkpoints), or quantize it by round-to-nearest too
    (int8 per channel; int4 in group_size groups; nf4). Decode reads the head every token (0.5-1 GB for a 128K
    vocabulary), so int8 here makes an INT4/NF4 model's decode faster; a tied head is untied first (the embedding
    stays full precision). Format lmforge only."""
    calib: str | None = None
    """Calibration text (a local .txt, or .jsonl with a 'text' field) for awq/gptq."""
    calib_samples: int = Field(128, ge=1)
    """Calibration windows drawn from the file."""
    calib_seq_len: int = Field(512, ge=8)
    """Tokens per calibration window."""
    act_order: bool = False
    """GPTQ: quantize columns in order of decreasing activation energy."""
    llm_int8: bool = False
    """int8: LLM.int8() -- INT8 activations too, with input columns beyond outlier_threshold kept in 16-bit."""
    outlier_threshold: float = Field(6.0, gt=0)
    """LLM.int8() outlier threshold on |x|."""
    gguf: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m",
                  "q6_k"] | None = None
    """Also write OUT/model.gguf for llama.cpp in this type (from the quantized model's dequantized weights)."""
    device: str = "auto"
    """Where calibration runs: auto (CUDA if visible), cpu, cuda."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Compute dtype of the loaded model (default: the checkpoint's)."""


def run_quantize(cfg: QuantizeConfig) -> dict:
    """Quantize cfg.model as configured; returns paths and sizes (and prints a one-line summary)."""
    from ..checkpoint import save_tokenizer_files
    from ..models.hf import load_hf
    from .gguf_export import export_gguf
    from .formats import save_format
    from .model import quantize_model, quantized_size

    src = resolve_model(cfg.model)  # a directory, a .gguf file or a Hugging Face id
    hub_id = is_hub_id(cfg.model)
    name = cfg.model.rsplit("/", 1)[-1] if hub_id else src.name
    default = Path(f"{name}-{cfg.method}") if hub_id else src.with_name(f"{name}-{cfg.method}")
    out = Path(cfg.out) if cfg.out else default  # for an id: here, never inside the Hugging Face cache
    if cfg.method == "none" and cfg.gguf is None:
        raise ConfigError("method 'none' writes only a GGUF file: also set gguf (f16, q8_0, q4_0, ...)")
    if cfg.method not in FORMAT_METHODS[cfg.format] + ("none",) or (cfg.format != "lmforge" and cfg.llm_int8):
        what = "llm_int8" if cfg.method in FORMAT_METHODS[cfg.format] else f"method '{cfg.method}'"
        raise ConfigError(f"format {cfg.format} stores weight-only integer weights: use method "
                          f"{', '.join(FORMAT_METHODS[cfg.format])} ({what} is saved with format lmforge)")
    if cfg.lm_head != "keep" and (cfg.format != "lmforge" or cfg.method == "none"):
        raise ConfigError(f"lm_head={cfg.lm_head} needs format lmforge and a method ("
                          + (f"format {cfg.format} keeps lm_head in full precision" if cfg.format != "lmforge"
                             else "method none writes only a GGUF file") + "): set lm_head=keep")
    if cfg.method in ("awq", "gptq") and cfg.calib is None:
        raise ConfigError(f"method '{cfg.method}' needs calibration text: set calib=PATH (a local .txt file)")
    device = pick_device(cfg.device)
    check_replaceable(out)  # before the slow part: out must be new, empty, or an earlier output
    t0 = time.perf_counter()
    model = load_hf(src, dtype=cfg.dtype, device=device, progress=False)
    before = quantized_size(model)["total_bytes"]
    tokenizer = None
    if cfg.calib is not None:
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(src)
    result = {"model": str(src), "method": cfg.method, "bytes_before": before}
    if cfg.method != "none":
        quantize_model(model, cfg.method, targets=cfg.targets, group_size=cfg.group_size, calib_file=cfg.calib,
                       tokenizer=tokenizer, calib_samples=cfg.calib_samples, calib_seq_len=cfg.calib_seq_len,
                       act_order=cfg.act_order, llm_int8=cfg.llm_int8, outlier_threshold=cfg.outlier_threshold,
                       lm_head=cfg.lm_head)
    with atomic_dir(out, replace_only_models=True) as tmp:  # the whole directory appears at once, or not at all
        if cfg.method != "none":
            save_format(model, tmp, cfg.format)
            save_tokenizer_files(src, tmp)
        if cfg.gguf is not None:
            export_gguf(model, tmp / "model.gguf", tokenizer_dir=src, qtype=cfg.gguf, name=name)
    if cfg.method != "none":
        result.update(output=str(out), bytes_after=quantized_size(model)["total_bytes"],
                      file_bytes=(out / "model.safetensors").stat().st_size)
    if cfg.gguf is not None:
        result.update(gguf=str(out / "model.gguf"), gguf_bytes=(out / "model.gguf").stat().st_size)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    after = result.get("bytes_after")
    print(f"[quantize] {src} -> {out} ({cfg.method}): {before / 2**20:.1f} MiB"
          + (f" -> {after / 2**20:.1f} MiB" if after else "")
          + (f"; GGUF {cfg.gguf}: {result['gguf_bytes'] / 2**20:.1f} MiB" if cfg.gguf else "")
          + f" in {result['seconds']}s")
    return result
