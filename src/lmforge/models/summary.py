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
        "kv_cache_bytes_per_token_bf16": cfg.n_layers * cfg.cache_values_per_token * 2,
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


def _scaling(sc: dict | None) -> str:
    return "" if not sc else f", {sc['type']}" + (f" ×{sc['factor']:g}" if sc.get("factor") is not None else "")


def _variants(c: dict) -> list[str]:
    """The block's departures from a plain pre-norm Llama block, in words."""
    out = []
    if c["norm_placement"] != "pre":
        out.append(f"{c['norm_placement']} norms")
    if c["qk_norm"] != "none":
        out.append(f"qk-norm ({c['qk_norm']})")
    if c["attn_scale"] is not None:
        out.append(f"attention scale {c['attn_scale']:.4g}")
    if c["attn_logit_softcap"] is not None:
        out.append(f"attention soft-cap {c['attn_logit_softcap']:g}")
    if c["final_logit_softcap"] is not None:
        out.append(f"logit soft-cap {c['final_logit_softcap']:g}")
    if c["sliding_window"] is not None:
        layers = c["sliding_window_layers"]
        out.append(f"window {c['sliding_window']} on " + ("every layer" if layers is None else
                                                         f"{len(layers)} of {c['n_layers']} layers"))
    if c["nope_layers"]:
        out.append(f"no RoPE on {len(c['nope_layers'])} layers"
                   + (" (temperature-tuned)" if c["attn_temperature_tuning"] else ""))
    if c["attn_chunk"] is not None:
        layers = c["attn_chunk_layers"]
        out.append(f"chunked attention {c['attn_chunk']} on " + ("every layer" if layers is None else
                                                                f"{len(layers)} of {c['n_layers']} layers"))
    if c["attn_sinks"]:
        out.append("attention sinks")
    if c["glu_limit"] is not None:
        out.append(f"clamped SwiGLU (limit {c['glu_limit']:g})")
    return out


def format_summary(s: dict) -> str:
    c = s["config"]
    attn = "MHA" if c["n_kv_heads"] in (None, c["n_heads"]) else "MQA" if c["n_kv_heads"] == 1 else "GQA"
    heads = f"{c['n_kv_heads'] or c['n_heads']} kv heads, head_dim {c['head_dim'] or c['d_model'] // c['n_heads']}"
    if c["attention"] == "mla":
        attn, heads = "MLA", (f"kv latent {c['mla_kv_rank']}, q rank {c['mla_q_rank'] or 'full'}, q/k dims "
                              f"{c['mla_nope_dim']}+{c['mla_rope_dim']} (rope), v dims {c['mla_v_dim']}")
    lines = [
        f"architecture   {s['architecture']}",
        f"parameters     {s['parameters']:,} ({s['parameters'] / 1e9:.3f} B; "
        f"{s['parameters_without_embeddings']:,} without embeddings)",
        f"layers         {c['n_layers']} × d_model {c['d_model']}, d_ff {c['d_ff']}, mlp {c['mlp']}/{c['act']}, "
        f"norm {c['norm']}" + (", parallel attention+MLP" if c["parallel_block"] else ""),
        f"attention      {attn}: {c['n_heads']} heads, {heads}, positions {c['pos']}"
        + (f" (theta {c['rope_theta']:g}" + _scaling(c["rope_scaling"])
           + (f"; sliding-window layers theta {c['rope_local_theta']:g}" + _scaling(c["rope_local_scaling"])
              if c["rope_local_theta"] is not None else "") + ")" if c["pos"] == "rope" else ""),
        *([f"block          {', '.join(_variants(c))}"] if _variants(c) else []),
        *([f"experts        {c['moe_experts']} routed (top-{c['moe_top_k']}, d_ff {c['moe_d_ff'] or c['d_ff']})"
           + (f" + shared d_ff {c['moe_shared_d_ff']}" if c["moe_shared_d_ff"] else "")
           + f", {c['moe_router']} router" + (f" in {c['moe_groups']} groups (best {c['moe_topk_groups']})"
                                               if c["moe_groups"] > 1 else "")
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
