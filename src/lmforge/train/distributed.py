"""Scale-out on PyTorch's own engine: DDP, ZeRO-1 (ZeroRedundancyOptimizer), ZeRO-2/3 and CPU offload (FSDP2
`fully_shard`), tensor parallelism (DTensor `parallelize_module`) over a (dp, tp) `DeviceMesh`. Launch with `torchrun`.

The loop does not change: the trainer calls one `StepModule` (objective + model) so DDP's and FSDP's forward hooks see
the whole step, shards its sampler by data-parallel rank, and normalises by the *global* unit count.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn

from ..config import Section


class ParallelSection(Section):
    zero: Literal[0, 1, 2, 3] = 0
    """0: DDP (replicated); 1: + sharded optimizer state; 2: + sharded gradients (FSDP2, parameters kept after
    forward); 3: + sharded parameters (FSDP2 per block)."""
    cpu_offload: bool = False
    """FSDP2 CPUOffloadPolicy: parameters, gradients and optimizer state live in CPU memory."""
    tensor: int = Field(1, ge=1)
    """Tensor-parallel degree (Megatron-style column/row split of attention and MLP)."""
    pipeline: int = Field(1, ge=1)
    """Pipeline-parallel degree (not available yet: must be 1)."""


@dataclass
class DistState:
    world: int = 1
    rank: int = 0
    dp: int = 1
    dp_rank: int = 0
    tp: int = 1
    mesh: object = None  # DeviceMesh ("dp", "tp") when distributed

    @property
    def enabled(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def needs_process_group(p: ParallelSection) -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or p.zero > 0 or p.cpu_offload or p.tensor > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(p: ParallelSection, device: torch.device) -> DistState:
    """Join the process group torchrun set up (or a world of one, for FSDP offload on a single GPU)."""
    if p.pipeline > 1:
        raise ValueError("parallel.pipeline > 1 is not available yet; use parallel.tensor or parallel.zero")
    if not needs_process_group(p):
        return DistState()
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(k, v)
        # CPU-offloaded FSDP gradients are reduced on the host: gloo beside nccl
        dist.init_process_group("cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % p.tensor:
        raise ValueError(f"world size {world} is not divisible by parallel.tensor={p.tensor}")
    dp = world // p.tensor
    mesh = init_device_mesh(device.type, (dp, p.tensor), mesh_dim_names=("dp", "tp"))
    return DistState(world=world, rank=rank, dp=dp, dp_rank=mesh.get_local_rank("dp"), tp=p.tensor, mesh=mesh)


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each process takes the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


class StepModule(nn.Module):
    """The whole forward + loss of one micro-batch as a module, so DDP/FSDP wrap the step rather than a method call."""

    def __init__(self, model: nn.Module, objective, trainer):
        super().__init__()
        self.model = model
        self.objective = objective
        self._trainer = [trainer]  # a list: not a submodule

    def forward(self, batch: dict, units: int):
        return self.objective.loss_sum(self._trainer[0], batch, units)


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Column-split q/k/v and gate/up, row-split o and down (one all-reduce per attention and per MLP). Heads split
    evenly because the attention reshapes with -1 heads; norms and embeddings stay replicated."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    cfg = model.cfg
    if cfg.kv_heads % tp_mesh.size() or cfg.n_heads % tp_mesh.size():
        raise ValueError(f"parallel.tensor={tp_mesh.size()} must divide n_heads ({cfg.n_heads}) and n_kv_heads "
                         f"({cfg.kv_heads})")
    plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    if cfg.mlp == "swiglu":
        plan["mlp.gate_proj"] = ColwiseParallel()
    for block in model.layers:
        parallelize_module(block, tp_mesh, plan)


def wrap_step(step: StepModule, p: ParallelSection, ds: DistState) -> nn.Module:
    """DDP for zero 0/1, FSDP2 per block (+ root) for zero 2/3 or CPU offload; tensor parallel first if asked."""
    if not ds.enabled:
        return step
    model = step.model
    if ds.tp > 1:
        apply_tensor_parallel(model, ds.mesh["tp"])
    if p.zero >= 2 or p.cpu_offload:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if p.cpu_offload else OffloadPolicy()
        for block in model.layers:
            fully_shard(block, mesh=ds.mesh["dp"], reshard_after_forward=p.zero == 3, offload_policy=policy)
        return fully_shard(step, mesh=ds.mesh["dp"], reshard_after_forward=p.zero == 3, offload_policy=policy)
    if ds.dp > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(step, process_group=ds.mesh["dp"].get_group())
    return step


def zero1_optimizer(proto: torch.optim.Optimizer, ds: DistState) -> torch.optim.Optimizer:
    """ZeRO-1: each data-parallel rank keeps the optimizer state of its share of the parameters."""
    import inspect

    from torch.distributed.optim import ZeroRedundancyOptimizer

    accepted = inspect.signature(type(proto).__init__).parameters
    defaults = {k: v for k, v in proto.defaults.items() if k in accepted and k not in ("params", "fused")}
    groups = [{k: v for k, v in g.items() if k in ("params", "weight_decay")} for g in proto.param_groups]
    return ZeroRedundancyOptimizer(groups, optimizer_class=type(proto), process_group=ds.mesh["dp"].get_group(),
                                   **defaults)


def dp_sum(value: float, ds: DistState, device: torch.device) -> float:
    """Sum a per-rank number over the data-parallel group (tensor-parallel ranks hold the same value)."""
    if not ds.enabled or ds.dp == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=ds.mesh["dp"].get_group())
    return float(t.item())


def clip_grad_norm(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Global gradient norm over plain and DTensor (FSDP/TP-sharded) gradients, then clip in place.

    torch's clip_grad_norm_ refuses a mix of DTensor and plain tensors (TP leaves norms plain); here each sharded
    gradient contributes its local squares, all-reduced over the mesh dimensions it is sharded on."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    device = grads[0].to_local().device if isinstance(grads[0], DTensor) else grads[0].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        if isinstance(g, DTensor):
            sq = g.to_local().float().pow(2).sum()
            for dim, placement in enumerate(g.placements):
                if placement.is_shard():
                    dist.all_reduce(sq, group=g.device_mesh.get_group(dim))
            total += sq
        else:
            total += g.float().pow(2).sum()
    norm = total.sqrt()
    value = float(norm)
    if max_norm is not None and value > max_norm:
        for g in grads:
            g.mul_(max_norm / (value + 1e-6))
    return value
