"""Scale-out on PyTorch's own engine: DDP, ZeRO-1 (ZeroRedundancyOptimizer), ZeRO-2/3 and CPU offload (FSDP2
`fully_shard`), tensor parallelism (DTensor `parallelize_module`) and pipeline parallelism (`lmforge.train.pipeline`)
over one ("pp", "dp", "tp") `DeviceMesh`. Launch with `torchrun`.

The loop does not change: the trainer calls one `StepModule` (objective + model) so DDP's and FSDP's forward hooks see
the whole step, shards its sampler by data-parallel rank, and normalises by the *global* unit count. With a pipeline
the trainer hands forward + backward to a `PipelineStepper`, which wraps its stage with the same `wrap_module`.
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
from ..errors import ConfigError


class ParallelSection(Section):
    zero: Literal[0, 1, 2, 3] = 0
    """0: DDP (replicated); 1: + sharded optimizer state; 2: + sharded gradients (FSDP2, parameters kept after
    forward); 3: + sharded parameters (FSDP2 per block)."""
    cpu_offload: bool = False
    """FSDP2 CPUOffloadPolicy: parameters, gradients and optimizer state live in CPU memory."""
    tensor: int = Field(1, ge=1)
    """Tensor-parallel degree (Megatron-style column/row split of attention and MLP)."""
    pipeline: int = Field(1, ge=1)
    """Pipeline-parallel degree: the layers are split into this many stages, one per rank
    (torch.distributed.pipelining). Ranks = pipeline × data-parallel × tensor; launch with torchrun --nproc_per_node."""
    pipeline_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    """gpipe: all forwards, then all backwards (activations of every micro-batch alive); 1f1b: one forward, one
    backward in the steady state (at most `pipeline` micro-batches' activations alive)."""
    micro_batches: int | None = Field(None, ge=1)
    """Pipeline micro-batches per optimizer step (default train.grad_accum); the step's micro_batch_size × grad_accum
    rows are split evenly into them. More micro-batches, smaller bubble: (pipeline - 1) / (micro_batches + pipeline
    - 1) of the time idle."""


@dataclass
class DistState:
    world: int = 1
    rank: int = 0
    dp: int = 1
    dp_rank: int = 0
    tp: int = 1
    pp: int = 1
    pp_rank: int = 0
    mesh: object = None  # DeviceMesh ("pp", "dp", "tp") when distributed

    @property
    def enabled(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def needs_process_group(p: ParallelSection) -> bool:
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1 or p.zero > 0 or p.cpu_offload or p.tensor > 1
            or p.pipeline > 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(p: ParallelSection, device: torch.device) -> DistState:
    """Join the process group torchrun set up (or a world of one, for FSDP offload on a single GPU) and lay the ranks
    out on a ("pp", "dp", "tp") mesh: tensor-parallel ranks are adjacent (fastest links), pipeline stages outermost."""
    if p.zero == 1 and p.tensor > 1:
        raise ConfigError("parallel.zero=1 cannot shard the optimizer of a tensor-parallel model "
                          "(ZeroRedundancyOptimizer broadcasts plain tensors, not DTensors); use parallel.zero=2 or 3")
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
    if world % (p.tensor * p.pipeline):
        raise ConfigError(f"world size {world} is not divisible by parallel.pipeline × parallel.tensor = "
                         f"{p.pipeline} × {p.tensor}; launch with torchrun --nproc_per_node "
                         f"{p.pipeline * p.tensor} (or a multiple)")
    dp = world // (p.tensor * p.pipeline)
    mesh = init_device_mesh(device.type, (p.pipeline, dp, p.tensor), mesh_dim_names=("pp", "dp", "tp"))
    return DistState(world=world, rank=rank, dp=dp, dp_rank=mesh.get_local_rank("dp"), tp=p.tensor,
                     pp=p.pipeline, pp_rank=mesh.get_local_rank("pp"), mesh=mesh)


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each process takes the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


class StepModule(nn.Module):
    """The whole forward + loss of one micro-batch as a module, so DDP/FSDP wrap the step rather than a method call."""

    def __init__(self, ctx):
        super().__init__()
        self.model = ctx.model  # a submodule: what DDP / FSDP wrap
        self.objective = ctx.objective
        self.ctx = ctx  # the run's StepContext, which the objective reads

    def forward(self, batch: dict, units: int):
        return self.objective.loss_sum(self.ctx, batch, units)


def apply_tensor_parallel(model: nn.Module, tp_mesh, blocks=None) -> None:
    """Column-split q/k/v and gate/up, row-split o and down (one all-reduce per attention and per MLP) of `blocks`
    (default: every layer). Heads split evenly because the attention reshapes with -1 heads; norms and embeddings
    stay replicated."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    cfg = model.cfg
    if cfg.kv_heads % tp_mesh.size() or cfg.n_heads % tp_mesh.size():
        raise ValueError(f"parallel.tensor={tp_mesh.size()} must divide n_heads ({cfg.n_heads}) and n_kv_heads "
                         f"({cfg.kv_heads})")
    plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    if cfg.mlp == "swiglu":
        plan["mlp.gate_proj"] = ColwiseParallel()
    for block in (model.layers if blocks is None else blocks):
        parallelize_module(block, tp_mesh, plan)


def wrap_step(step: StepModule, p: ParallelSection, ds: DistState) -> nn.Module:
    """DDP for zero 0/1, FSDP2 per block (+ root) for zero 2/3 or CPU offload; tensor parallel first if asked."""
    if not ds.enabled:
        return step
    from ..models.transformer import transformers_in

    backbones = transformers_in(step.model)  # the model, or the backbone of a wrapper (reward model, ...)
    return wrap_module(step, backbones[0], [b for m in backbones for b in m.layers], p, ds)


def averages_gradients_itself(p: ParallelSection, ds: DistState) -> bool:
    """Replicated data parallelism (zero 0/1) that DDP cannot run: DDP refuses DTensor (tensor-parallel) parameters,
    and its reducer expects one backward per forward where a pipeline runs several. There the trainer averages the
    gradients over "dp" itself, once per optimizer step (`average_gradients`)."""
    return ds.dp > 1 and p.zero < 2 and not p.cpu_offload and (ds.tp > 1 or ds.pp > 1)


def wrap_module(root: nn.Module, model: nn.Module, blocks: list[nn.Module], p: ParallelSection,
                ds: DistState) -> nn.Module:
    """Tensor-parallel `blocks`, then data-parallel `root` (which contains them): DDP for zero 0/1 (unless
    `averages_gradients_itself`), FSDP2 per block (+ root) for zero 2/3 or CPU offload. `root` is the whole step, or
    one pipeline stage."""
    if ds.tp > 1:
        apply_tensor_parallel(model, ds.mesh["tp"], blocks)
    if p.zero >= 2 or p.cpu_offload:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if p.cpu_offload else OffloadPolicy()
        for block in blocks:
            fully_shard(block, mesh=ds.mesh["dp"], reshard_after_forward=p.zero == 3, offload_policy=policy)
        return fully_shard(root, mesh=ds.mesh["dp"], reshard_after_forward=p.zero == 3, offload_policy=policy)
    if ds.dp > 1 and not averages_gradients_itself(p, ds):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(root, process_group=ds.mesh["dp"].get_group())
    return root


def zero1_optimizer(proto: torch.optim.Optimizer, ds: DistState) -> torch.optim.Optimizer:
    """ZeRO-1: each data-parallel rank keeps the optimizer state of its share of the parameters."""
    import inspect

    from torch.distributed.optim import ZeroRedundancyOptimizer

    accepted = inspect.signature(type(proto).__init__).parameters
    defaults = {k: v for k, v in proto.defaults.items() if k in accepted and k not in ("params", "fused")}
    groups = [{k: v for k, v in g.items() if k in ("params", "weight_decay")} for g in proto.param_groups]
    return ZeroRedundancyOptimizer(groups, optimizer_class=type(proto), process_group=ds.mesh["dp"].get_group(),
                                   **defaults)


def average_gradients(params: list[nn.Parameter], group, bucket_bytes: int = 25 * 2**20) -> None:
    """Mean of replicated gradients over `group`, one all-reduce per flat bucket of about `bucket_bytes` (as DDP
    buckets). Pipeline stages use this instead of DDP: DDP's reducer expects one backward per forward, a pipeline
    runs several micro-batches' backwards per step; here gradients are reduced once, after the last one."""
    from torch.distributed.tensor import DTensor

    n = dist.get_world_size(group)
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.dtype, g.device), []).append(g)
    for same in by_kind.values():
        start = 0
        while start < len(same):
            bucket, size = [], 0
            while start < len(same) and (not bucket or size + same[start].nbytes <= bucket_bytes):
                bucket.append(same[start])
                size += same[start].nbytes
                start += 1
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, group=group)
            flat /= n
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))


def dp_sum(value: float, ds: DistState, device: torch.device) -> float:
    """Sum a per-rank number over the data-parallel group (tensor-parallel ranks hold the same value)."""
    if not ds.enabled or ds.dp == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=ds.mesh["dp"].get_group())
    return float(t.item())


def clip_grad_norm(params: list[nn.Parameter], max_norm: float | None, stage_group=None,
                   device: torch.device | None = None) -> torch.Tensor:
    """Global gradient norm over plain and DTensor (FSDP/TP-sharded) gradients, then clip in place; returns the
    norm as a 0-dim device tensor (no host sync here: the caller reads it after the optimizer step is queued).

    torch's clip_grad_norm_ refuses a mix of DTensor and plain tensors (TP leaves norms plain); here each sharded
    gradient's sum of squares is reduced over the mesh dimensions it is sharded on (DTensor's own Partial -> Replicate,
    which also handles FSDP's strided shards of a TP-sharded dim under FSDP × TP). With a pipeline,
    each rank holds one stage's parameters: `stage_group` (the "pp" group) sums the stages' squares. Plain fp32
    gradients go through one fused `_foreach_norm` (hundreds of LoRA matrices would otherwise cost four kernel
    launches each)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads and stage_group is None:
        return torch.zeros(())
    if grads:
        device = grads[0].to_local().device if isinstance(grads[0], DTensor) else grads[0].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    plain = [g for g in grads if not isinstance(g, DTensor)]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    fused = [g for g in plain if g.dtype == torch.float32]
    if fused:
        total += torch.stack(torch._foreach_norm(fused)).pow(2).sum()
    for g in plain:
        if g.dtype != torch.float32:
            total += g.float().pow(2).sum()
    for g in sharded:  # the local sum is partial on every sharded mesh dim (FSDP, TP, both: strided)
        total += g.float().pow(2).sum().full_tensor()
    if stage_group is not None:
        dist.all_reduce(total, group=stage_group)
    norm = total.sqrt()
    if max_norm is not None:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # 1 when the norm is within bounds: no change
        if plain:
            torch._foreach_mul_(plain, coef)
        if sharded:
            c = float(coef)
            for g in sharded:
                g.mul_(c)
    return norm


# ---------------------------------------------------------------------------------------- measured memory per rank


def _local_bytes(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return 0 if local.device.type == "meta" else local.numel() * local.element_size()


def model_state_bytes(params: list[nn.Parameter], optimizer) -> dict[str, int]:
    """Bytes of parameters (frozen ones included), gradients and optimizer state this rank holds: its shards only,
    wherever they live (another pipeline stage's meta tensors count 0). The measured side of the ZeRO table
    (`lmforge.plan.zero_model_state_bytes`)."""
    opt = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps its shard's state in .optim
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.numel() > 1]
    return {"params": sum(_local_bytes(p) for p in params),
            "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(_local_bytes(v) for v in state)}


def per_rank(values: list[float], ds: DistState, device: torch.device) -> list[list[float]]:
    """Every rank's `values` (same length on each rank), in rank order; a world of one gives [values]."""
    if not ds.enabled or ds.world == 1:
        return [list(values)]
    local = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(local) for _ in range(ds.world)]
    dist.all_gather(out, local)
    return [t.tolist() for t in out]


# ------------------------------------------------------------------------------------------------ export


def full_state_dict(model: nn.Module, ds: DistState) -> dict[str, torch.Tensor]:
    """The whole model's unsharded weights on the CPU of rank 0 (other ranks get {}), whatever the layout.

    DDP/FSDP/TP: `get_model_state_dict` gathers the DTensor shards. Pipeline: each rank holds one stage (the other
    stages' modules are on the meta device), so every stage gathers its own shards and sends them to rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    if ds.pp == 1:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sender = ds.mesh.get_local_rank("dp") == 0 and ds.mesh.get_local_rank("tp") == 0
    local = {}
    for name, t in model.state_dict().items():  # same key order on every rank of a stage: collectives line up
        if t.device.type == "meta":
            continue  # another stage's tensor
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if sender:
            local[name] = full.detach().cpu()
    gathered = [None] * ds.world if ds.is_main else None
    dist.gather_object(local, gathered, dst=0)
    return {k: v for part in gathered for k, v in part.items()} if ds.is_main else {}
