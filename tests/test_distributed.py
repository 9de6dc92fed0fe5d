"""torch.distributed on CPU (gloo, 2 processes via torchrun): every parallel layout reproduces the single-process
loss curve, and a checkpoint written by 2 ranks resumes in 1 process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.testing import make_tiny_checkpoint

STEPS = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ckpt = make_tiny_checkpoint(root / "tiny")
    rows = [{"messages": [{"role": "user", "content": f"question {i} " + "word " * (i % 5)},
                          {"role": "assistant", "content": f"answer {i % 3} " + "more " * (i % 4)}]} for i in range(48)]
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = root / "cfg.yaml"
    cfg.write_text(f"model: {{path: {ckpt}}}\ndata: {{path: {data}, max_seq_len: 48}}\noptim: {{lr: 1.0e-2}}\n"
                   f"schedule: {{kind: constant}}\n"  # so a 4-step run is a prefix of the 5-step run
                   f"train: {{max_steps: {STEPS}, micro_batch_size: 4, grad_accum: 2, device: cpu, precision: fp32, "
                   f"progress: false, tensorboard: false}}\n")
    single = root / "single"
    _run(cfg, single, nproc=1)
    return root, cfg, _losses(single)


def _run(cfg: Path, out: Path, nproc: int, *overrides: str, check: bool = True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = launcher + ["-m", "lmforge.cli", "train", str(cfg), f"train.output_dir={out}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


@pytest.mark.parametrize("layout", [
    ("train.micro_batch_size=2",),                              # DDP: 2 ranks × 2 rows = the single run's 4
    ("train.micro_batch_size=2", "parallel.zero=1"),            # + sharded optimizer state
    ("train.micro_batch_size=2", "parallel.zero=2"),            # FSDP2, gradients sharded
    ("train.micro_batch_size=2", "parallel.zero=3"),            # FSDP2, parameters sharded
    ("parallel.tensor=2",),                                     # tensor parallel: both ranks see the same 4 rows
], ids=["ddp", "zero1", "zero2", "zero3", "tp2"])
def test_parallel_layouts_reproduce_the_single_process_loss_curve(setup, layout):
    root, cfg, want = setup
    out = root / "-".join(layout).replace("=", "").replace(".", "")
    _run(cfg, out, 2, *layout)
    got = _losses(out)
    assert len(got) == len(want) == STEPS
    for a, b in zip(got, want):
        assert abs(a - b) < 1e-5, (got, want)
    assert (out / "final" / "model.safetensors").is_file()  # gathered and saved once, by rank 0


def test_checkpoint_from_two_ranks_resumes_in_one_process(setup):
    root, cfg, want = setup
    out = root / "resume"
    _run(cfg, out, 2, "train.micro_batch_size=2", "parallel.zero=3", f"train.max_steps={STEPS - 1}",
         "train.save_every=2")
    assert (out / f"checkpoint-{STEPS - 1}" / "dcp" / ".metadata").is_file()
    _run(cfg, out, 1)  # world size 1, no process group: DCP reshards the 2-rank checkpoint on load
    got = _losses(out)
    assert len(got) == STEPS
    assert abs(got[-1] - want[-1]) < 1e-5, (got, want)


def test_fsdp_cpu_offload_in_a_world_of_one_matches(setup):
    """FSDP2 with CPUOffloadPolicy in a single process (what one GPU with offload runs) keeps the loss curve."""
    root, cfg, want = setup
    out = root / "offload"
    _run(cfg, out, 1, "parallel.zero=3", "parallel.cpu_offload=true")
    got = _losses(out)
    for a, b in zip(got, want):
        assert abs(a - b) < 1e-5, (got, want)
