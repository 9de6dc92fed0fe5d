"""LoRA layers, the method seam, and PEFT-format adapters checked against `peft` + `transformers` as oracles."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lmforge.errors import CheckpointError, ConfigError
from lmforge.models import load_hf
from lmforge.peft import (METHODS, FullMethod, LoraConfig, LoRALinear, LoraMethod, apply_lora, build_method,
                          load_peft_adapter, lora_layers, lora_state_dict, merge_lora, save_peft_adapter)
from lmforge.testing import make_tiny_hf_model

peft = pytest.importorskip("peft")
ATOL = 1e-4


def _tiny(arch, tmp_path):
    """(transformers model, lmforge model) with the same random weights."""
    torch.manual_seed(0)
    ref = make_tiny_hf_model(arch, tmp_path / arch)
    return ref, load_hf(tmp_path / arch, progress=False)


def _tokens():
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _randomize(model, std=0.1, seed=2):
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B.weight, std=std)


# ------------------------------------------------------------------------------------------------ the layer itself


@torch.no_grad()
def test_zero_init_exact_then_merge_unmerge_and_export_linears(tmp_path):
    _, model = _tiny("LlamaForCausalLM", tmp_path)
    x = _tokens()
    base = model(x)
    wrapped = apply_lora(model, LoraConfig(r=4))
    assert len(wrapped) == 14 and torch.equal(model(x), base)  # B = 0: bit-exact

    _randomize(model)
    out = model(x)
    assert not torch.allclose(out, base, atol=1e-3)
    layers = lora_layers(model)
    before = {p: m.base_layer.weight.clone() for p, m in layers.items()}
    for m in layers.values():
        m.merge()
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=0)
    for p, m in layers.items():
        m.unmerge()
        torch.testing.assert_close(m.base_layer.weight, before[p], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), out, atol=1e-6, rtol=0)

    assert merge_lora(model) == wrapped
    assert not lora_layers(model)
    assert all(type(model.get_submodule(p)) is nn.Linear for p in wrapped)
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=0)


def test_only_lora_trainable_with_expected_counts(tmp_path):
    _, model = _tiny("LlamaForCausalLM", tmp_path)
    method = LoraMethod(r=4)
    method.apply(model)
    trainable = method.trainable_parameters(model)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n, _ in trainable)
    expected = sum(4 * (m.in_features + m.out_features) for m in lora_layers(model).values())
    assert sum(p.numel() for _, p in trainable) == expected
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    model(_tokens()).logsumexp(-1).mean().backward()  # at init only B gets a gradient (dL/dA = 0 while B = 0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable if ".lora_B." in n)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_half_precision_base_keeps_float32_adapter(tmp_path):
    torch.manual_seed(0)
    make_tiny_hf_model("LlamaForCausalLM", tmp_path / "m")
    model = load_hf(tmp_path / "m", dtype="bf16", progress=False)
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.layers[0].attn.q_proj
    assert layer.lora_A.weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    out = model(_tokens())
    assert out.dtype == torch.bfloat16
    out.float().logsumexp(-1).mean().backward()
    assert layer.lora_B.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch,per_layer", [("LlamaForCausalLM", 7), ("GPT2LMHeadModel", 6)])
def test_all_linear_skips_lm_head(tmp_path, arch, per_layer):
    _, model = _tiny(arch, tmp_path)
    wrapped = apply_lora(model, LoraConfig(target_modules="all-linear"))
    assert len(wrapped) == per_layer * model.cfg.n_layers
    assert "lm_head" not in wrapped and not isinstance(model.lm_head, LoRALinear if model.lm_head else nn.Module)


def test_target_by_path_regex_and_unknown_target(tmp_path):
    _, model = _tiny("LlamaForCausalLM", tmp_path)
    assert apply_lora(model, LoraConfig(target_modules=r"layers\.0\.attn\.[qv]_proj")) == [
        "layers.0.attn.q_proj", "layers.0.attn.v_proj"]
    _, model = _tiny("LlamaForCausalLM", tmp_path)
    assert apply_lora(model, LoraConfig(target_modules=["1.mlp.down_proj"])) == ["layers.1.mlp.down_proj"]
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(model, LoraConfig())
    _, model = _tiny("LlamaForCausalLM", tmp_path)
    with pytest.raises(ConfigError, match=r"match no linear layer; available: down_proj, gate_proj") as e:
        apply_lora(model, LoraConfig(target_modules=["qkv_proj"]))
    assert "\n" not in str(e.value)


def test_rslora_scaling_and_dropout_only_in_training(tmp_path):
    _, model = _tiny("LlamaForCausalLM", tmp_path)
    apply_lora(model, LoraConfig(r=4, alpha=8, use_rslora=True, dropout=0.5, target_modules=["q_proj"]))
    assert all(m.scaling == 8 / 2 for m in lora_layers(model).values())
    assert LoRALinear(nn.Linear(4, 4), r=4, alpha=8).scaling == 2
    _randomize(model)
    x = _tokens()
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


def test_modules_to_save_train_and_save(tmp_path):
    _, model = _tiny("LlamaForCausalLM", tmp_path)
    cfg = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    apply_lora(model, cfg)
    assert model.lm_head.weight.requires_grad
    assert set(lora_state_dict(model, cfg)) == {f"layers.{i}.attn.q_proj.lora_{ab}.weight"
                                                for i in range(2) for ab in "AB"} | {"lm_head.weight"}
    _, model = _tiny("LlamaForCausalLM", tmp_path)
    with pytest.raises(ConfigError, match="modules_to_save 'head' matches no module"):
        apply_lora(model, LoraConfig(modules_to_save=["head"]))


# ---------------------------------------------------------------------------------------------- PEFT round trips


ALL = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
ROUND_TRIP = [
    ("LlamaForCausalLM", dict(target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["embed", "lm_head"]),
     ["down_proj", "q_proj", "v_proj"]),
    ("Qwen2ForCausalLM", dict(use_rslora=True), ALL),
    ("MistralForCausalLM", dict(target_modules="all-linear"), ALL),
    ("GPT2LMHeadModel", dict(target_modules=["o_proj", "up_proj", "down_proj"]), ["c_fc", "c_proj"]),
    ("GPT2LMHeadModel", dict(target_modules=["o_proj"]), [f"transformer.h.{i}.attn.c_proj" for i in (0, 1)]),
]


@pytest.mark.parametrize("arch,options,hf_targets", ROUND_TRIP, ids=[f"{r[0]}-{i}" for i, r in enumerate(ROUND_TRIP)])
@torch.no_grad()
def test_lmforge_adapter_loads_in_peft(tmp_path, arch, options, hf_targets):
    ref, model = _tiny(arch, tmp_path)
    x = _tokens()
    base = model(x)
    cfg = LoraConfig(r=4, alpha=8, **options)
    apply_lora(model, cfg)
    _randomize(model)
    for name in cfg.modules_to_save:
        w = model.get_submodule(name).weight
        w.add_(0.05 * torch.randn_like(w))
    assert (model(x) - base).abs().max() > 1e-2
    out = save_peft_adapter(model, cfg, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / arch))
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["target_modules"] == hf_targets and written["fan_in_fan_out"] == (arch == "GPT2LMHeadModel")
    pm = peft.PeftModel.from_pretrained(ref, out).eval()
    torch.testing.assert_close(pm(x).logits, model(x), atol=ATOL, rtol=0)


PEFT_WRITTEN = [
    ("LlamaForCausalLM", dict(target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"],
                              use_rslora=True)),
    ("Qwen2ForCausalLM", dict(target_modules="all-linear")),
    ("GPT2LMHeadModel", dict(target_modules=["c_proj", "c_fc"])),
    ("GPT2LMHeadModel", dict(target_modules=r".*\.mlp\.c_fc")),
]


@pytest.mark.parametrize("arch,options", PEFT_WRITTEN, ids=[f"{a}-{i}" for i, (a, _) in enumerate(PEFT_WRITTEN)])
@torch.no_grad()
def test_peft_adapter_loads_in_lmforge(tmp_path, arch, options):
    ref, model = _tiny(arch, tmp_path)
    x = _tokens()
    base = model(x)
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **options)).eval()
    torch.manual_seed(3)
    for name, p in pm.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "adapter")
    cfg = load_peft_adapter(model, tmp_path / "adapter")
    assert cfg.r == 4 and cfg.alpha == 8 and cfg.use_rslora == options.get("use_rslora", False)
    assert cfg.modules_to_save == options.get("modules_to_save", [])
    assert (model(x) - base).abs().max() > 1e-2
    torch.testing.assert_close(model(x), pm(x).logits, atol=ATOL, rtol=0)


def test_fused_qkv_target_cannot_be_saved_as_peft(tmp_path):
    _, model = _tiny("GPT2LMHeadModel", tmp_path)
    cfg = LoraConfig()
    apply_lora(model, cfg)
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel stores .* fused .*use target_modules \['down_proj', 'o_proj', "
                                          r"'up_proj'\]") as e:
        save_peft_adapter(model, cfg, tmp_path / "adapter")
    assert "\n" not in str(e.value)


def test_load_peft_adapter_errors(tmp_path):
    _, model = _tiny("LlamaForCausalLM", tmp_path)
    cfg = LoraConfig(r=4, target_modules=["q_proj"])
    apply_lora(model, cfg)
    out = save_peft_adapter(model, cfg, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    _, fresh = _tiny("LlamaForCausalLM", tmp_path)
    with pytest.raises(CheckpointError, match=r"tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\."
                                              r"lora_A\.weight' has shape \(4, 64\), the model expects \(8, 64\)"):
        load_peft_adapter(fresh, out)
    (out / "adapter_model.safetensors").unlink()
    _, fresh = _tiny("LlamaForCausalLM", tmp_path)
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        load_peft_adapter(fresh, out)
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_peft_adapter(fresh, tmp_path)


# ------------------------------------------------------------------------------------------------------ methods


@torch.no_grad()
def test_lora_export_is_a_full_hf_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    _, model = _tiny("LlamaForCausalLM", tmp_path)
    method = build_method("lora", r=4, alpha=8)
    method.apply(model)
    _randomize(model)
    x = _tokens()
    want = model(x)
    out = method.export(model, tmp_path / "export")
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(back(x).logits, want, atol=ATOL, rtol=0)
    assert len(lora_layers(model)) == 14  # export left the LoRA model as it was
    torch.testing.assert_close(model(x), want, atol=0, rtol=0)


@torch.no_grad()
def test_method_checkpoint_state_round_trip(tmp_path):
    _, a = _tiny("LlamaForCausalLM", tmp_path)
    _, b = _tiny("LlamaForCausalLM", tmp_path)
    method = LoraMethod(r=2, modules_to_save=["lm_head"])
    method.apply(a)
    method.apply(b)
    _randomize(a)
    a.lm_head.weight.mul_(1.5)
    state = {k: v.clone() for k, v in method.state_dict(a).items()}
    assert len(state) == 2 * 14 + 1
    method.load_state_dict(b, state)
    x = _tokens()
    torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="lacks 'lm_head.weight'"):
        method.load_state_dict(b, {k: v for k, v in state.items() if k != "lm_head.weight"})

    full = FullMethod()
    full.apply(a)
    assert set(full.state_dict(a)) == {n for n, _ in a.named_parameters()}
    assert len(full.trainable_parameters(a)) == len(list(a.parameters()))


def test_method_registry():
    assert set(METHODS) >= {"full", "lora"}
    assert isinstance(build_method("lora", r=16), LoraMethod) and build_method("lora", r=16).r == 16
    with pytest.raises(ConfigError, match=r"unknown method 'lroa' \(did you mean 'lora'\?\); available: (?=.*\bfull\b)(?=.*\blora\b)"):
        build_method("lroa")
    with pytest.raises(ConfigError, match=r"method 'lora': unknown config key 'alhpa' \(did you mean 'alpha'\?\)"):
        build_method("lora", alhpa=8)
