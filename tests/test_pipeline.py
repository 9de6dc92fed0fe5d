"""Pipeline stages, in one process: chained stages compute exactly the model's loss and gradients for every position
scheme, mask and layer split; stage splits and unsupported setups fail with one-line errors. (Schedules over real
ranks: tests/test_distributed.py.)"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.models import ModelConfig, Transformer
from lmforge.train.distributed import ParallelSection
from lmforge.train.loss import causal_lm_loss_sum
from lmforge.train.objective import LanguageModeling
from lmforge.train.pipeline import PipelineStageModule, check_pipeline, release_other_stages, stage_bounds

BASE = dict(vocab_size=64, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
            tie_embeddings=False)
VARIANTS = {
    "llama": {},
    "learned+layernorm+gelu": dict(pos="learned", norm="layer", mlp="gelu", act="gelu", qkv_bias=True),
    "alibi": dict(pos="alibi", embed_norm=True),
    "sinusoidal": dict(pos="sinusoidal"),
    "sliding-window-layers": dict(sliding_window=5, sliding_window_layers=[1, 3]),
    "gemma-like": dict(scale_embeddings=True, norm_weight_offset=1.0, act="gelu_tanh"),
}


def _batch(packed: bool):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (3, 16), generator=g)
    positions = torch.arange(16).repeat(3, 1)
    positions[1, 11:] = -1  # a padded row
    labels = torch.randint(0, 64, (3, 16), generator=g)
    labels[1, 11:] = -100
    labels[:, :3] = -100  # prompt tokens
    docs = None
    if packed:  # two documents in row 0
        positions[0, 7:] = torch.arange(9)
        docs = torch.zeros(3, 16, dtype=torch.long)
        docs[0, 7:] = 1
        docs[1, 11:] = -1
    return tokens, positions, labels, docs


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chained_stages_equal_the_model(variant, packed):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BASE, **VARIANTS[variant])).train()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases, so a skipped one would show
            p.add_(0.1 * torch.randn_like(p))
    tokens, positions, labels, docs = _batch(packed)
    want = causal_lm_loss_sum(model.logits, model.hidden_states(tokens, positions, document_ids=docs), labels,
                              head_weight=model.head_weight())
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    bounds = stage_bounds(model.cfg.n_layers, 3)
    stages = [PipelineStageModule(model, a, b, first=i == 0, last=i == 2) for i, (a, b) in enumerate(bounds)]
    x = tokens
    for st in stages:
        extra = {"document_ids": docs} if docs is not None else {}
        x = st(x, positions, labels=labels if st.last else None, **extra)
        if not st.last:  # what a receiving stage gets: a fresh leaf, gradient flowing back by hand
            x = x.detach().requires_grad_(True)
    assert torch.allclose(x, want, rtol=1e-6, atol=1e-6)

    # backward stage by stage, as the schedule does: each stage's input gradient is the previous stage's output grad
    model.zero_grad()
    x, outs = tokens, []
    for st in stages:
        extra = {"document_ids": docs} if docs is not None else {}
        inp = x
        x = st(x, positions, labels=labels if st.last else None, **extra)
        outs.append((inp, x))
        if not st.last:
            x = x.detach().requires_grad_(True)
    grad = None
    for inp, out in reversed(outs):
        out.backward(grad)
        grad = inp.grad if inp.is_floating_point() else None
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want_grads[n], rtol=1e-5, atol=1e-6), n


def test_stage_keeps_the_model_names_and_releases_the_rest():
    model = Transformer(ModelConfig(**BASE))
    full = set(model.state_dict())
    first = PipelineStageModule(model, 0, 2, first=True, last=False)
    assert set(first.state_dict()) == {k for k in full if k.startswith(("embed.", "layers.0.", "layers.1."))}
    last = PipelineStageModule(model, 2, 5, first=False, last=True)
    assert set(last.state_dict()) | set(first.state_dict()) == full  # together: exactly the model, same FQNs
    release_other_stages(model, last)
    assert model.embed.weight.device.type == "meta" and model.layers[1].attn.q_proj.weight.device.type == "meta"
    assert all(p.device.type == "cpu" for p in last.parameters())


def test_stage_bounds():
    assert stage_bounds(5, 2) == [(0, 2), (2, 5)]
    assert stage_bounds(32, 4) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert [b - a for a, b in stage_bounds(7, 3)] == [2, 3, 2]
    with pytest.raises(ConfigError, match="at most 2 stages"):
        stage_bounds(2, 3)


def _fake_context(model_cfg: dict | None = None, objective=None, precision="fp32", mbs=4, accum=2, **parallel):
    model = SimpleNamespace(cfg=ModelConfig(**{**BASE, **(model_cfg or {})}))
    return SimpleNamespace(model=model, backbone=model,  # the backbone: the model itself here
                           cfg=SimpleNamespace(parallel=ParallelSection(pipeline=2, **parallel)),
                           objective=objective or LanguageModeling(), precision=precision,
                           t=SimpleNamespace(micro_batch_size=mbs, grad_accum=accum))


@pytest.mark.parametrize("ctx,match", [
    (_fake_context({"tie_embeddings": True}), "tie_embeddings"),
    (_fake_context(precision="fp16"), "train.precision=bf16"),
    (_fake_context(zero=1), "parallel.zero=2 or 3"),
    (_fake_context(micro_batches=3), "must divide"),
    (_fake_context(accum=1), "at least parallel.pipeline=2 micro-batches"),
    (_fake_context(objective=type("Pairs", (LanguageModeling,), {})()), "language-modelling"),
], ids=["tied", "fp16", "zero1", "uneven", "1f1b-too-few", "objective"])
def test_unsupported_pipeline_setups_fail_with_one_line(ctx, match):
    with pytest.raises(ConfigError, match=match) as e:
        check_pipeline(ctx)
    assert "\n" not in str(e.value)
    check_pipeline(_fake_context())  # the default setup passes
    check_pipeline(_fake_context(accum=1, pipeline_schedule="gpipe"))  # GPipe runs any number of micro-batches
