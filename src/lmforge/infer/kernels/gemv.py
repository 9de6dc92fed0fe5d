"""Matrix-vector products for batch-1 decode: y = x W^T (+ b) with one input row, in Triton.

At one token per step a linear layer is a pure weight read (2 bytes per weight, 2 FLOPs), so its speed is how close
the kernel gets to HBM bandwidth. cuBLAS picks GEMM tilings built for many rows; for one row this kernel streams W
in BLOCK_N x BLOCK_K tiles, each program owning a few output rows (no split-K reduction pass). Everything else —
more rows, CPU, fp32, non-contiguous weights, no triton — takes `F.linear`.

The tile configuration of a call (its kind: weight shape, fused norm / SiLU·mul / residual) comes from, in order:
`config_overrides` (what `bench/tune_decode_gemv.py` tries), a JSON file of configurations tuned inside the
captured decode step (`KernelOptions.gemv_configs`, else the one shipped for this GPU model in `gemv_configs/`),
else triton's autotuner, once per (N, K), before any CUDA-graph capture (the decode warm-up runs it). A fifth
field (programs per SM) selects `gemv_rows_kernel`, whose programs walk row blocks with one K tile. Timed alone,
the autotuner ranks configs by their isolated speed; inside the step, under programmatic dependent launch, a kernel
overlaps its neighbours and the ranking differs (on an H100 the tuned file makes the 1B decode step ~10% faster).

Exposed to torch.compile as the custom op `lmforge::gemv` (opaque to inductor, captured in CUDA graphs as is); the
ops take the two launch options (`pdl`, `configs`) as arguments, `linear` and `use_gemv` the whole `KernelOptions`.
CPU tests run the kernel under TRITON_INTERPRET=1 against `F.linear`.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from .options import DEFAULT, KernelOptions
from .paged_attention import kernel_available

_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        from . import gemv_kernel

        _KERNEL = gemv_kernel
    return _KERNEL


gemv_available = kernel_available  # the same conditions as the paged-attention kernel: CUDA, or the interpreter


def use_pdl(device: torch.device, pdl: bool = DEFAULT.pdl) -> bool:
    """Launch the decode kernels with programmatic dependent launch (`KernelOptions.pdl`): CUDA compute capability
    9+, a triton with `gdc_wait`, and the switch on. Inside the captured decode step the launches become
    programmatic edges."""
    return pdl and device.type == "cuda" and _pdl_capable(device.index)


def pdl_options(device: torch.device, pdl: bool = DEFAULT.pdl) -> dict:
    """Launch options of a decode kernel: its PDL switch and Triton's launch flag where `use_pdl`, else none."""
    return {"PDL": True, "launch_pdl": True} if use_pdl(device, pdl) else {}


@functools.cache
def _pdl_capable(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9 and _kernel().gdc_wait is not None


Config = tuple[int, ...]  # BLOCK_N, BLOCK_K, num_warps, num_stages[, programs per SM: the row-walking kernel]
config_overrides: dict[str, Config] = {}  # kind -> config, ahead of any file (the decode-step tuner sets these)
CONFIG_DIR = Path(__file__).with_name("gemv_configs")


def config_kind(N: int, K: int, silu_mul: bool = False, norm: bool = False, residual: bool = False) -> str:
    """The key of a GEMV call in the tuned-config files: '2048x8192+silu+residual'."""
    return f"{N}x{K}" + "+silu" * silu_mul + "+norm" * norm + "+residual" * residual


def config_file(device_name: str, configs: str | None = DEFAULT.gemv_configs) -> Path:
    """Where the configs tuned for this GPU model live: `configs` (`KernelOptions.gemv_configs`) if set, else the
    shipped file."""
    return Path(configs) if configs else CONFIG_DIR / (device_name.replace(" ", "_").replace("/", "_") + ".json")


def load_configs(path: Path) -> dict[str, Config]:
    """A tuned-config file's {kind: (BLOCK_N, BLOCK_K, num_warps, num_stages)}; {} if there is none."""
    if not path.is_file():
        return {}
    try:
        table = {kind: tuple(int(v) for v in cfg) for kind, cfg in json.loads(path.read_text())["configs"].items()}
        bad = next((kind for kind, cfg in table.items()
                    if len(cfg) not in (4, 5) or min(cfg[:4]) < 1 or any(v & (v - 1) for v in cfg[:3])), None)
        if bad:
            raise ValueError(f"{bad}: {list(table[bad])} is not [BLOCK_N, BLOCK_K, num_warps, num_stages] "
                             "(+ programs per SM) with powers of two for the first three")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: not a GEMV config file ({e}); rerun bench/tune_decode_gemv.py "
                          "or unset engine.kernels.gemv_configs") from None
    return table


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@functools.cache
def _device_configs(index: int | None, configs: str | None = DEFAULT.gemv_configs) -> dict[str, Config]:
    return load_configs(config_file(torch.cuda.get_device_name(index), configs))


def tuned_config(device: torch.device, kind: str, configs: str | None = DEFAULT.gemv_configs) -> Config | None:
    """The tile config for a GEMV kind on this device: an override, the tuned file's, or None (autotune)."""
    return config_overrides.get(kind) or _device_configs(device.index, configs).get(kind)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool = False,
            norm: tuple[torch.Tensor, float, float] | None = None, residual: torch.Tensor | None = None,
            pdl: bool = DEFAULT.pdl, configs: str = "") -> torch.Tensor:
    N, K = weight.shape
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    mod = _kernel()
    norm_weight, eps, offset = norm if norm is not None else (y, 0.0, 0.0)
    args = (x, weight, bias if bias is not None else y, y, N, K, weight.stride(0), norm_weight,
            residual.contiguous() if residual is not None else y, eps, offset)
    flags = dict(HAS_BIAS=bias is not None, SILU_MUL=silu_mul, NORM=norm is not None, NORM_OFFSET=offset != 0.0,
                 RESIDUAL=residual is not None)
    kind = config_kind(N, K, silu_mul, norm is not None, residual is not None)
    if x.is_cuda:
        tuned = tuned_config(x.device, kind, configs or None)
    else:  # the interpreter: a small fixed config unless overridden (autotuning would time the interpreter)
        tuned = config_overrides.get(kind, (4, 64, 4, 1))
    if tuned and len(tuned) == 5 and tuned[4] and tuned[1] >= K:  # a fixed number of programs walking row blocks
        bn, bk, warps, stages, per_sm = tuned
        programs = min(-(-N // bn), per_sm * _sm_count(x.device))
        mod.gemv_rows_kernel[(programs,)](*args, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
                                          **flags, **pdl_options(x.device, pdl))
    elif tuned:
        bn, bk, warps, stages = tuned[:4]
        mod.gemv_kernel[(-(-N // bn),)](*args, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0, ONE_TILE=bk >= K,
                                        num_warps=warps, num_stages=stages, **flags, **pdl_options(x.device, pdl))
    else:
        grid = lambda meta: (-(-N // meta["BLOCK_N"]),)  # noqa: E731
        mod.gemv_tuned[grid](*args, EVEN_K=K % 1024 == 0, **flags, **pdl_options(x.device, pdl))
    return y


@torch.library.custom_op("lmforge::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         residual: torch.Tensor | None = None, pdl: bool = True, configs: str = "") -> torch.Tensor:
    """x (..., K) with one row in all, weight (N, K) contiguous → (..., N); `residual` (..., N) is added to the
    rounded product (a block's `x + o_proj(y)` in one launch). `pdl`, `configs`: `KernelOptions.pdl` and
    `.gemv_configs` ("" = the shipped file)."""
    return _launch(x, weight, bias, residual=residual, pdl=pdl, configs=configs)


@gemv.register_fake
def _(x, weight, bias=None, residual=None, pdl=True, configs=""):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("lmforge::gemv_silu_mul", mutates_args=())
def gemv_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, pdl: bool = True, configs: str = "") -> torch.Tensor:
    """The SwiGLU MLP's down projection straight from the packed gate/up output: x (..., 2K) = [gate, up], one row,
    weight (N, K) → (..., N) = (silu(gate) * up) W^T (+ bias) (+ residual), no intermediate tensor or extra launch."""
    return _launch(x, weight, bias, silu_mul=True, residual=residual, pdl=pdl, configs=configs)


@gemv_silu_mul.register_fake
def _(x, weight, bias=None, residual=None, pdl=True, configs=""):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("lmforge::gemv_rmsnorm", mutates_args=())
def gemv_rmsnorm(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, offset: float, weight: torch.Tensor,
                 bias: torch.Tensor | None = None, pdl: bool = True, configs: str = "") -> torch.Tensor:
    """RMSNorm then a matmul in one launch: x (..., K) one row of the residual stream, norm_weight (K,), weight
    (N, K) → (..., N) = RMSNorm(x) W^T (+ bias); `offset` as `RMSNorm.offset` (Gemma's 1 + weight)."""
    return _launch(x, weight, bias, norm=(norm_weight, eps, offset), pdl=pdl, configs=configs)


@gemv_rmsnorm.register_fake
def _(x, norm_weight, eps, offset, weight, bias=None, pdl=True, configs=""):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def launch_args(options: KernelOptions) -> dict:
    """The keyword arguments of the GEMV ops that carry `options`."""
    return {"pdl": options.pdl, "configs": options.gemv_configs or ""}


def use_gemv(x: torch.Tensor, weight: torch.Tensor, options: KernelOptions = DEFAULT) -> bool:
    """One input row, a half-precision contiguous weight of the same dtype, where the kernel runs (CUDA, or the CPU
    with `options.cpu_interpreter`) and `options.gemv` is on."""
    return (options.gemv and x.numel() == x.shape[-1] and weight.dtype in (torch.bfloat16, torch.float16)
            and x.dtype == weight.dtype and weight.is_contiguous() and x.device == weight.device
            and (x.is_cuda or options.cpu_interpreter) and gemv_available(x.device))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           options: KernelOptions = DEFAULT) -> torch.Tensor:
    """`F.linear`, through the GEMV kernel when `x` is one row (decode at batch 1)."""
    if use_gemv(x, weight, options):
        return gemv(x, weight, bias, **launch_args(options))
    return F.linear(x, weight, bias)
