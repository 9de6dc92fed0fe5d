"""What `lmforge info` reports: architecture, sizes, and bytes per dtype, from a checkpoint or a preset."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .config import ModelConfig
from .gguf import is_gguf
from .gguf import reader as gguf_reader

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "int4": 0.5}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def model_summary(cfg: ModelConfig, path: Path | None = None) -> dict:
    """A JSON-able summary: config, parameter counts, weight bytes per dtype, and the files on disk if any."""
    params = cfg.num_params()
    out = {
        "architecture": cfg.arch,
        "parameters": params,
        "parameters_without_embeddings": cfg.num_params(include_embeddings=False),
        "active_parameters_per_token": cfg.num_params(active=True),  # MoE: the top-k experts only
        "weight_bytes": {dt: int(params * b) for dt, b in BYTES_PER_PARAM.items()},
        "kv_cache_bytes_per_token_bf16": 2 * cfg.n_layers * cfg.kv_heads * cfg.dim_per_head * 2,
        "config": cfg.model_dump(exclude_defaults=False, mode="json"),
    }
    if path is not None and is_gguf(path):
        types = Counter(t.tensor_type.name for t in gguf_reader(path).tensors)
        out["checkpoint"] = {"path": str(path), "gguf_bytes": path.stat().st_size,
                             "gguf_tensor_types": dict(types.most_common()), "tokenizer": True}
    elif path is not None:
        files = sorted(path.glob("*.safetensors"))
        out["checkpoint"] = {"path": str(path), "safetensors_files": len(files),
                             "safetensors_bytes": sum(f.stat().st_size for f in files),
                             "tokenizer": (path / "tokenizer.json").is_file()}
        gen = path / "generation_config.json"
        if gen.is_file():
            out["generation_config"] = json.loads(gen.read_text())
    return out


def format_summary(s: dict) -> str:
    c = s["config"]
    attn = "MHA" if c["n_kv_heads"] in (None, c["n_heads"]) else "MQA" if c["n_kv_heads"] == 1 else "GQA"
    lines = [
        f"architecture   {s['architecture']}",
        f"parameters     {s['parameters']:,} ({s['parameters'] / 1e9:.3f} B; "
        f"{s['parameters_without_embeddings']:,} without embeddings)",
        f"layers         {c['n_layers']} × d_model {c['d_model']}, d_ff {c['d_ff']}, mlp {c['mlp']}/{c['act']}, "
        f"norm {c['norm']}" + (", parallel attention+MLP" if c["parallel_block"] else ""),
        f"attention      {attn}: {c['n_heads']} heads, {c['n_kv_heads'] or c['n_heads']} kv heads, "
        f"head_dim {c['head_dim'] or c['d_model'] // c['n_heads']}, positions {c['pos']}"
        + (f" (theta {c['rope_theta']:g}" + (f", {c['rope_scaling']['type']} ×{c['rope_scaling']['factor']:g}"
                                              if c["rope_scaling"] else "") + ")" if c["pos"] == "rope" else ""),
        *([f"experts        {c['moe_experts']} routed (top-{c['moe_top_k']}, d_ff {c['moe_d_ff'] or c['d_ff']})"
           + (f" + shared d_ff {c['moe_shared_d_ff']}" if c["moe_shared_d_ff"] else "")
           + f"; {s['active_parameters_per_token']:,} parameters active per token"] if c["mlp"] == "moe" else []),
        f"vocab          {c['vocab_size']:,}, tied embeddings: {c['tie_embeddings']}, max_seq_len {c['max_seq_len']:,}",
        "weights        " + ", ".join(f"{dt} {human_bytes(b)}" for dt, b in s["weight_bytes"].items()),
        f"kv cache       {human_bytes(s['kv_cache_bytes_per_token_bf16'])} per token (bf16)",
    ]
    if "checkpoint" in s:
        ck = s["checkpoint"]
        if "gguf_bytes" in ck:
            types = ", ".join(f"{n} {k}" for k, n in ck["gguf_tensor_types"].items())
            lines.append(f"checkpoint     {ck['path']}: GGUF, {human_bytes(ck['gguf_bytes'])}, tensors {types}, "
                         "tokenizer: yes")
            return "\n".join(lines)
        lines.append(f"checkpoint     {ck['path']}: {ck['safetensors_files']} safetensors file(s), "
                     f"{human_bytes(ck['safetensors_bytes'])}, tokenizer: {'yes' if ck['tokenizer'] else 'no'}")
    return "\n".join(lines)
