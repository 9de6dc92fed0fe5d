"""Every parameter-efficient method: only its own parameters train, its artifact reloads into a fresh model with the
same outputs, and where PEFT has the method the files round-trip with `peft` (logits equal); plus each method's
defining behaviour (DoRA's decomposition, NF4 storage, AdaLoRA's budget, PRILoRA's ranks and pruning rule, prefix
attention under a KV cache and packing)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.models import load_hf
from lmforge.peft import METHODS, build_method, describe_methods
from lmforge.peft.methods import load_adapter
from lmforge.testing import make_tiny_hf_model

peft = pytest.importorskip("peft")
ATOL = 1e-5


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Directory of a tiny random Llama (GQA, RoPE) written by transformers."""
    path = tmp_path_factory.mktemp("peft") / "llama"
    torch.manual_seed(0)
    make_tiny_hf_model("LlamaForCausalLM", path)
    return path


def _model(path):
    return load_hf(path, progress=False)


def _ref(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _tokens(batch=2, length=10):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _perturb(method, model, std=0.3, seed=3):
    """Move every trained tensor away from its init, so a save/load or a parity check has something to compare."""
    torch.manual_seed(seed)
    for _, p in method.trainable_parameters(model):
        p.add_(torch.randn_like(p) * std)


# Options that keep each method small on the tiny model; expected: substring every trainable name contains.
METHOD_CASES = {
    "lora": (dict(r=4), ("lora_A", "lora_B")),
    "dora": (dict(r=4), ("lora_A", "lora_B", "lora_magnitude_vector")),
    "qlora": (dict(r=4, compute_dtype="float32"), ("lora_A", "lora_B")),
    "prilora": (dict(r_start=2, r_end=6), ("lora_A", "lora_B")),
    "adalora": (dict(init_r=4, target_r=2, total_step=20), ("lora_A", "lora_E", "lora_B")),
    "ia3": (dict(), ("ia3_l",)),
    "bitfit": (dict(), (".bias",)),
    "adapter": (dict(bottleneck=4), ("adapter_", "norm.")),
    "prefix": (dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8), ("prompt_encoder.",)),
    "ptuning_v2": (dict(num_virtual_tokens=3), ("prompt_encoder.",)),
    "prompt_tuning": (dict(num_virtual_tokens=3), ("prompt_encoder.",)),
    "ptuning": (dict(num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8), ("prompt_encoder.",)),
}


def test_every_method_is_registered_and_listed(llama):
    assert set(METHOD_CASES) | {"full"} <= set(METHODS)
    rows = {r["method"]: r for r in describe_methods(_model(llama))}
    for name in METHOD_CASES:
        assert rows[name]["trains"] and rows[name]["artifact"]
        assert isinstance(rows[name]["trainable_params"], int) and rows[name]["trainable_params"] > 0, rows[name]
    assert rows["full"]["trainable_params"] == sum(p.numel() for p in _model(llama).parameters())
    assert rows["ia3"]["trainable_params"] < rows["lora"]["trainable_params"] < rows["full"]["trainable_params"]
    with pytest.raises(ConfigError, match=r"method 'dora': unknown config key 'rnak'"):
        build_method("dora", rnak=4)


@pytest.mark.parametrize("name", list(METHOD_CASES))
def test_only_the_method_parameters_train(llama, name):
    options, expected = METHOD_CASES[name]
    model = _model(llama)
    method = build_method(name, **options)
    method.apply(model)
    trainable = method.trainable_parameters(model)
    assert trainable and all(any(e in n for e in expected) for n, _ in trainable), [n for n, _ in trainable]
    frozen = {n: t.detach().clone() for n, t in model.state_dict().items()}
    opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-2)
    x = _tokens()
    model.train()
    model(x).logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    opt.step()
    trained = {n for n, _ in trainable}
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, frozen[n])}
    assert changed and changed <= trained | {n for n in changed if n.endswith(("_ipt", "_unc", "input_sq"))}, \
        changed - trained
    assert any(n in changed for n in trained)


@pytest.mark.parametrize("name", list(METHOD_CASES))
def test_saved_artifact_reloads_into_a_fresh_model(llama, tmp_path, name):
    options, _ = METHOD_CASES[name]
    model = _model(llama)
    method = build_method(name, **options)
    method.apply(model)
    _perturb(method, model)
    model.eval()
    x = _tokens()
    with torch.no_grad():
        want = model(x)
        assert (want - _model(llama)(x)).abs().max() > 1e-3  # the method changes the outputs
    out = method.save(model, tmp_path / name)
    fresh = _model(llama)
    build_method(name, **options).load(fresh, out)
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if "lora_" not in n and "prompt" not in n
                   and "ia3" not in n and "adapter" not in n and name not in ("bitfit", "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), want, atol=ATOL, rtol=0)
    if name != "qlora":  # the generic loader reads the file alone (QLoRA's quantization is a training choice)
        fresh = _model(llama)
        loaded = load_adapter(fresh, out)
        assert loaded.name == {"prilora": "lora", "ptuning_v2": "prefix"}.get(name, name)
        with torch.no_grad():
            torch.testing.assert_close(fresh.eval()(x), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["lora", "dora", "prilora", "adalora", "ia3", "bitfit", "adapter", "prefix"])
def test_checkpoint_state_restores_exactly(llama, name):
    options, _ = METHOD_CASES[name]
    a, b = _model(llama), _model(llama)
    method = build_method(name, **options)
    method.apply(a)
    method.apply(b)
    _perturb(method, a)
    method.load_state_dict(b, {k: v.clone() for k, v in method.state_dict(a).items()})
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(b.eval()(x), a.eval()(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- PEFT round trips

LMFORGE_TO_PEFT = ["dora", "prilora", "adalora", "ia3", "prefix", "ptuning_v2", "prompt_tuning", "ptuning"]


@pytest.mark.parametrize("name", LMFORGE_TO_PEFT)
@torch.no_grad()
def test_lmforge_adapter_loads_in_peft(llama, tmp_path, name):
    options, _ = METHOD_CASES[name]
    model = _model(llama)
    method = build_method(name, **options)
    method.apply(model)
    _perturb(method, model)
    if name == "adalora":  # prune one triplet so the file carries a rank_pattern
        from lmforge.peft.adalora import svd_layers

        layer = next(iter(svd_layers(model).values()))
        layer.rank_mask[1] = False
        layer.lora_E[1] = 0.0
    out = method.save(model, tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(_ref(llama), out).eval()
    x = _tokens()
    torch.testing.assert_close(pm(x).logits[:, -x.shape[1]:], model.eval()(x), atol=ATOL, rtol=0)


PEFT_CONFIGS = {
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"],
                                    task_type="CAUSAL_LM"),
    "ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM"),
    "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=8,
                                          target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    "prefix": lambda: peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prompt_tuning": lambda: peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "ptuning": lambda: peft.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8, task_type="CAUSAL_LM"),
}


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
@torch.no_grad()
def test_peft_adapter_loads_in_lmforge(llama, tmp_path, name):
    pm = peft.get_peft_model(_ref(llama), PEFT_CONFIGS[name]())
    torch.manual_seed(4)
    for n, p in pm.named_parameters():
        if p.requires_grad:
            p.add_(0.3 * torch.randn_like(p))
    if name == "adalora":  # a pruned allocation, as after training
        pm.peft_config["default"].rank_pattern = {
            f"model.layers.{i}.self_attn.{m}.lora_E": [True, False, True, i == 0] for i in range(2)
            for m in ("q_proj", "v_proj")}
    pm.save_pretrained(tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(_ref(llama), tmp_path / "adapter").eval()
    model = _model(llama)
    build_method(name, **({"total_step": 10} if name == "adalora" else {})).load(model, tmp_path / "adapter")
    x = _tokens()
    want = pm(x).logits[:, -x.shape[1]:]
    assert (want - _ref(llama)(x).logits).abs().max() > 1e-3
    torch.testing.assert_close(model.eval()(x), want, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------- method behaviour


@torch.no_grad()
def test_dora_decomposes_magnitude_and_direction_and_merges(llama, tmp_path):
    from lmforge.peft import DoRALinear, lora_layers

    model = _model(llama)
    x = _tokens()
    base = model(x)
    method = build_method("dora", r=4)
    method.apply(model)
    assert torch.equal(model(x), base)  # B = 0, m = ||W||: exactly the base
    layer = model.layers[0].attn.q_proj
    assert isinstance(layer, DoRALinear)
    torch.testing.assert_close(layer.lora_magnitude_vector, layer.base_layer.weight.norm(dim=1))
    _perturb(method, model)
    # the layer computes m * (W + sBA) / ||W + sBA|| row by row
    w = layer.merged_weight()
    torch.testing.assert_close(w.norm(dim=1), layer.lora_magnitude_vector.abs(), atol=1e-5, rtol=0)
    h = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(h), h @ w.T, atol=1e-5, rtol=0)
    want = model(x)
    out = method.export(model, tmp_path / "merged")
    torch.testing.assert_close(_ref(out)(x).logits, want, atol=1e-4, rtol=0)
    for m in lora_layers(model).values():
        m.merge()
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)
    for m in lora_layers(model).values():
        m.unmerge()
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)
    written = json.loads((method.save(model, tmp_path / "a") / "adapter_config.json").read_text())
    assert written["use_dora"] is True and written["peft_type"] == "LORA"


def test_qlora_stores_the_base_in_nf4_at_about_half_a_byte_per_weight(llama):
    from lmforge.peft.qlora import nf4_bytes
    from lmforge.quant.nf4 import NF4Linear

    model = _model(llama)
    x = _tokens()
    with torch.no_grad():
        base = model(x)
    method = build_method("qlora", r=4, compute_dtype="float32")
    method.apply(model)
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 14 and not isinstance(model.lm_head.base_layer if hasattr(model.lm_head, "base_layer")
                                                else model.lm_head, NF4Linear)
    nbytes, count = nf4_bytes(model)
    assert count == sum(m.in_features * m.out_features for m in layers)
    assert 0.5 < nbytes / count < 0.53  # 4 bits + double-quantized constants (0.5 + 1/64 + tiny)
    with torch.no_grad():
        rel = (model(x) - base).norm() / base.norm()
    assert 0 < rel < 0.1  # 4-bit base: close to, not equal to, the original
    assert all("lora_" in n for n, _ in method.trainable_parameters(model))


def test_nf4_round_trip_error_is_below_uniform_int4_on_normal_data():
    from lmforge.quant.nf4 import dequantize_nf4, quantize_nf4

    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    nf4_err = (dequantize_nf4(quantize_nf4(w, block_size=64)) - w).pow(2).mean()
    blocks = w.view(-1, 64)
    scale = blocks.abs().amax(1, keepdim=True) / 7  # symmetric uniform INT4 with the same block size
    int4_err = ((blocks / scale).round().clamp(-8, 7) * scale - blocks).pow(2).mean()
    assert nf4_err < 0.8 * int4_err


def test_adalora_budget_schedule_and_allocation_to_target(llama):
    from lmforge.peft.adalora import budget_schedule, svd_layers

    assert budget_schedule(2, 48, 24, tinit=2, tfinal=3, total=12, delta_t=1) == (48, False)
    mid = budget_schedule(5, 48, 24, tinit=2, tfinal=3, total=12, delta_t=1)
    assert 24 < mid[0] < 48 and mid[1]
    assert budget_schedule(10, 48, 24, tinit=2, tfinal=3, total=12, delta_t=1) == (24, True)

    model = _model(llama)
    method = build_method("adalora", init_r=6, target_r=3, total_step=12, tinit=2, tfinal=3, alpha=12,
                          target_modules=["q_proj", "v_proj", "down_proj"])
    method.apply(model)
    opt = torch.optim.AdamW([p for _, p in method.trainable_parameters(model)], lr=1e-2)
    model.train()
    for step in range(13):  # the 13th forward observes the 12th step
        model(_tokens()).logsumexp(-1).mean().backward()
        if step < 12:
            opt.step()
            opt.zero_grad(set_to_none=True)
    layers = list(svd_layers(model).values())
    kept = [int(layer.rank_mask.sum()) for layer in layers]
    assert sum(kept) == 3 * len(layers)  # the final budget: target_r per adapter on average
    assert all(int(layer.steps) == 12 for layer in layers)
    for layer in layers:
        assert torch.all(layer.lora_E[~layer.rank_mask] == 0)


def test_prilora_ranks_grow_with_depth_and_pruning_follows_the_importance_rule(llama, tmp_path):
    from lmforge.peft import lora_layers
    from lmforge.peft.prilora import depth_ranks, prune_rows

    assert depth_ranks(5, 4, 12) == [4, 6, 8, 10, 12]
    model = _model(llama)
    method = build_method("prilora", r_start=4, r_end=12, prune_every=2, prune_ratio=0.5)
    method.apply(model)
    ranks = {p: m.r for p, m in lora_layers(model).items()}
    assert {r for p, r in ranks.items() if p.startswith("layers.0.")} == {4}
    assert {r for p, r in ranks.items() if p.startswith("layers.1.")} == {12}

    a = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    norms = torch.tensor([1.0, 1.0, 0.1, 10.0])  # importance = |A| * norm
    prune_rows(a, norms, 0.5)
    assert a.tolist() == [[0.0, -2.0, 0.0, 0.5], [4.0, 0.0, 0.0, 2.0]]

    opt = torch.optim.AdamW([p for _, p in method.trainable_parameters(model)], lr=1e-3)
    model.train()
    for _ in range(2):
        model(_tokens()).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model(_tokens())  # the next training forward sees step 2 done: prune_every=2 prunes now
    for layer in lora_layers(model).values():
        assert (layer.input_sq > 0).all()
        zeros = (layer.lora_A.weight == 0).float().mean(1)
        assert torch.all(zeros >= 0.5 - 1e-6)
    written = json.loads((method.save(model, tmp_path / "a") / "adapter_config.json").read_text())
    assert written["r"] == 12 and set(written["rank_pattern"].values()) == {4}


@torch.no_grad()
def test_ia3_bitfit_adapter_start_as_the_identity_and_export_rules(llama, tmp_path):
    x = _tokens()
    base = _model(llama)(x)
    for name in ("ia3", "bitfit", "adapter"):
        model = _model(llama)
        method = build_method(name, **METHOD_CASES[name][0])
        method.apply(model)
        assert torch.equal(model(x), base), name
    model = _model(llama)
    method = build_method("ia3")
    method.apply(model)
    _perturb(method, model)
    torch.testing.assert_close(_ref(method.export(model, tmp_path / "ia3"))(x).logits, model(x), atol=1e-4, rtol=0)
    model = _model(llama)
    build_method("bitfit").apply(model)
    assert model.layers[0].attn.q_proj.bias is not None and model.layers[0].mlp.down_proj.bias.requires_grad
    with pytest.raises(ConfigError, match="BitFit added biases"):
        build_method("bitfit").export(model, tmp_path / "b")
    model = _model(llama)
    build_method("adapter").apply(model)
    with pytest.raises(ConfigError, match="nonlinear"):
        build_method("adapter").export(model, tmp_path / "c")


# ------------------------------------------------------------------------------ prefix attention: cache, packing


@pytest.mark.parametrize("name", ["prefix", "prompt_tuning"])
@torch.no_grad()
def test_prefix_attention_with_kv_cache_padding_and_packing(llama, name):
    model = _model(llama)
    method = build_method(name, num_virtual_tokens=3)
    method.apply(model)
    _perturb(method, model, std=0.1)
    model.eval()
    x = _tokens(1, 9)
    full = model(x)

    cache = model.new_cache(1, 16)  # prefill 6 tokens, then decode 3 one at a time
    out = [model(x[:, :6], torch.arange(6)[None], cache=cache, slots=torch.arange(6))]
    for t in range(6, 9):
        out.append(model(x[:, t:t + 1], torch.tensor([[t]]), cache=cache, slots=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(out, 1), full, atol=ATOL, rtol=0)

    mask = torch.ones(1, 12, dtype=torch.long)
    mask[:, :3] = 0  # left padding leaves the real tokens' logits unchanged
    padded = model(torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1), attention_mask=mask)
    torch.testing.assert_close(padded[:, 3:], full, atol=ATOL, rtol=0)

    y = _tokens(1, 5)  # two documents packed in one row: each sees the prefix and only itself
    packed = torch.cat([x, y], 1)
    positions = torch.cat([torch.arange(9), torch.arange(5)])[None]
    docs = torch.tensor([[0] * 9 + [1] * 5])
    got = model(packed, positions, document_ids=docs)
    torch.testing.assert_close(got, torch.cat([full, model(y)], 1), atol=ATOL, rtol=0)


def test_prompt_methods_cannot_export_and_init_from_text(llama, tmp_path):
    from lmforge.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "tok")
    model = load_hf(ckpt, progress=False)
    method = build_method("prompt_tuning", num_virtual_tokens=4, init="text", init_text="Hello world",
                          tokenizer=str(ckpt))
    method.apply(model)
    from lmforge.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(ckpt).encode("Hello world")
    ids = (ids * 4)[:4]
    torch.testing.assert_close(model.prompt_encoder.embedding, model.embed.weight[ids])
    with pytest.raises(ConfigError, match="virtual tokens"):
        method.export(model, tmp_path / "x")
    with pytest.raises(ConfigError, match="init_text and tokenizer"):
        build_method("prompt_tuning", init="text")
    with pytest.raises(ConfigError, match="already has a prompt method"):
        build_method("prefix").apply(model)


def test_methods_listing_counts_a_preset_without_weights():
    from lmforge.peft.methods import methods_listing

    text = methods_listing("llama-3.2-1b")  # built on the meta device
    for name in METHOD_CASES:
        assert f"\n{name} " in text
    assert "1,235,814,400 (100%)" in text  # full fine-tuning of Llama-3.2-1B


def test_run_training_selects_a_new_method_by_name(tmp_path):
    from lmforge.data import DataConfig
    from lmforge.testing import make_tiny_checkpoint
    from lmforge.train import TrainConfig, run_training
    from lmforge.train.config import ModelSection, OptimSection, TrainSection

    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                                     {"role": "assistant", "content": f"{i} done"}]}) + "\n"
                            for i in range(16)))
    cfg = TrainConfig(method="dora", model=ModelSection(path=str(ckpt)), data=DataConfig(path=str(data)),
                      optim=OptimSection(lr=1e-3),
                      train=TrainSection(output_dir=str(tmp_path / "run"), max_steps=2, micro_batch_size=4,
                                         device="cpu", progress=False, tensorboard=False))
    result = run_training(cfg)
    written = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert written["use_dora"] is True and math.isfinite(result["loss"])


def test_the_loop_reports_every_optimizer_step_to_adalora_the_last_included(tmp_path):
    """The trainer calls `method.on_step` after each optimizer step: with tfinal=0 the final budget falls on the last
    step, and it is in place when the run ends (no later forward needed to notice that step)."""
    from lmforge.data import DataConfig
    from lmforge.models import ModelConfig, Transformer
    from lmforge.peft.adalora import svd_layers
    from lmforge.train import Trainer, TrainConfig
    from lmforge.train.config import ModelSection, OptimSection, TrainSection

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64))
    method = build_method("adalora", init_r=4, target_r=2, total_step=5, alpha=8)
    method.apply(model)
    g = torch.Generator().manual_seed(0)
    rows = [{"tokens": (t := torch.randint(0, 64, (12,), generator=g).tolist()), "labels": t[1:] + [-100],
             "positions": list(range(12))} for _ in range(8)]
    cfg = TrainConfig(model=ModelSection(tokenizer="x"), data=DataConfig(path="x"), optim=OptimSection(lr=1e-2),
                      train=TrainSection(micro_batch_size=2, max_steps=5, progress=False, tensorboard=False,
                                         precision="fp32", output_dir=str(tmp_path)))
    trainer = Trainer(model, method, rows, None, cfg, pad_id=0, device=torch.device("cpu"))
    for _ in range(5):
        trainer.train_step()
    layers = list(svd_layers(model).values())
    assert all(int(layer.steps) == 5 for layer in layers)
    assert sum(int(layer.rank_mask.sum()) for layer in layers) == 2 * len(layers)  # the target budget
