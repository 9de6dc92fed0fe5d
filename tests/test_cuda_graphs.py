"""`train.cuda_graphs`: the whole optimizer step captured as one CUDA graph. On CPU the same fixed-shape step runs
eagerly (padding to PAD_MULTIPLE, every row through the loss with ignored targets weighted 0, loss scale as a
tensor) and must train exactly like the default step; on a GPU the replayed graphs must reproduce the eager loss
curve, learning-rate schedule and bias correction included."""
from __future__ import annotations

import pytest
import torch

from lmforge.data import DataConfig
from lmforge.errors import ConfigError
from lmforge.models import ModelConfig, Transformer
from lmforge.peft import build_method
from lmforge.train import Trainer, TrainConfig
from lmforge.train.config import ModelSection, OptimSection, ScheduleSection, TrainSection
from lmforge.train.graphs import PAD_MULTIPLE

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rows(n=12, seed=0):
    """SFT-like rows of different lengths, the first tokens of each unlabelled (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 9 + 5 * (i % 4)
        tokens = torch.randint(0, 64, (length,), generator=g).tolist()
        labels = [-100] * 3 + tokens[4:] + [-100]
        rows.append({"tokens": tokens, "labels": labels, "positions": list(range(length))})
    return rows


def _trainer(device="cpu", method="lora", optim="adamw", dtype=torch.float32, heads=(4, 2), **train):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=heads[0], n_kv_heads=heads[1],
                                    d_ff=64, max_seq_len=512)).to(device=device, dtype=dtype)
    m = build_method(method, **({"r": 4, "alpha": 8, "target_modules": "all-linear"} if method == "lora" else {}))
    m.apply(model)
    if method == "lora":  # LoRA B starts at zero: give it weights so every path carries gradient from step one
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    cfg = TrainConfig(model=ModelSection(tokenizer="x"), data=DataConfig(path="x"),
                      optim=OptimSection(name=optim, lr=1e-2, weight_decay=0.01),
                      schedule=ScheduleSection(warmup_steps=3, kind="cosine"),
                      train=TrainSection(micro_batch_size=3, max_steps=8, device=device, progress=False,
                                         tensorboard=False, precision=train.pop("precision", "fp32"), **train))
    return Trainer(model, m, _rows(), None, cfg, pad_id=0, device=torch.device(device))


def _curve(trainer, steps=8):
    return [trainer.train_step() for _ in range(steps)]


@pytest.mark.parametrize("accum", [1, 2])
def test_fixed_shape_step_trains_like_the_default_step_on_cpu(accum):
    with pytest.warns(UserWarning, match="needs a CUDA device"):
        graphed = _trainer(cuda_graphs=True, grad_accum=accum, activation_checkpointing=True)
    plain = _trainer(grad_accum=accum, activation_checkpointing=True)
    a, b = _curve(graphed), _curve(plain)
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        assert x["lr"] == y["lr"] and x["target_tokens"] == y["target_tokens"]
    assert a[-1]["loss"] < a[0]["loss"] - 0.05  # it learns
    rows = [graphed._with_flags(graphed.objective.collate(graphed.ctx.next_rows(), graphed.ctx)) for _ in range(3)]
    assert all(r["tokens"].shape[1] == PAD_MULTIPLE and r["plain_causal"] for r in rows)  # one shape: one graph


@pytest.mark.parametrize("bad, match", [
    (dict(optim="sgd"), "optim.name=sgd"),
    (dict(precision="fp16"), "precision=fp16"),
])
def test_uncapturable_settings_are_refused_in_one_line(bad, match):
    with pytest.raises(ConfigError, match=match) as err:
        _trainer(cuda_graphs=True, **bad)
    assert "train.cuda_graphs=false" in str(err.value) and "\n" not in str(err.value)


@CUDA
@pytest.mark.parametrize("method, optim, ckpt, compile_, accum", [
    ("lora", "adamw", True, False, 1),
    ("lora", "adamw", False, True, 1),
    ("full", "adamw", True, False, 2),  # two micro-batches in one graph: the second accumulates into the first's
    ("full", "adamw_backward", True, True, 1),
])
def test_replayed_graphs_reproduce_the_eager_curve(method, optim, ckpt, compile_, accum):
    kw = dict(device="cuda", method=method, optim=optim, activation_checkpointing=ckpt, compile=compile_,
              precision="bf16", grad_accum=accum, **({"grad_clip": None} if optim == "adamw_backward" else {}))
    graphed, eager = _trainer(cuda_graphs=True, **kw), _trainer(cuda_graphs=True, **kw)
    eager.graphs.enabled = False  # the same fixed-shape step, run eagerly every time: the same kernels
    a, b = _curve(graphed), _curve(eager)
    assert graphed.graphs.replays == 7 and eager.graphs.replays == 0  # graphed: step 1 eager, 2 captured, replays
    for x, y in zip(a, b):  # equal up to atomics in the backward (the learning rate and AdamW's step are tensors)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
    assert a[-1]["loss"] < a[0]["loss"]
    for p, q in zip(graphed.model.parameters(), eager.model.parameters()):  # the schedule and AdamW's step count
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


@CUDA
def test_packed_rows_run_eagerly_under_cuda_graphs():
    trainer = _trainer(device="cuda", cuda_graphs=True, precision="bf16", heads=(2, 1))  # flex needs head dim 16
    for row in trainer.train_data:  # two documents per row, positions restarting at the second
        n, cut = len(row["tokens"]), len(row["tokens"]) // 2
        row["document_ids"] = [0] * cut + [1] * (n - cut)
        row["positions"] = list(range(cut)) + list(range(n - cut))
    with pytest.warns(UserWarning, match="packed rows"):
        losses = [r["loss"] for r in _curve(trainer, 4)]
    assert trainer.graphs.replays == 0 and not trainer.graphs.captured
    assert losses[-1] < losses[0]


@CUDA
@pytest.mark.gpu
def test_a_non_finite_step_is_skipped_on_the_device_eagerly_and_in_replayed_graphs():
    """Fused AdamW skips a step whose gradient norm is inf/NaN through its found_inf flag: weights, Adam's moments and
    its step count stay as they were, with no host sync, so a captured graph skips it too (step 4, a replay)."""
    curves = []
    for replay in (True, False):
        trainer = _trainer(device="cuda", method="full", cuda_graphs=True, precision="bf16")
        trainer.graphs.enabled = replay
        assert trainer.skips_on_device  # fused AdamW on CUDA
        poison = torch.ones((), device="cuda")  # a device tensor: the captured hook reads its current value
        next(p for _, p in trainer.params).register_hook(lambda g: g * poison)
        recs = []
        for step in range(1, 8):
            poison.fill_(float("nan") if step == 4 else 1.0)
            before = [p.detach().clone() for _, p in trainer.params]
            state = [{k: v.clone() for k, v in s.items()} for s in trainer.optimizer.state.values()]
            rec = trainer.train_step()
            changed = any(not torch.equal(a, p) for a, (_, p) in zip(before, trainer.params))
            if step == 4:
                assert rec["skipped"] and rec["nonfinite"] and not changed
                assert all(torch.equal(s[k], t[k]) for s, t in zip(state, trainer.optimizer.state.values()) for k in s)
            else:
                assert "skipped" not in rec and changed
            recs.append(rec)
        assert trainer.graphs.replays == (6 if replay else 0)
        curves.append(recs)
    for x, y in zip(*curves):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
