"""The trainer: accumulation, packing, fp16 overflow, exact resume after SIGKILL, LoRA runs, CLI errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.data import DataConfig, build_datasets
from lmforge.models import load_hf
from lmforge.peft.methods import build_method
from lmforge.testing import make_tiny_checkpoint
from lmforge.tokenizer import Tokenizer
from lmforge.train import Trainer, TrainConfig, run_training
from lmforge.train.config import ModelSection, OptimSection, TrainSection


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("train") / "tiny")


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    rows = []
    for i in range(40):
        words = " ".join(["alpha", "beta", "gamma", "delta"][: 1 + i % 4])
        rows.append({"messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": f"count {i}: {words}"},
                                  {"role": "assistant", "content": f"{words} done {i % 7}"}]})
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(ckpt, data, out, **train) -> TrainConfig:
    return TrainConfig(model=ModelSection(path=str(ckpt)), data=DataConfig(path=str(data), max_seq_len=64),
                       optim=OptimSection(**train.pop("optim", {})),
                       train=TrainSection(output_dir=str(out), device="cpu", progress=False, tensorboard=False,
                                          **train))


def _trainer(cfg, data_cfg=None, method="full"):
    tok = Tokenizer.from_dir(cfg.model.path)
    train, val, _ = build_datasets(data_cfg or cfg.data, tok)
    model = load_hf(cfg.model.path, progress=False)
    m = build_method(method)
    m.apply(model)
    return Trainer(model, m, train, val, cfg, pad_id=tok.pad_id, device=torch.device("cpu")), model


def test_accumulation_of_4x2_equals_one_batch_of_8(ckpt, sft_file, tmp_path):
    """Loss is normalised by the step's target tokens, so splitting a batch changes nothing (SGD shows raw grads)."""
    results = []
    for mbs, accum in ((8, 1), (2, 4)):
        cfg = _cfg(ckpt, sft_file, tmp_path / f"{mbs}x{accum}", micro_batch_size=mbs, grad_accum=accum, max_steps=1,
                   grad_clip=None, optim={"name": "sgd", "lr": 1.0})
        trainer, model = _trainer(cfg)
        rec = trainer.train_step()
        results.append((rec["loss"], {n: p.detach().clone() for n, p in model.named_parameters()}))
    (loss_a, params_a), (loss_b, params_b) = results
    assert abs(loss_a - loss_b) < 1e-5
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], atol=1e-5, rtol=0)


def test_packed_and_unpacked_loss_are_equal(ckpt, sft_file, tmp_path):
    cfg = _cfg(ckpt, sft_file, tmp_path / "p", micro_batch_size=4)
    losses = []
    for packing in (False, True):
        data_cfg = DataConfig(path=str(sft_file), max_seq_len=128, packing=packing, val_split=0.5)
        trainer, _ = _trainer(cfg, data_cfg)
        assert trainer.val_data.packed == packing
        losses.append(trainer.evaluate()["eval_loss"])
    assert abs(losses[0] - losses[1]) < 1e-5


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(ckpt, sft_file, tmp_path):
    cfg = _cfg(ckpt, sft_file, tmp_path / "fp16", precision="fp16", micro_batch_size=4, max_steps=2)
    trainer, model = _trainer(cfg)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # scaled loss overflows fp32 → inf grads
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec = trainer.train_step()
    assert rec.get("skipped") is True and trainer.scaler.get_scale() < 2.0 ** 127
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed on a skipped step"
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert "skipped" not in trainer.train_step()  # a normal scale trains again
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_sigkill_and_resume_reproduce_the_uninterrupted_loss_curve(ckpt, sft_file, tmp_path):
    def config(out):
        path = tmp_path / f"{out}.yaml"
        path.write_text(f"model: {{path: {ckpt}}}\ndata: {{path: {sft_file}, max_seq_len: 64}}\n"
                        f"optim: {{lr: 1.0e-3}}\nlora: {{r: 4, alpha: 8, dropout: 0.1}}\nmethod: lora\n"
                        f"train: {{output_dir: {tmp_path / out}, max_steps: 14, micro_batch_size: 3, grad_accum: 2, "
                        f"save_every: 2, device: cpu, progress: false, tensorboard: false}}\n")
        return [sys.executable, "-m", "lmforge.cli", "train", str(path)]

    subprocess.run(config("straight"), check=True, capture_output=True, timeout=300)
    want = _losses(tmp_path / "straight")
    assert sorted(want) == list(range(1, 15))

    proc = subprocess.Popen(config("killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (tmp_path / "killed" / "checkpoint-6").is_dir():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    subprocess.run(config("killed"), check=True, capture_output=True, timeout=300)  # resumes from the last checkpoint
    got = _losses(tmp_path / "killed")
    assert sorted(got) == sorted(want)
    for step in want:
        assert abs(got[step] - want[step]) < 1e-6, (step, got[step], want[step])


def test_lora_run_learns_and_writes_a_peft_adapter_and_checkpoints(ckpt, sft_file, tmp_path):
    cfg = _cfg(ckpt, sft_file, tmp_path / "lora", max_steps=12, micro_batch_size=8, save_every=4, keep_last=2,
               optim={"lr": 5e-3})
    cfg = cfg.model_copy(update={"method": "lora"})
    cfg.data.val_split = 0.2
    result = run_training(cfg)
    losses = _losses(tmp_path / "lora")
    assert losses[12] < losses[1] - 0.3  # a random tiny model with a frozen random head: it moves, slowly
    final = Path(result["output"])
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert (final / "tokenizer.json").is_file()
    ckpts = sorted(p.name for p in (tmp_path / "lora").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-12", "checkpoint-8"]  # keep_last=2, no .tmp leftovers
    assert "eval_loss" in json.loads((tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()[-1])

    out = tmp_path / "merged"
    assert main(["export", str(ckpt), "--adapter", str(final), "--out", str(out)]) == 0
    merged = load_hf(out, progress=False)
    tokens = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), result["model"](tokens), atol=1e-4, rtol=0)


def test_bad_training_config_is_one_line(ckpt, sft_file, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"model: {{path: {ckpt}}}\ndata: {{path: {sft_file}}}\ntrain: {{lr: 1e-3}}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.lr'" in err and err.count("\n") == 1
    assert main(["train", str(cfg), "train.lr=null"]) == 2  # overrides can't sneak unknown keys in either
    cfg.write_text(f"model: {{path: {ckpt}}}\ndata: {{path: {sft_file}}}\nmethod: lroa\n")
    assert main(["train", str(cfg)]) == 2
    assert "did you mean 'lora'" in capsys.readouterr().err
