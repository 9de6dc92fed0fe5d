"""Memory-efficient full fine-tuning optimizers: LOMO and AdaLomo update inside backward and keep no gradients,
BAdam trains (and keeps Adam state for) one block at a time, GaLore keeps Adam moments of rank-r projections."""
from __future__ import annotations

import copy

import pytest
import torch

from lmforge.data import DataConfig
from lmforge.errors import ConfigError
from lmforge.models import ModelConfig, Transformer
from lmforge.peft import build_method
from lmforge.train import Trainer, TrainConfig
from lmforge.train.config import ModelSection, OptimSection, TrainSection
from lmforge.train.optim import OPTIMIZERS, build_optimizer
from lmforge.train.optimizers import AdaLomo, BAdam, GaLore, Lomo, memory_bytes


def _model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, d_ff=64, max_seq_len=32))


def _loss(model, seed=0):
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def test_registered_by_name():
    assert {"lomo", "adalomo", "badam", "galore"} <= set(OPTIMIZERS)
    opt = build_optimizer(list(_model().named_parameters()), OptimSection(name="lomo", lr=0.1))
    assert isinstance(opt, Lomo) and opt.updates_in_backward
    opt.remove_hooks()


def test_lomo_is_sgd_fused_into_backward_with_no_gradients_left():
    model, ref = _model(), _model()
    lomo = Lomo(model.parameters(), lr=0.1)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    _loss(model).backward()
    assert all(p.grad is None for p in model.parameters())  # applied and freed inside backward
    _loss(ref).backward()
    sgd.step()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)
    assert lomo.state == {}  # no optimizer state at all


def test_adalomo_keeps_factored_second_moments_only():
    model = _model()
    opt = AdaLomo(model.parameters(), lr=1e-2)
    first = _loss(model).item()
    for _ in range(20):
        _loss(model).backward()
        assert all(p.grad is None for p in model.parameters())
    assert _loss(model).item() < first - 0.3
    w = model.layers[0].mlp.up_proj.weight  # (64, 32): a row and a column vector, never a full matrix
    assert opt.state[w]["row"].shape == (64,) and opt.state[w]["col"].shape == (32,) and "v" not in opt.state[w]
    state_numel = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    assert state_numel < 0.1 * sum(p.numel() for p in model.parameters())


def test_badam_trains_one_block_at_a_time_with_state_for_it_only():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = BAdam(list(model.named_parameters()), lr=1e-2, switch_every=2, order="descending")
    assert opt.active == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("layers.2.") for n in trainable)
    visited = []
    for step in range(6):
        visited.append(opt.active)
        _loss(model).backward()
        assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(f"layers.{opt.active}."))
        opt.step()
        block_numel = sum(p.numel() for p in opt.blocks[opt.active])
        state_numel = sum(s["exp_avg"].numel() for s in opt.state.values())
        assert state_numel in (0, block_numel)  # Adam moments only for the (possibly new) active block
        opt.zero_grad(set_to_none=True)
    assert visited == [2, 2, 1, 1, 0, 0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("layers.") for n in changed)  # embeddings/head/final norm stay frozen

    saved = copy.deepcopy(opt.state_dict())
    other = BAdam(list(_model().named_parameters()), lr=1e-2, switch_every=2, order="descending")
    other.load_state_dict(saved)
    assert other.active == opt.active and other.steps == 6


def test_galore_updates_are_low_rank_and_projection_refreshes():
    model = _model()
    rank = 4
    opt = GaLore(list(model.named_parameters()), lr=1e-2, rank=rank, update_proj_gap=3, scale=1.0)
    w = model.layers[1].mlp.up_proj.weight  # (64, 32): the shorter side (32) is projected
    projs, losses = [], []
    for step in range(7):
        start = w.detach().clone()
        loss = _loss(model)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.linalg.matrix_rank(w.detach() - start).item() <= rank
        projs.append(opt.state[w]["proj"].clone())
    assert opt.state[w]["adam"]["exp_avg"].shape == (64, rank)
    assert torch.equal(projs[0], projs[2]) and not torch.equal(projs[2], projs[3])  # refreshed every 3 steps
    emb = model.embed.weight
    assert opt.state[emb]["exp_avg"].shape == emb.shape  # non-block matrices: plain AdamW
    assert losses[-1] < losses[0]


def _trainer(optim: OptimSection, **train):
    rows = [{"tokens": list(range(i, i + 16)), "labels": list(range(i + 1, i + 17)), "positions": list(range(16))}
            for i in range(8)]
    cfg = TrainConfig(model=ModelSection(tokenizer="x"), data=DataConfig(path="x"), optim=optim,
                      train=TrainSection(micro_batch_size=4, max_steps=5, device="cpu", progress=False,
                                         tensorboard=False, precision=train.pop("precision", "fp32"), **train))
    model = _model()
    method = build_method("full")
    method.apply(model)
    return Trainer(model, method, rows, None, cfg, pad_id=0, device=torch.device("cpu")), model


@pytest.mark.parametrize("name", ["lomo", "adalomo", "badam", "galore"])
def test_trainer_drives_each_optimizer(name):
    trainer, model = _trainer(OptimSection(name=name, lr=1e-2))
    losses = [trainer.train_step()["loss"] for _ in range(5)]
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.parameters())


def test_fused_optimizers_refuse_accumulation_and_fp16():
    with pytest.raises(ValueError, match="grad_accum=1"):
        _trainer(OptimSection(name="lomo", lr=1e-2), grad_accum=2)
    with pytest.raises(ValueError, match="fp16"):
        _trainer(OptimSection(name="adalomo", lr=1e-2), precision="fp16")
    with pytest.raises(ConfigError, match="no transformer blocks"):
        BAdam([("w", torch.nn.Parameter(torch.zeros(2, 2)))], lr=1e-2)


def test_memory_formulas_rank_the_optimizers():
    d, f, layers = 2048, 8192, 16  # a 1B-class shape
    shapes = [(d, d)] * 4 * layers + [(f, d), (f, d), (d, f)] * layers
    adamw = memory_bytes("adamw", shapes, grad_bytes=2)
    assert memory_bytes("badam", shapes, grad_bytes=2, n_blocks=layers) == pytest.approx(adamw / layers, rel=0.01)
    assert memory_bytes("lomo", shapes, grad_bytes=2) == f * d * 2
    assert memory_bytes("adalomo", shapes, 2) < memory_bytes("galore", shapes, 2, rank=256) < adamw
