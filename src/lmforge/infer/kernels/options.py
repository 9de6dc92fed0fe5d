"""`KernelOptions`: how the decode kernels run, in one object the engine config owns (`engine.kernels.*`).

The engine hands it to what calls the kernels: the modules `pack_for_decode` installs (GEMV linears, packed
projections, fused blocks), the quantized linears (`quant*`, as a `QuantKernels`), the paged cache (attention) and the
model runner (the greedy step's end). Calls made
without one (a model packed by hand, a kernel called directly) get the defaults. Whether triton runs on the CPU at
all is triton's own switch, TRITON_INTERPRET=1, read where triton is imported.
"""
from __future__ import annotations

from pydantic import ConfigDict, field_validator

from ...config import Section
from ...quant.base import QuantKernels


class KernelOptions(Section):
    """Switches of the Triton decode kernels (frozen: one object may be shared by every module that launches them)."""

    model_config = ConfigDict(**Section.model_config, frozen=True)

    gemv: bool = True
    """One-row matmuls through the Triton GEMV (false: F.linear / cuBLAS, e.g. to compare the two)."""
    pdl: bool = True
    """Programmatic dependent launch of the decode kernels (Hopper and later): each kernel may start while the
    previous one drains, loading its first weight tile before it waits for that kernel's output."""
    gemv_configs: str | None = None
    """A JSON file of GEMV tile configs tuned inside the decode step (bench/tune_decode_gemv.py writes one); None = the
    file shipped for this GPU model in lmforge/infer/kernels/gemv_configs/, if any, else triton's autotuner."""
    cpu_interpreter: bool = False
    """Also send CPU rows through the kernels, under TRITON_INTERPRET=1 (tests; slow)."""
    quant: bool = True
    """Weight-only quantized linears (INT8 / INT4 / NF4) through lmforge's Triton kernels (false: dequantize +
    matmul, the reference, e.g. to compare the two)."""
    quant_gemv_tiles: (tuple[int, int, int] | tuple[int, int, int, int] | tuple[int, int, int, int, int]
                       | tuple[int, int, int, int, int, int] | tuple[int, int, int, int, int, int, int] | None) = None
    """The quantized one-row GEMV's tiles for tuning runs (bench/qkernel_tiles.py sweeps them), read by the kernel
    each layer runs: K-major INT4 / NF4 (what CUDA layers are prepared into) take output columns per program, input
    columns per step, warps, steps per program (0: all of K)[, atomic split-K sums 0/1/2 (2: one kernel, the
    last split writing the output), magic 0/1/2: INT4 nibbles masked in place under an exponent (1) or shifted in
    pairs to where no float subtract is needed (2), NF4 levels a byte at a time from a pair table (1) or by byte
    permutes in registers (2, CUDA), flat 0/1: two-dimensional tiles]; row-major INT8 (and unprepared 4-bit
    layers) rows per program, input columns per step, warps[, MAGIC (INT8: codes four to a word, bytes masked in
    place (1) or shifted to where no float subtract is needed (2)), LATE: the 4-bit inner loop's switches, 0 or 1].
    None = the per-format defaults."""

    @field_validator("quant_gemv_tiles")
    @classmethod
    def _tile_fields(cls, tiles: tuple[int, ...] | None) -> tuple[int, ...] | None:
        """Sizes positive, steps >= 0, switches 0/1 (atomic and magic up to 2): a value the kernels would not read
        as given is refused, not silently taken as another."""
        if tiles is None:
            return tiles
        highest = (None, None, None, None, 2, 2, 1)  # None: a size (>= 1; steps >= 0), else the largest switch
        for i, (v, top) in enumerate(zip(tiles, highest)):
            if top is None and v < (0 if i == 3 else 1):
                raise ValueError(f"field {i + 1} ({v}) must be {'>= 0' if i == 3 else 'positive'}")
            if top is not None and not 0 <= v <= top:
                raise ValueError(f"field {i + 1} ({v}) is a switch: 0{'-' if top > 1 else ' or '}{top}")
        return tiles

    def quant_kernels(self) -> QuantKernels:
        """What the engine hands the quantized linears (`lmforge.quant.set_kernels`)."""
        return QuantKernels(self.quant, self.quant_gemv_tiles, self.pdl)


DEFAULT = KernelOptions()
