"""Mixture of experts: routing, the auxiliary losses, LoRA on experts, checkpointing, and a tiny MoE that learns."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.models import ModelConfig, Transformer, converter_for, load_hf
from lmforge.models.moe import MoE, RouterLinear, load_balancing_loss, router_z_loss, routing_stats
from lmforge.peft.lora import LoraConfig, apply_lora, linear_modules, lora_layers
from lmforge.testing import make_tiny_hf_model


def _cfg(**overrides) -> ModelConfig:
    base = dict(arch="MixtralForCausalLM", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                mlp="moe", moe_experts=4, moe_top_k=2, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


def _model(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(_cfg(**overrides))
    with torch.no_grad():  # default init gives near-uniform routing; spread the router so top-k choices are distinct
        for m in model.modules():
            if isinstance(m, RouterLinear):
                m.weight.normal_(0, 0.5)
    return model


ROUTING = {
    "mixtral": {},
    "top1": dict(moe_top_k=1),
    "qwen_shared_gated_unnormalized": dict(moe_norm_topk=False, moe_shared_d_ff=40, moe_shared_gate=True),
    "shared_ungated": dict(moe_shared_d_ff=40),
    "gelu_experts": dict(act="gelu_tanh"),
}


@pytest.mark.parametrize("mode", ["sorted", "dense"])
@pytest.mark.parametrize("variant", sorted(ROUTING))
@torch.no_grad()
def test_each_token_gets_the_weighted_sum_of_its_top_k_experts(variant, mode):
    model = _model(**ROUTING[variant]).eval()
    moe: MoE = model.layers[0].mlp
    moe.dispatch_mode = mode
    cfg = model.cfg
    x = torch.randn(2, 7, cfg.d_model)
    y = moe(x)
    for b in range(2):  # the reference: one token at a time, every chosen expert called on its own
        for t in range(7):
            xt = x[b, t]
            probs = torch.softmax(xt @ moe.router.weight.T, -1)
            w, idx = probs.topk(cfg.moe_top_k)
            if cfg.moe_norm_topk:
                w = w / w.sum()
            want = sum(wj * moe.experts[int(j)](xt) for wj, j in zip(w, idx))
            if moe.shared_expert is not None:
                gate = torch.sigmoid(xt @ moe.shared_expert_gate.weight.T) if cfg.moe_shared_gate else 1.0
                want = want + gate * moe.shared_expert(xt)
            torch.testing.assert_close(y[b, t], want, atol=1e-5, rtol=0)
    assert (moe.expert_counts > 0).sum() >= 3  # the test really routes to several experts
    assert int(moe.expert_counts.sum()) == 14 * cfg.moe_top_k  # capacity-free: no assignment dropped


@torch.no_grad()
def test_no_token_is_dropped_when_every_token_picks_the_same_expert():
    model = _model(moe_top_k=1).eval()
    moe = model.layers[0].mlp
    moe.router.weight.zero_()
    moe.router.weight[2, 0] = 50.0
    x = torch.randn(1, 9, 32)
    x[..., 0] = x[..., 0].abs() + 1  # every token's logit for expert 2 is the largest
    y = moe(x)
    assert moe.expert_counts.tolist() == [0, 0, 9, 0]
    torch.testing.assert_close(y, moe.experts[2](x), atol=1e-5, rtol=0)  # top-1 renormalized weight is 1


def test_load_balancing_and_z_loss_equal_hand_computed_values():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0],
                           [0.5, 3.0, -0.5, 0.0],
                           [1.0, -2.0, 4.0, 0.5]])
    E, k = 4, 2

    def by_hand(rows):
        probs = [[math.exp(v) / sum(math.exp(u) for u in r) for v in r] for r in rows]
        top = [sorted(range(E), key=lambda e: -p[e])[:k] for p in probs]
        f = [sum(e in t for t in top) / len(rows) for e in range(E)]
        P = [sum(p[e] for p in probs) / len(rows) for e in range(E)]
        z = sum(math.log(sum(math.exp(v) for v in r)) ** 2 for r in rows) / len(rows)
        return E * sum(fe * pe for fe, pe in zip(f, P)), z

    rows = logits.tolist()
    balance, z = by_hand(rows)
    assert load_balancing_loss(logits, k).item() == pytest.approx(balance, rel=1e-6)
    assert router_z_loss(logits).item() == pytest.approx(z, rel=1e-6)
    valid = torch.tensor([True, True, False])  # padding tokens do not count
    balance01, z01 = by_hand(rows[:2])
    assert load_balancing_loss(logits, k, valid).item() == pytest.approx(balance01, rel=1e-6)
    assert router_z_loss(logits, valid).item() == pytest.approx(z01, rel=1e-6)
    # bounds that make the loss meaningful: k when perfectly balanced, E * k when everything collapses
    assert load_balancing_loss(torch.zeros(8, E), k).item() == pytest.approx(k)


def test_model_aux_loss_is_the_mean_over_layers_in_training_only():
    model = _model(moe_z_loss_weight=0.1).train()
    tokens = torch.randint(0, 64, (2, 9))
    positions = torch.arange(9).expand(2, 9).clone()
    positions[1, 6:] = -1  # padding in row 1
    model(tokens, positions)
    valid = (positions >= 0).reshape(-1)
    want = torch.stack([load_balancing_loss(b.mlp.router_logits, 2, valid)
                        + 0.1 * router_z_loss(b.mlp.router_logits, valid) for b in model.layers]).mean()
    torch.testing.assert_close(model.aux_loss, want)
    model.aux_loss.backward()  # it trains the routers
    assert all(b.mlp.router.weight.grad.abs().sum() > 0 for b in model.layers)
    model.eval()
    with torch.no_grad():
        model(tokens)
    assert model.aux_loss is None


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Qwen2MoeForCausalLM"])
def test_single_layer_aux_loss_matches_transformers(arch, tmp_path):
    """transformers pools router statistics over layers before the product; for one layer the two forms agree."""
    torch.manual_seed(0)
    extra = {"mlp_only_layers": [], "layer_types": ["full_attention"]} if arch.startswith("Qwen") else {}
    ref = make_tiny_hf_model(arch, tmp_path, num_hidden_layers=1, **extra)
    model = load_hf(tmp_path, progress=False).train()
    tokens = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        want = ref(tokens, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   output_router_logits=True).aux_loss
        model(tokens, attention_mask=mask)
    torch.testing.assert_close(model.aux_loss, want, atol=1e-6, rtol=1e-5)


def test_lora_targets_experts_by_name_and_leaves_the_router_alone():
    model = _model()
    tokens = torch.randint(0, 64, (2, 8))
    base = model(tokens).detach()
    targets = apply_lora(model, LoraConfig(r=4, target_modules=r".*experts.*"))
    assert len(targets) == 2 * 4 * 3 and all(".mlp.experts." in t for t in targets)
    assert "layers.1.mlp.experts.3.down_proj" in targets
    torch.testing.assert_close(model(tokens), base)  # B = 0 at init
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    out = model(tokens)
    assert (out - base).abs().max() > 1e-3
    out.logsumexp(-1).mean().backward()
    grads = [layer.lora_A.weight.grad for layer in lora_layers(model).values()]
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) >= len(grads) // 2
    assert model.layers[0].mlp.router.weight.grad is None  # frozen, like every non-LoRA weight
    # "all-linear" covers experts and attention but not the routers (they are not linears, as in PEFT)
    names = list(linear_modules(_model()))
    assert not any("router" in n or "shared_expert_gate" in n for n in names)
    assert len(names) == 2 * (4 + 4 * 3) + 1


def test_expert_module_names_map_to_hf_checkpoint_names():
    mixtral, qwen = converter_for("MixtralForCausalLM"), converter_for("Qwen2MoeForCausalLM")
    assert mixtral.hf_module_name("layers.1.mlp.experts.3.gate_proj") == "model.layers.1.block_sparse_moe.experts.3.w1"
    assert mixtral.native_module_name("model.layers.0.block_sparse_moe.experts.2.w2") == "layers.0.mlp.experts.2.down_proj"
    assert qwen.hf_module_name("layers.0.mlp.shared_expert.up_proj") == "model.layers.0.mlp.shared_expert.up_proj"


def test_activation_checkpointing_keeps_gradients_and_aux_loss():
    model = _model(n_layers=3, moe_z_loss_weight=0.5).train()
    tokens = torch.randint(0, 64, (2, 8))

    def grads(every):
        model.zero_grad()
        model.checkpoint_every = every
        (model(tokens).logsumexp(-1).mean() + model.aux_loss).backward()
        return [p.grad.clone() for p in model.parameters()]

    for g0, g1 in zip(grads(0), grads(1)):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=0)


def test_parameter_count_with_dense_layers_and_shared_expert():
    cfg = _cfg(n_layers=3, moe_dense_layers=(1,), moe_d_ff=24, moe_shared_d_ff=40, moe_shared_gate=True)
    model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert not isinstance(model.layers[1].mlp, MoE) and isinstance(model.layers[2].mlp, MoE)
    per_token = cfg.num_params(active=True)
    assert per_token == cfg.num_params() - 2 * (4 - 2) * 3 * 32 * 24  # two MoE layers, two idle experts each


@pytest.mark.parametrize("bad,match", [
    (dict(moe_top_k=5), "moe_top_k"),
    (dict(mlp="swiglu"), "mlp is not 'moe'"),
    (dict(moe_shared_gate=True), "moe_shared_gate needs a shared expert"),
    (dict(moe_dense_layers=(7,)), "moe_dense_layers has layer index 7"),
])
def test_bad_moe_configs_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**bad)


def test_tiny_moe_learns_the_quickstart_text_and_uses_its_experts(tmp_path):
    """Pretrain a 2-layer, 4-expert MoE through the real trainer (aux loss on): the loss falls and routing stays
    spread over the experts."""
    from lmforge.data import DataConfig
    from lmforge.quickstart import QuickstartConfig, make_data, make_tokenizer
    from lmforge.train import TrainConfig, run_training
    from lmforge.train.config import ModelSection, OptimSection, ScheduleSection, TrainSection

    files = make_data(tmp_path / "data", QuickstartConfig(eval_prompts=10))
    tok_dir = make_tokenizer(tmp_path / "tok", files)
    moe = dict(arch="MixtralForCausalLM", d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, mlp="moe",
               moe_experts=4, moe_top_k=2, max_seq_len=64)
    cfg = TrainConfig(
        stage="pretrain", method="full", model=ModelSection(tokenizer=str(tok_dir), config=moe),
        data=DataConfig(path=str(files["pretrain"]), format="text", text_mode="lines", max_seq_len=64, packing=True,
                        val_split=0.0),
        optim=OptimSection(lr=5e-3), schedule=ScheduleSection(warmup_steps=5),
        train=TrainSection(output_dir=str(tmp_path / "run"), max_steps=30, micro_batch_size=4, device="cpu",
                           precision="fp32", save_every=0, log_every=1, progress=False, tensorboard=False,
                           aux_loss_coef=0.02),
    )
    result = run_training(cfg)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)  # ~5.6 -> ~3.0

    model = result["model"].eval()
    tok = result["tokenizer"]
    lines = files["pretrain"].read_text().splitlines()[:32]
    batch = torch.nn.utils.rnn.pad_sequence([torch.tensor(tok.encode(s)[:64]) for s in lines], batch_first=True)
    with torch.no_grad():
        model(batch)
    stats = routing_stats(model)
    assert len(stats) == 2
    for layer in stats.values():
        assert layer["entropy"] > 0.6, stats  # 1.0 = all four experts equally used
        assert min(layer["load"]) > 0.02, stats
    back = load_hf(result["output"], progress=False)  # saved as a Mixtral checkpoint
    assert back.cfg.mlp == "moe" and back.cfg.moe_experts == 4
