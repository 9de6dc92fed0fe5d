"""Load and save Hugging Face checkpoints (config.json + safetensors, sharded or not), no conversion step.

Loading builds the model on the `meta` device, allocates it once in the target dtype, then streams tensors shard by
shard into it, so a checkpoint never sits in memory twice. Saving shards at a size limit, writes
`model.safetensors.index.json` when there is more than one shard, and replaces files atomically.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..atomic import atomic_write as _atomic_write
from ..errors import CheckpointError
from .config import ModelConfig
from . import gguf
from .converters import architecture_of, converter_for, converter_of
from .gguf import is_gguf
from .transformer import LinearFactory, Transformer, default_linear

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or default
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_hf_config(path: str | Path) -> dict:
    """config.json of a checkpoint directory (or the file itself); for a .gguf file, the equivalent dict built
    from its metadata (see `lmforge.models.gguf`)."""
    path = Path(path)
    if is_gguf(path):
        return gguf.hf_config(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no config.json in '{path}': pass a Hugging Face checkpoint directory")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None


def config_from_hf(hf: Mapping | str | Path) -> ModelConfig:
    """A ModelConfig from an HF config dict or a checkpoint directory / config.json path."""
    hf = hf if isinstance(hf, Mapping) else read_hf_config(hf)
    return converter_of(hf).build_config(hf)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        found = ", ".join(p.name for p in path.glob("*.bin")) or "none"
        raise CheckpointError(f"no *.safetensors weights in '{path}' (found .bin: {found}); re-save them as safetensors")
    return files


def _safetensors_tensors(path: Path, device) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(file name, HF name, tensor) of every shard, opened one at a time."""
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for hf_name in f.keys():
                yield file.name, hf_name, f.get_tensor(hf_name)


def _separate_quant_config(path: Path) -> dict:
    """{"quantization_config": ...} from the file older AutoGPTQ (quantize_config.json) and AutoAWQ
    (quant_config.json) checkpoints keep beside a config.json that lacks it; {} when there is none."""
    for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        file = path / name
        if file.is_file():
            try:
                qc = json.loads(file.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
            return {"quantization_config": {"quant_method": method, **qc}}
    return {}


def load_hf(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    linear: LinearFactory = default_linear,
    progress: bool | None = None,
) -> Transformer:
    """Load an HF causal-LM checkpoint directory, or a llama.cpp .gguf file, into the native model (dtype defaults to
    the checkpoint's; a quantized GGUF dequantizes to float32). A quantized checkpoint (config.json
    ``quantization_config.quant_method`` lmforge, gptq or awq) keeps its quantized layers, with the device's fused
    kernels installed; `dtype` is then its compute dtype."""
    path = Path(path)
    hf = read_hf_config(path)
    if not hf.get("quantization_config") and not is_gguf(path):
        hf = {**hf, **_separate_quant_config(path)}
    quant_method = str((hf.get("quantization_config") or {}).get("quant_method", "")).lower()
    if quant_method in ("lmforge", "gptq", "awq") and not is_gguf(path):
        # a quantized checkpoint: its linears are the quantized layers it stores (lmforge.quant.formats)
        from ..quant.formats import load_quantized_checkpoint

        if linear is not default_linear:
            raise CheckpointError(f"'{path}' is a quantized checkpoint ({quant_method}): its linear layers are "
                                  "fixed by it, so a custom linear factory cannot be used")
        return load_quantized_checkpoint(path, hf, None if dtype is None else parse_dtype(dtype), device)
    conv = converter_of(hf)
    cfg = conv.build_config(hf)
    dtype = parse_dtype(dtype, default=parse_dtype(hf.get("torch_dtype") or hf.get("dtype") or "float32"))
    with torch.device("meta"):
        model = Transformer(cfg, linear).to(dtype)
    model.to_empty(device=device)
    params = model.state_dict(keep_vars=True)  # parameters and persistent buffers (e.g. a router's score bias)
    loaded: set[str] = set()
    if is_gguf(path):
        n_items, unit = len(gguf.reader(path).tensors), "tensor"
        tensors = ((path.name, name, t) for name, t in gguf.hf_tensors(path, hf))
    else:
        n_items, unit = len(_weight_files(path)), "shard"
        tensors = _safetensors_tensors(path, device)
    stash: dict[tuple, dict[int, torch.Tensor]] = {}  # parts of quantized tensors waiting for their partners

    def copy_in(source: str, hf_name: str, tensor: torch.Tensor) -> None:
        for name, t in conv.to_native(hf_name, tensor, cfg):
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue  # some tied checkpoints also store the head; the embedding is the truth
            if name not in params:
                raise CheckpointError(f"{source}: tensor '{hf_name}' maps to '{name}', which this model lacks")
            p = params[name]
            if p.shape != t.shape:
                implied_by = "its metadata" if unit == "tensor" else "config.json"
                raise CheckpointError(f"{source}: tensor '{hf_name}' has shape {tuple(t.shape)}, "
                                      f"{implied_by} implies {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t)
            loaded.add(name)

    bar = tqdm(total=n_items, desc=f"loading {path.name}", unit=unit, disable=True if progress is False else None)
    last = None
    for source, hf_name, tensor in tensors:
        if unit == "tensor" or source != last:
            bar.update()
            last = source
        if conv.skips(hf_name, cfg):
            continue
        part = conv.join_part(hf_name, tensor)
        if part is None:
            copy_in(source, hf_name, tensor)
            continue
        join, base, idx = part  # a quantized weight or its scales: dequantize once both are read
        parts = stash.setdefault((join, base), {})
        parts[idx] = tensor
        if len(parts) == len(join.suffixes):
            del stash[(join, base)]
            copy_in(source, base + join.result, join.fn(*(parts[i] for i in range(len(parts)))))
    bar.close()
    if stash:
        (join, base), parts = next(iter(stash.items()))
        lacking = [base + s for i, s in enumerate(join.suffixes) if i not in parts]
        raise CheckpointError(f"checkpoint '{path}' has '{base}{join.suffixes[min(parts)]}' without '{lacking[0]}'")
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"checkpoint '{path}' lacks {len(missing)} tensors, e.g. '{missing[0]}'")
    model.reset_buffers()
    return model.eval()


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.I)
    if not m:
        raise CheckpointError(f"max_shard_size '{size}' must look like 5GB, 500MB or a byte count")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """The config.json transformers reads for this model."""
    conv = converter_for(cfg.arch)
    dtype_name = str(dtype).removeprefix("torch.")
    return {"architectures": [cfg.arch], **conv.config_to_hf(cfg), "torch_dtype": dtype_name}


def save_hf(
    model: Transformer,
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write `model` as an HF checkpoint `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    conv = converter_for(cfg.arch)
    dtype = parse_dtype(dtype, default=model.embed.weight.dtype)
    config = hf_config_dict(cfg, dtype)  # validates that the arch can express this model before writing anything
    native = model.state_dict()
    limit = _parse_size(max_shard_size)

    # Pass 1: names and sizes only (fused tensors are rebuilt in pass 2, one at a time).
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in conv.to_hf(native, cfg):
        nbytes = t.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shard_of = {name: files[i] for i, names in enumerate(shards) for name in names}

    pending: dict[str, dict[str, torch.Tensor]] = {f: {} for f in files}
    remaining = {f: len(names) for f, names in zip(files, shards)}
    total = 0
    for name, t in conv.to_hf(native, cfg):
        file = shard_of[name]
        pending[file][name] = t.detach().to(device="cpu", dtype=dtype).contiguous()
        total += t.numel() * dtype.itemsize
        remaining[file] -= 1
        if remaining[file] == 0:
            tensors = pending.pop(file)
            _atomic_write(path / file, lambda tmp, ts=tensors: save_file(ts, str(tmp), metadata={"format": "pt"}))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": shard_of}
        _atomic_write(path / "model.safetensors.index.json", lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    else:
        (path / "model.safetensors.index.json").unlink(missing_ok=True)
    for stale in path.glob("model*.safetensors"):  # shards of an earlier, differently sharded save
        if stale.name not in files:
            stale.unlink()
    _atomic_write(path / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                             ("pad_token_id", cfg.pad_token_id)) if v is not None}
    if gen:
        _atomic_write(path / "generation_config.json", lambda tmp: tmp.write_text(json.dumps(gen, indent=2) + "\n"))
    return path
