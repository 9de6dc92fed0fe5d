"""Measure the peak of live tensor bytes of a function on the CPU, to check the planner without a GPU.

The PyTorch profiler (``profile_memory=True``) records every CPU allocation and free with its size; their running sum
is what `torch.cuda.max_memory_allocated` reports on a GPU (the sum of live tensor storages), measured relative to
what was allocated before the call. Kernels differ between devices (CPU flash attention vs CUDA memory-efficient
attention, foreach vs fused AdamW), so CPU figures check the planner's accounting of the model's own tensors, not a
CUDA kernel's workspace.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def cpu_peak_bytes(fn: Callable[[], object]) -> tuple[int, int]:
    """Run `fn` under the profiler; return (peak bytes above the starting point, net bytes still allocated at the
    end). Allocations made by other threads (intra-op workers) are included."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (parameters, buffers, optimizer state)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())
