"""One run setup for every stage (`prepare_run`): alignment stages honour `trainable:`, and under torchrun their
data-parallel ranks average gradients (2 ranks of 1 pair reach the weights of 1 process of 2 pairs), where before
every rank trained its own copy."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lmforge.align import demo
from lmforge.align.run import AlignConfig, run_alignment
from lmforge.data import DataConfig
from lmforge.errors import ConfigError
from lmforge.models import load_hf
from lmforge.testing import make_tiny_checkpoint
from lmforge.train.config import ModelSection, OptimSection, TrainSection

COMMON = dict(device="cpu", precision="fp32", progress=False, tensorboard=False, save_every=0, grad_clip=None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("align_run")
    ckpt = make_tiny_checkpoint(root / "tiny")
    data = demo.make_task_files(root / "task", n_pairs=8, n_val=2, n_prompts=2)
    return root, ckpt, data["pairs"]


def test_trainable_takes_effect_for_dpo(setup, tmp_path):
    _, ckpt, pairs = setup
    cfg = AlignConfig(stage="dpo", method="full", trainable={"params": "embeddings"}, model=ModelSection(path=str(ckpt)),
                      data=DataConfig(path=str(pairs), max_seq_len=48), optim=OptimSection(lr=1e-2),
                      train=TrainSection(output_dir=str(tmp_path), max_steps=2, micro_batch_size=2, **COMMON))
    trained, base = run_alignment(cfg)["model"].state_dict(), load_hf(ckpt).state_dict()
    changed = {k for k, v in trained.items() if not torch.equal(v, base[k].to(v.dtype))}
    assert changed and all("embed" in k or "lm_head" in k for k in changed), changed


def test_model_parallel_sections_are_refused_for_alignment_stages(setup, tmp_path):
    _, ckpt, pairs = setup
    cfg = AlignConfig(stage="dpo", model=ModelSection(path=str(ckpt)), data=DataConfig(path=str(pairs)),
                      parallel={"tensor": 2}, train=TrainSection(output_dir=str(tmp_path), **COMMON))
    with pytest.raises(ConfigError, match="parallel.tensor does not apply to stage dpo"):
        run_alignment(cfg)


def _dpo(setup, out, nproc: int, mbs: int) -> dict[str, torch.Tensor]:
    _, ckpt, pairs = setup
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = launcher + ["-m", "lmforge.cli", "train", "stage=dpo", "method=full", f"model.path={ckpt}",
                      f"data.path={pairs}", "data.max_seq_len=48", "optim.lr=1e-2", "schedule.kind=constant",
                      "train.max_steps=2", f"train.micro_batch_size={mbs}", f"train.output_dir={out}",
                      *(f"train.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in COMMON.items()
                        if k != "grad_clip"), "train.grad_clip=null"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out / "final" / "model.safetensors"))


def test_dpo_ranks_average_gradients_under_torchrun(setup):
    root = setup[0]
    single, ranks = _dpo(setup, root / "single", 1, 2), _dpo(setup, root / "two", 2, 1)
    base = load_file(str(setup[1] / "model.safetensors"))  # the same (HF) names as the saved runs
    moved = max(float((v - base[k].to(v.dtype)).abs().max()) for k, v in single.items())  # ~ lr x steps (AdamW)
    apart = max(float((ranks[k] - v).abs().max()) for k, v in single.items())
    # the same update up to float reduction order (AdamW divides near-zero gradients by their own size, so a few
    # of them show it); a rank training on its own pair alone would land about a whole update away
    assert moved > 1e-3 and apart < 0.05 * moved, (moved, apart)
