"""The trainer: accumulation, packing, fp16 overflow, exact resume after SIGKILL, LoRA runs, CLI errors."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmforge.atomic import atomic_dir
from lmforge.cli import main
from lmforge.data import DataConfig, build_datasets
from lmforge.errors import ConfigError, NonFiniteError
from lmforge.models import load_hf
from lmforge.peft.methods import build_method
from lmforge.testing import make_tiny_checkpoint
from lmforge.tokenizer import Tokenizer
from lmforge.train import Trainer, TrainConfig, run_training
from lmforge.train.checkpoint import list_checkpoints
from lmforge.train.config import ModelSection, OptimSection, TrainSection
from lmforge.train.run import write_final


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


def _trainer(cfg, data_cfg=None, method="full", objective=None):
    tok = Tokenizer.from_dir(cfg.model.path)
    train, val, _ = build_datasets(data_cfg or cfg.data, tok)
    model = load_hf(cfg.model.path, progress=False)
    m = build_method(method)
    m.apply(model)
    return Trainer(model, m, train, val, cfg, pad_id=tok.pad_id, device=torch.device("cpu"), objective=objective), model


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


def test_an_objective_sees_the_step_context_not_the_trainer(ckpt, sft_file, tmp_path):
    """Stages get a frozen StepContext: the run's model, data and settings, the steps taken so far, no loop state."""
    from dataclasses import FrozenInstanceError

    from lmforge.train.context import StepContext
    from lmforge.train.objective import LanguageModeling

    seen = []

    class Recording(LanguageModeling):
        def loss_sum(self, ctx, batch, step_units):
            seen.append((type(ctx), ctx.steps_taken()))
            return super().loss_sum(ctx, batch, step_units)

    cfg = _cfg(ckpt, sft_file, tmp_path / "o", micro_batch_size=2, grad_accum=2, max_steps=2)
    trainer, model = _trainer(cfg, objective=Recording())
    trainer.train_step()
    trainer.train_step()
    assert seen == [(StepContext, 0)] * 2 + [(StepContext, 1)] * 2  # two micro-batches per step
    ctx = trainer.ctx
    assert ctx.model is model and ctx.sampler is trainer.sampler and not hasattr(ctx, "optimizer")
    with pytest.raises(FrozenInstanceError):
        ctx.model = None


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
    resumed = subprocess.run(config("killed"), check=True, capture_output=True, text=True, timeout=300)
    step = int(re.search(r"^resumed from .*checkpoint-(\d+) at step \d+ of 14$", resumed.stdout, re.M)[1])
    assert step >= 6 and f"resumed from {tmp_path}/killed/checkpoint-{step} at step {step} of 14" in resumed.stdout
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


# ------------------------------------------------------------------------------------------------ hardening


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmforge.cli", "train", *args, "train.device=cpu", "train.progress=false",
            "train.tensorboard=false"]


def test_non_finite_settings_are_refused_and_a_diverging_run_stops_in_one_line(ckpt, sft_file, tmp_path):
    base = (f"model.path={ckpt}", f"data.path={sft_file}", "data.max_seq_len=64", "train.micro_batch_size=4")
    out = tmp_path / "inf"
    proc = subprocess.run(_cli(*base, "optim.lr=inf", f"train.output_dir={out}"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr == ("lmforge train: error: config key 'optim.lr': Input should be a "
                                                    "finite number (got 'inf')\n")
    assert not out.exists()

    out = tmp_path / "diverge"  # lr 1e30: step 1 blows the weights up, steps 2-4 are NaN
    proc = subprocess.run(_cli(*base, "optim.lr=1e30", f"train.output_dir={out}", "train.max_steps=8",
                               "train.save_every=1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if "error" in x]
    assert line.startswith("lmforge train: error: step 4: loss nan") and "inf/NaN at steps 2-4" in line
    assert f"the last checkpoint, {out / 'checkpoint-1'}, is kept" in line
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"] and not (out / "final").exists()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and [bool(r.get("nonfinite")) for r in records] == [
        False, True, True, True]


def test_a_non_finite_step_is_skipped_and_a_streak_stops_the_run(ckpt, sft_file, tmp_path):
    cfg = _cfg(ckpt, sft_file, tmp_path / "nan", micro_batch_size=4, max_steps=10, save_every=1,
               max_nonfinite_steps=2)
    trainer, model = _trainer(cfg)
    poisoned: set[int] = {2}  # steps whose gradients hold NaN (a bad batch)
    next(model.parameters()).register_hook(lambda g: g * float("nan") if trainer.step + 1 in poisoned else g)

    def state():
        return ({n: p.detach().clone() for n, p in model.named_parameters()},
                [{k: v.clone() for k, v in s.items()} for s in trainer.optimizer.state.values()])

    assert "skipped" not in trainer.train_step()
    params, opt = state()
    rec = trainer.train_step()
    assert rec["skipped"] and rec["nonfinite"] and rec["grad_norm"] != rec["grad_norm"]
    after, opt_after = state()
    assert all(torch.equal(params[n], after[n]) for n in params)  # neither the weights...
    assert all(torch.equal(a[k], b[k]) for a, b in zip(opt, opt_after) for k in a)  # ...nor Adam's moments and step
    assert "nonfinite" not in trainer.train_step()  # one bad batch costs one step; training goes on

    poisoned.update({5, 7, 8})  # a lone bad step (5), then two in a row: the run stops at step 8
    with pytest.raises(NonFiniteError, match=r"^step 8: loss [0-9.]+, gradient norm nan: inf/NaN at steps 7-8 \("):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "nan")] == ["checkpoint-4", "checkpoint-6"]  # none in a streak
    assert not (tmp_path / "nan" / "final").exists()
    from safetensors.torch import load_file

    kept = load_file(str(tmp_path / "nan" / "checkpoint-6" / "trainable.safetensors"))
    assert all(torch.equal(kept[n], p) for n, p in model.state_dict().items())  # steps 7-8 never touched the weights


def test_nothing_non_finite_is_saved(ckpt, sft_file, tmp_path):
    out = tmp_path / "s"
    trainer, model = _trainer(_cfg(ckpt, sft_file, out, micro_batch_size=4, max_steps=3))
    trainer.train_step()
    trainer.save()
    trainer.train_step()
    name, weight = next(iter(model.named_parameters()))
    with torch.no_grad():
        weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=f"^step 2: '{re.escape(name)}' holds inf/NaN, so checkpoint-2 is not"):
        trainer.save()
    with pytest.raises(NonFiniteError, match=f"'{re.escape(name)}' holds inf/NaN: .*final is not written"):
        write_final(out / "final", trainer.method.state_dict(model), lambda tmp: trainer.method.save(model, tmp))
    with torch.no_grad():
        weight[0, 0] = 0.0
    next(iter(trainer.optimizer.state.values()))["exp_avg"].fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=f"^step 2: optimizer state 'exp_avg' of '{re.escape(name)}' holds"):
        trainer.save()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]  # no checkpoint-2, no .tmp, no final


def test_final_is_written_atomically_and_resume_names_its_checkpoint(ckpt, sft_file, tmp_path):
    """A SIGKILL while final/ is being written leaves no final/ (it used to leave a lone model.safetensors); the
    resumed run says where it resumed and writes final/ whole."""
    out = tmp_path / "run"
    args = (f"model.path={ckpt}", f"data.path={sft_file}", "data.max_seq_len=64", "train.micro_batch_size=4",
            f"train.output_dir={out}", "train.max_steps=2")
    killer = ("import os, signal, sys; import lmforge.train.run as run; from lmforge.cli import main\n"
              "run.save_tokenizer_files = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # dies after the weights\n"
              "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", killer, *_cli(*args)[3:]], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists() and (out / "final.tmp" / "model.safetensors").is_file()
    proc = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=300, check=True)
    assert f"resumed from {out / 'checkpoint-2'} at step 2 of 2\n" in proc.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (out / "final").iterdir()}
    assert not (out / "final.tmp").exists()


def test_atomic_dir_keeps_the_previous_directory_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "final"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["final"] and [p.name for p in target.iterdir()] == ["config.json"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(ConfigError, match="is not a model directory"):  # export/quantize never delete user folders
        with atomic_dir(tmp_path / "mine", replace_only_models=True):
            pass
    assert (tmp_path / "mine" / "notes.txt").is_file()


def test_a_torn_metrics_line_does_not_block_resume(ckpt, sft_file, tmp_path):
    out = tmp_path / "torn"
    cfg = _cfg(ckpt, sft_file, out, micro_batch_size=4, max_steps=2, save_every=2)
    run_training(cfg)
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "loss": 4.1, "l')  # killed while logging step 3
    cfg.train.max_steps = 3
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped 1 unreadable line\(s\) \(3\)"):
        run_training(cfg)
    assert sorted(_losses(out)) == [1, 2, 3]
