"""Dataset mixing: weighted interleave within 1% of the target ratio, exact resume, and `data.mix` in training."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lmforge.config import load_config
from lmforge.data import DataConfig, build_datasets
from lmforge.data.mixing import MixedDataset, MixSource, MixtureSampler
from lmforge.errors import ConfigError
from lmforge.testing import make_tiny_checkpoint
from lmforge.tokenizer import Tokenizer
from lmforge.train import run_training
from lmforge.train.config import ModelSection, OptimSection, ScheduleSection, TrainConfig, TrainSection


def _draw(sampler: MixtureSampler, n: int, chunk: int = 37) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        out += sampler.take(min(chunk, n - len(out)))
    return out


def _sources(sampler: MixtureSampler, indices: list[int]) -> np.ndarray:
    return np.searchsorted(sampler.offsets, indices, side="right") - 1


@pytest.mark.parametrize("sizes,weights", [([50, 300], [1, 5]), ([7, 1000, 40], [0.3, 2.0, 1.7])])
def test_ratio_is_within_one_percent_over_10k_samples_and_in_every_window(sizes, weights):
    sampler = MixtureSampler(sizes, weights, seed=3)
    src = _sources(sampler, _draw(sampler, 10_000))
    target = np.array(weights) / sum(weights)
    share = np.bincount(src, minlength=len(sizes)) / len(src)
    assert np.all(np.abs(share - target) <= 0.01 * target), (share, target)
    # not just on average: after every prefix each source is within 2 draws of its quota
    counts = np.cumsum(np.eye(len(sizes))[src], axis=0)
    t = np.arange(1, len(src) + 1)[:, None]
    assert np.abs(counts - t * target).max() <= 2


def test_resume_draws_the_identical_sequence():
    straight = _draw(MixtureSampler([50, 300], [1, 5], seed=0), 10_000)
    first = MixtureSampler([50, 300], [1, 5], seed=0)
    head = _draw(first, 3_333, chunk=64)
    state = json.loads(json.dumps(first.state()))  # what trainer_state.json holds
    resumed = MixtureSampler([50, 300], [1, 5], seed=0)
    resumed.epoch, resumed.index = state["epoch"], state["index"]  # exactly how the trainer restores a sampler
    assert head + _draw(resumed, 10_000 - 3_333, chunk=50) == straight


def test_each_pass_over_a_source_is_a_fresh_permutation():
    sampler = MixtureSampler([7, 70], [1, 1], seed=0)
    small = [i for i in _draw(sampler, 200) if i < 7]
    passes = [small[k:k + 7] for k in range(0, 21, 7)]
    assert all(sorted(p) == list(range(7)) for p in passes)  # without replacement inside a pass
    assert len({tuple(p) for p in passes}) > 1
    other = [i for i in _draw(MixtureSampler([7, 70], [1, 1], seed=1), 200) if i < 7]
    assert other[:7] != small[:7]  # the seed decides the order


# ------------------------------------------------------------------------------------------------ data.mix


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("mix") / "tiny")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixdata")
    (d / "domain.jsonl").write_text("".join(json.dumps({"text": f"domain fact {i}: alpha beta {i % 5}"}) + "\n"
                                            for i in range(12)))
    (d / "general.txt").write_text("".join(f"general line {i} about the quick brown fox\n" for i in range(40)))
    return d


def _mix(files, **extra) -> DataConfig:
    return DataConfig(mix=[MixSource(path=str(files / "domain.jsonl"), weight=1),
                           MixSource(path=str(files / "general.txt"), weight=5, text_mode="lines")],
                      max_seq_len=32, **extra)


def test_mix_builds_one_dataset_per_source_with_its_own_settings(ckpt, files):
    train, val, report = build_datasets(_mix(files, val_split=0.25), Tokenizer.from_dir(ckpt))
    assert isinstance(train, MixedDataset) and [len(p) for p in train.parts] == [9, 30]
    assert len(val) == 3 + 10 and report.train_samples == 39
    assert "weight 5 = 83.3% of draws" in report.summary()
    assert train[9] == train.parts[1][0]


def test_mix_config_errors(ckpt, files):
    with pytest.raises(ConfigError, match="exactly one of them") as e:
        load_config(DataConfig, overrides=["path=a.txt", "mix=[{path: b.txt}]"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="exactly one of them"):
        load_config(DataConfig, overrides=["max_seq_len=32"])
    with pytest.raises(ConfigError, match="weight"):
        load_config(DataConfig, overrides=["mix=[{path: b.txt, weight: 0}]"])
    bad = DataConfig(mix=[MixSource(path=str(files / "general.txt")), MixSource(path=str(files / "missing.txt"))])
    with pytest.raises(ConfigError, match=r"^data.mix\[1\]: .*missing.txt"):
        build_datasets(bad, Tokenizer.from_dir(ckpt))


def _train(ckpt, files, out, steps=6, save_every=3) -> TrainConfig:
    return TrainConfig(stage="pretrain", model=ModelSection(path=str(ckpt)), data=_mix(files),
                       optim=OptimSection(lr=1e-3), schedule=ScheduleSection(kind="constant"),
                       train=TrainSection(output_dir=str(out), max_steps=steps, micro_batch_size=6,
                                          save_every=save_every, keep_last=5, device="cpu", progress=False,
                                          tensorboard=False))


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_training_on_a_mix_resumes_exactly(ckpt, files, tmp_path):
    run_training(_train(ckpt, files, tmp_path / "straight"))
    state = json.loads((tmp_path / "straight" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["sampler"] == {"epoch": 0, "index": 18}  # the mixture's position, saved like the sampler's

    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    run_training(_train(ckpt, files, tmp_path / "resumed"))
    want, got = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert abs(got[step] - want[step]) < 1e-6, (step, got[step], want[step])
