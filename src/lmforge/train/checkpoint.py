"""Resumable training checkpoints, written atomically: everything goes into `checkpoint-N.tmp/`, which is renamed to
`checkpoint-N/` only once complete, so a run killed at any instant leaves either the old or the new checkpoint.
`atomic_dir` does the same for every other directory a run leaves behind (`final/`, an export, a quantized model).

A checkpoint holds what exact resume needs: the method's trainable state (all weights for full fine-tuning, the
adapter for LoRA), optimizer, scheduler, loss scaler, every RNG state, the data sampler position and the step.
Nothing non-finite is saved: `nonfinite_tensors` names the tensors that hold inf/NaN, and the writers refuse them.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir

_NAME = re.compile(r"^checkpoint-(\d+)$")


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors that hold inf or NaN (a DTensor: this rank's shard; meta tensors skipped).

    Each tensor is reduced to one sum on its device (inf and NaN propagate; half types sum in float32, so a large
    finite tensor cannot overflow), and each device is read once.
    """
    from torch.distributed.tensor import DTensor

    sums: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in named:
        t = t.to_local() if isinstance(t, DTensor) else t
        if t.is_floating_point() and t.device.type != "meta" and t.numel():
            sums.setdefault(t.device, []).append((name, t.detach().sum(dtype=torch.promote_types(t.dtype,
                                                                                                  torch.float32))))
    bad = []
    for items in sums.values():
        finite = torch.isfinite(torch.stack([v for _, v in items])).tolist()
        bad += [name for (name, _), ok in zip(items, finite) if not ok]
    return bad


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, step: int, *, weights: dict[str, torch.Tensor], optimizer, scheduler, scaler,
                    trainer_state: dict, keep_last: int) -> Path:
    final = out_dir / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints (never `.tmp` leftovers of a killed write), oldest first."""
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, *, optimizer, scheduler, scaler) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore optimizer/scheduler/scaler/RNG in place; return (trainable weights, trainer state)."""
    weights = load_file(str(path / "trainable.safetensors"))
    opt = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    if scaler is not None and opt["scaler"] is not None:
        scaler.load_state_dict(opt["scaler"])
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return weights, json.loads((path / "trainer_state.json").read_text())


# ----------------------------------------------------------------------------------------------- distributed runs
# Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards, and a checkpoint
# written by N ranks loads into M ranks (or into one process without a process group) because DCP reshards by name.


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / "dcp" / ".metadata").is_file()


def _is_zero1(optimizer) -> bool:
    return type(optimizer).__name__ == "ZeroRedundancyOptimizer"


def _dcp_state(model, names: dict, optimizer) -> dict:
    """Trainable tensors (+ optimizer state, unless ZeRO-1 keeps it: DCP cannot read that optimizer's shards)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if k in names}}
    if not _is_zero1(optimizer):
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_sharded_checkpoint(out_dir: Path, step: int, *, model, names: dict, optimizer, scheduler, trainer_state: dict,
                            keep_last: int, is_main: bool) -> Path:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    final, tmp = out_dir / f"checkpoint-{step}", out_dir / f"checkpoint-{step}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_dcp_state(model, names, optimizer), checkpoint_id=str(tmp / "dcp"))
    if _is_zero1(optimizer):  # gathered to rank 0 and saved whole (resumes at the same world size)
        optimizer.consolidate_state_dict(to=0)
        if is_main:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if is_main:
        torch.save({"scheduler": scheduler.state_dict()}, tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    dist.barrier()  # every rank's shards are on disk before the rename publishes the checkpoint
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_sharded_checkpoint(path: Path, *, model, names: dict, optimizer, scheduler) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _dcp_state(model, names, optimizer)
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_model_state_dict(model, state["model"], options=_partial())
    if "optim" in state:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    else:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False)["scheduler"])
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())


def _partial():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=False)  # trainable tensors only; the frozen base came from the checkpoint
