"""Every method and optimizer option is a config field that reaches the run: each method and each optimizer trains
two steps through `lmforge train`'s config path (load_config + run_training, in-process) with a non-default value of
every option, and the test looks at what the run built (ranks, targets, scalings, trainable parameter counts,
quantized layers, optimizer state) rather than at the config it was given."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.models import load_hf
from lmforge.peft import build_method
from lmforge.peft.lora import lora_layers
from lmforge.testing import make_tiny_checkpoint
from lmforge.train import run_training
from lmforge.train.config import TrainConfig, method_sections

ARCH = "Qwen2ForCausalLM"  # d_model 64, 2 layers, kv width 32, d_ff 128, q/k/v biases (for bitfit.add_missing)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    ckpt = make_tiny_checkpoint(root / "ckpt", arch=ARCH)
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
            for w in ("cat", "dog", "sun", "sky", "sea", "owl")]
    data = root / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return root, ckpt, data


def train(setup, name: str, *overrides: str) -> dict:
    """Two optimizer steps of `lmforge train` with `overrides`; the run's result (model, method, optimizer, ...)."""
    root, ckpt, data = setup
    base = [f"model.path={ckpt}", f"data.path={data}", "data.max_seq_len=32", f"train.output_dir={root / name}",
            "train.max_steps=2", "train.micro_batch_size=2", "train.device=cpu", "train.precision=fp32",
            "train.progress=false", "train.tensorboard=false", "train.resume=false", "train.grad_clip=null",
            "train.seed=0"]
    return run_training(load_config(TrainConfig, overrides=base + list(overrides)))


def n_trainable(result) -> int:
    return sum(p.numel() for _, p in result["method"].trainable_parameters(result["model"]))


def default_trainable(setup, name: str) -> int:
    """Trainable parameters of method `name` with every option at its default, on the same base."""
    model = load_hf(setup[1], dtype=torch.float32)
    method = build_method(name, **({"total_step": 2} if name == "adalora" else {}))
    method.apply(model)
    return sum(p.numel() for _, p in method.trainable_parameters(model))


def layers_of(model, cls) -> dict:
    return {p: m for p, m in model.named_modules() if isinstance(m, cls)}


def suffixes(paths) -> set[str]:
    return {p.removesuffix(".base_layer").rsplit(".", 1)[-1] for p in paths}


# ------------------------------------------------------------------------------------------------- methods


def check_lora(model, r: dict[str, int], alpha: float, rslora: bool, dropout: float):
    layers = lora_layers(model)
    assert suffixes(layers) == set(r)
    for path, layer in layers.items():
        rank = r[path.rsplit(".", 1)[-1]]
        assert layer.r == rank and layer.lora_A.weight.shape[0] == rank
        assert layer.scaling == pytest.approx(alpha / (math.sqrt(rank) if rslora else rank))
        assert getattr(layer.lora_dropout, "p", 0.0) == dropout
    return layers


def test_lora_options(setup):
    res = train(setup, "lora", "method=lora", "lora.r=4", "lora.alpha=12", "lora.dropout=0.1",
                "lora.target_modules=[q_proj,v_proj]", "lora.use_rslora=true", "lora.init=gaussian",
                "lora.modules_to_save=[embed]", "lora.rank_pattern={v_proj: 2}")
    layers = check_lora(res["model"], {"q_proj": 4, "v_proj": 2}, 12, True, 0.1)
    a = layers["layers.0.attn.q_proj"].lora_A.weight
    assert a.std() > 0.15  # N(0, 1/r) = std 0.25; the Kaiming-uniform default would be ~0.07 at in_features 64
    assert res["model"].embed.weight.requires_grad  # modules_to_save trains the head
    res2 = train(setup, "lora_dora", "method=lora", "lora.use_dora=true", "lora.target_modules=[q_proj]")
    assert all(hasattr(m, "lora_magnitude_vector") for m in lora_layers(res2["model"]).values())


def test_dora_options(setup):
    res = train(setup, "dora", "method=dora", "dora.r=2", "dora.alpha=4", "dora.dropout=0.2",
                "dora.target_modules=[o_proj]", "dora.use_rslora=true", "dora.init=gaussian",
                "dora.modules_to_save=[embed]", "dora.rank_pattern={layers.1.attn.o_proj: 3}")
    layers = lora_layers(res["model"])
    assert suffixes(layers) == {"o_proj"} and all(hasattr(m, "lora_magnitude_vector") for m in layers.values())
    assert [layers[f"layers.{i}.attn.o_proj"].r for i in (0, 1)] == [2, 3]
    assert layers["layers.0.attn.o_proj"].scaling == pytest.approx(4 / math.sqrt(2))
    assert layers["layers.0.attn.o_proj"].lora_dropout.p == 0.2
    assert res["model"].embed.weight.requires_grad
    assert n_trainable(res) != default_trainable(setup, "dora")


def test_qlora_options(setup):
    from lmforge.quant.nf4 import NF4Linear

    res = train(setup, "qlora", "method=qlora", "qlora.r=4", "qlora.alpha=8", "qlora.dropout=0.1",
                "qlora.target_modules=[q_proj,down_proj]", "qlora.use_rslora=true", "qlora.init=gaussian",
                "qlora.quantize_modules=[q_proj,k_proj,down_proj]", "qlora.block_size=32",
                "qlora.double_quant=false", "qlora.compute_dtype=float32", "qlora.rank_pattern={down_proj: 2}",
                "qlora.modules_to_save=[embed]", "qlora.use_dora=true")
    layers = check_lora(res["model"], {"q_proj": 4, "down_proj": 2}, 8, True, 0.1)
    assert all(hasattr(m, "lora_magnitude_vector") for m in layers.values())
    nf4 = layers_of(res["model"], NF4Linear)
    assert suffixes(nf4) == {"q_proj", "k_proj", "down_proj"} and len(nf4) == 6
    assert all(m.block_size == 32 and not m.double_quant and m.dtype == torch.float32 for m in nf4.values())
    assert res["model"].embed.weight.requires_grad
    # a LoRA option given to qlora is refused, naming both methods and the fix
    with pytest.raises(Exception, match=r"lora\.r is an option of method 'lora', but method is 'qlora': set qlora\.r"):
        train(setup, "qlora_bad", "method=qlora", "lora.r=4")


def test_prilora_options(setup):
    res = train(setup, "prilora", "method=prilora", "prilora.r_start=2", "prilora.r_end=6", "prilora.prune_every=1",
                "prilora.prune_ratio=0.25", "prilora.stats_beta=0.5", "prilora.alpha=6", "prilora.dropout=0.1",
                "prilora.target_modules=[q_proj,up_proj]", "prilora.use_rslora=true", "prilora.init=gaussian",
                "prilora.modules_to_save=[embed]", "prilora.use_dora=true")
    layers = lora_layers(res["model"])
    assert suffixes(layers) == {"q_proj", "up_proj"}
    assert {p: m.r for p, m in layers.items() if p.endswith("q_proj")} == {"layers.0.attn.q_proj": 2,
                                                                           "layers.1.attn.q_proj": 6}
    assert layers["layers.1.attn.q_proj"].scaling == pytest.approx(6 / math.sqrt(6))
    a = layers["layers.1.mlp.up_proj"].lora_A.weight  # (6, 64): pruned at every step (the loop's on_step), 16 of 64
    # per row zeroed
    assert (a == 0).sum(1).tolist() == [16] * 6
    assert res["method"].stats_beta == 0.5 and res["model"].embed.weight.requires_grad
    assert all(hasattr(m, "lora_magnitude_vector") for m in layers.values())
    with pytest.raises(Exception, match="prilora.r is set by method 'prilora' itself"):
        train(setup, "prilora_bad", "method=prilora", "prilora.r=4")


def test_adalora_options_and_run_length(setup):
    res = train(setup, "adalora", "method=adalora", "adalora.init_r=6", "adalora.target_r=2", "adalora.alpha=12",
                "adalora.dropout=0.1", "adalora.target_modules=[q_proj,k_proj]", "adalora.tinit=0",
                "adalora.tfinal=1", "adalora.delta_t=2", "adalora.beta1=0.5", "adalora.beta2=0.6",
                "adalora.orth_reg_weight=0.0")
    from lmforge.peft.adalora import SVDLinear

    svd = layers_of(res["model"], SVDLinear)
    assert suffixes(svd) == {"q_proj", "k_proj"} and all(m.lora_A.shape[0] == 6 for m in svd.values())
    m = res["method"]
    assert m.total_step == 2  # unset: the run's length (train.max_steps)
    assert (m.beta1, m.beta2, m.orth_reg_weight, m.delta_t, m.tfinal) == (0.5, 0.6, 0.0, 2, 1)
    kept = sum(int(layer.rank_mask.sum()) for layer in svd.values())
    assert kept <= 2 * len(svd)  # the final budget (target_r per adapter) was applied within the two steps


def test_ia3_bitfit_adapter_options(setup):
    from lmforge.peft.adapters import AdapterLinear
    from lmforge.peft.ia3 import IA3Linear

    res = train(setup, "ia3", "method=ia3", "ia3.target_modules=[q_proj,up_proj,down_proj]",
                "ia3.feedforward_modules=[up_proj,down_proj]")
    ia3 = layers_of(res["model"], IA3Linear)
    assert suffixes(ia3) == {"q_proj", "up_proj", "down_proj"}
    assert all(m.feedforward == (not p.endswith("q_proj")) for p, m in ia3.items())
    assert n_trainable(res) == 2 * (64 + 64 + 128)  # q: out 64; up: in 64; down: in 128

    res = train(setup, "bitfit", "method=bitfit", "bitfit.target_modules=[q_proj,k_proj,v_proj,o_proj]",
                "bitfit.add_missing=false")
    names = [n for n, _ in res["method"].trainable_parameters(res["model"])]
    assert names and all(n.endswith("bias") and ".o_proj." not in n for n in names)  # o_proj has no bias to train
    assert n_trainable(res) == 2 * (64 + 32 + 32)

    res = train(setup, "adapter", "method=adapter", "adapter.bottleneck=4", "adapter.target_modules=[o_proj]",
                "adapter.activation=relu", "adapter.init_std=0.05", "adapter.train_norms=false")
    ad = layers_of(res["model"], AdapterLinear)
    assert suffixes(ad) == {"o_proj"} and all(m.adapter_down.out_features == 4 for m in ad.values())
    assert all(m.act is torch.nn.functional.relu or "relu" in str(m.act).lower() for m in ad.values())
    assert n_trainable(res) == 2 * (64 * 4 + 4 + 4 * 64 + 64)  # no norms
    assert 0.03 < ad["layers.0.attn.o_proj"].adapter_down.weight.std() < 0.07


def test_prompt_methods_options(setup):
    res = train(setup, "prefix", "method=prefix", "prefix.num_virtual_tokens=3", "prefix.prefix_projection=true",
                "prefix.encoder_hidden_size=16", "prefix.init=random")
    enc = res["model"].prompt_encoder
    assert enc.embedding.shape == (3, 32) and enc.transform[0].out_features == 16
    res = train(setup, "ptuning_v2", "method=ptuning_v2", "ptuning_v2.num_virtual_tokens=3", "ptuning_v2.init=random")
    assert n_trainable(res) == 3 * 2 * 2 * 32  # tokens x layers x (k, v) x kv width
    res = train(setup, "prompt_tuning", "method=prompt_tuning", "prompt_tuning.num_virtual_tokens=3",
                "prompt_tuning.init=text", "prompt_tuning.init_text=sun", f"prompt_tuning.tokenizer={setup[1]}")
    assert res["model"].prompt_encoder.embedding.shape == (3, 64)
    res = train(setup, "ptuning", "method=ptuning", "ptuning.num_virtual_tokens=2", "ptuning.encoder=lstm",
                "ptuning.encoder_hidden_size=8", "ptuning.init=random")
    enc = res["model"].prompt_encoder
    assert enc.embedding.shape == (2, 64) and enc.lstm is not None and enc.lstm.hidden_size == 8


def test_prompt_init_text_and_adalora_total_step_take_effect(setup):
    """The options the walks above leave at their defaults: a text-initialised prompt starts at the text's token
    embeddings (prompt_tuning, and ptuning which inherits init/init_text/tokenizer), and an explicit
    adalora.total_step wins over the run's length."""
    from lmforge.tokenizer import Tokenizer

    ckpt = setup[1]
    ids = (Tokenizer.from_dir(str(ckpt)).encode("sun sky") * 3)[:3]
    table = load_hf(ckpt, dtype=torch.float32).embed.weight.detach()
    for name in ("prompt_tuning", "ptuning"):  # lr 1e-9: two steps leave the initial prompt in place
        res = train(setup, f"{name}_text", f"method={name}", f"{name}.num_virtual_tokens=3", f"{name}.init=text",
                    f"{name}.init_text=sun sky", f"{name}.tokenizer={ckpt}", "optim.lr=1e-9")
        torch.testing.assert_close(res["model"].prompt_encoder.embedding.detach(), table[ids], atol=1e-5, rtol=0)
    res = train(setup, "adalora_total", "method=adalora", "adalora.total_step=7", "adalora.tinit=1",
                "adalora.tfinal=1")
    assert res["method"].total_step == 7


def test_qat_bitnet_options(setup):
    from lmforge.quant.bitnet import BitLinear
    from lmforge.quant.qat import FakeQuantLinear

    res = train(setup, "qat", "method=qat", "qat.bits=8", "qat.group_size=32", "qat.act_bits=8",
                "qat.target_modules=[q_proj,up_proj]")
    fq = layers_of(res["model"], FakeQuantLinear)
    assert suffixes(fq) == {"q_proj", "up_proj"}
    assert all((m.bits, m.group_size, m.act_bits) == (8, 32, 8) for m in fq.values())
    res = train(setup, "bitnet", "method=bitnet", "bitnet.target_modules=[k_proj]")
    assert suffixes(layers_of(res["model"], BitLinear)) == {"k_proj"}


def test_every_method_section_is_walked():
    """A method added to TrainConfig without a case above fails here (keep the walk complete)."""
    walked = {"lora", "dora", "qlora", "prilora", "adalora", "ia3", "bitfit", "adapter", "prefix", "ptuning_v2",
              "prompt_tuning", "ptuning", "qat", "bitnet"}
    assert set(method_sections(TrainConfig)) == walked


# ---------------------------------------------------------------------------------------------- optimizers


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lomo_and_adamw_backward_clip_value(setup):
    before = _weights(load_hf(setup[1], dtype=torch.float32))
    res = train(setup, "lomo", "optim.name=lomo", "optim.lr=1.0", "optim.lomo.clip_value=1e-6",
                "schedule.kind=constant")
    moved = max((v - before[k]).abs().max().item() for k, v in res["model"].state_dict().items())
    assert 0 < moved <= 2e-6 + 2.5e-7  # two steps of lr 1 on gradients clipped to 1e-6 (+ float32 rounding)
    res = train(setup, "adamw_backward", "optim.name=adamw_backward", "optim.adamw_backward.clip_value=0.5")
    assert all(g["clip_value"] == 0.5 for g in res["optimizer"].param_groups)


def test_adalomo_options(setup):
    res = train(setup, "adalomo", "optim.name=adalomo", "optim.adalomo.clip_value=0.1",
                "optim.adalomo.clip_threshold=0.5", "optim.adalomo.decay_rate=-0.5")
    opt = res["optimizer"]
    assert all((g["clip_value"], g["clip_threshold"], g["decay_rate"]) == (0.1, 0.5, -0.5) for g in opt.param_groups)
    states = [s for s in opt.state.values() if "row" in s]
    assert states and all(s["step"] == 2 for s in states)  # factored second moments, two updates each


def test_badam_options(setup):
    before = _weights(load_hf(setup[1], dtype=torch.float32))
    res = train(setup, "badam", "optim.name=badam", "optim.badam.switch_every=1", "optim.badam.order=descending")
    opt = res["optimizer"]
    assert opt.sweep == [1, 0]  # descending
    after = res["model"].state_dict()
    changed = {int(k.split(".")[1]) for k, v in after.items() if k.startswith("layers.") and
               not torch.equal(v, before[k])}
    assert changed == {0, 1}  # one step each: the active block switched after every step
    assert torch.equal(after["embed.weight"], before["embed.weight"])


def test_galore_options_project(setup):
    res = train(setup, "galore", "optim.name=galore", "optim.galore.rank=4", "optim.galore.update_proj_gap=1",
                "optim.galore.scale=0.5", "optim.galore.min_dim=64")
    opt = res["optimizer"]
    # min_dim 64 leaves out k/v (64 -> 32); every other block matrix (shorter side 64) is projected to rank 4
    assert suffixes(n.removesuffix(".weight") for n in opt.projected) == {"q_proj", "o_proj", "gate_proj", "up_proj",
                                                                        "down_proj"}
    assert len(opt.projected) == 2 * 5
    states = [opt.state[p] for g in opt.param_groups if g["galore"] for p in g["params"]]
    assert all(s["proj"].shape[1] == 4 and s["galore_step"] == 2 and 4 in s["adam"]["exp_avg"].shape for s in states)
    assert all(g["scale"] == 0.5 and g["update_proj_gap"] == 1 for g in opt.param_groups)


def test_option_of_another_optimizer_or_method_is_one_line_exit_2(setup, capsys):
    root, ckpt, data = setup
    base = [f"model.path={ckpt}", f"data.path={data}", f"train.output_dir={root / 'bad'}"]
    assert main(["train", *base, "optim.name=adamw", "optim.galore.rank=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.galore.rank is an option of optimizer 'galore', but optim.name is 'adamw'" in err
    assert len(err.splitlines()) == 1
    assert main(["train", *base, "method=dora", "lora.r=4"]) == 2
    assert "set dora.r instead" in capsys.readouterr().err


def test_a_switch_on_the_command_line_takes_the_files_section_of_what_it_replaces(tmp_path):
    """`examples/sft_lora.yaml method=full` (the docs' command lines): the file's `lora:` section belongs to the
    method the override replaces, so it is dropped with a warning instead of refused; the same for optim.name and
    an alignment stage. A section the command line itself sets is still checked."""
    from lmforge.align.run import AlignConfig
    from lmforge.config import load_config
    from lmforge.errors import ConfigError
    from lmforge.train.config import TrainConfig

    with pytest.warns(UserWarning, match="its 'lora' section is not used"):
        cfg = load_config(TrainConfig, "examples/sft_lora.yaml", ["method=full"])
    assert cfg.method == "full" and "r" not in cfg.lora.model_fields_set
    with pytest.warns(UserWarning):
        assert load_config(TrainConfig, "examples/sft_lora.yaml", ["method=qlora", "qlora.r=4"]).qlora.r == 4
    with pytest.raises(ConfigError, match="is an option of method 'lora', but method is 'qlora'"):
        load_config(TrainConfig, "examples/sft_lora.yaml", ["method=qlora", "lora.dropout=0.1"])
    galore, dpo = tmp_path / "galore.yaml", tmp_path / "dpo.yaml"
    head = "model: {path: m}\ndata: {path: d}\n"
    galore.write_text(head + "optim: {name: galore, galore: {rank: 8}}\n")
    dpo.write_text(head + "stage: dpo\ndpo: {beta: 0.3}\n")
    with pytest.warns(UserWarning, match="'optim.galore' section"):
        assert load_config(TrainConfig, galore, ["optim.name=adamw"]).optim.name == "adamw"
    with pytest.raises(ConfigError, match="optim.galore.rank is an option of optimizer 'galore'"):
        load_config(TrainConfig, galore, ["optim.name=adamw", "optim.galore.rank=4"])
    with pytest.warns(UserWarning, match="its 'dpo' section"):
        assert load_config(AlignConfig, dpo, ["stage=orpo"]).stage == "orpo"
    with pytest.raises(ConfigError, match="dpo.beta is an option of stage 'dpo'"):
        load_config(AlignConfig, dpo, ["stage=orpo", "dpo.beta=0.2"])


def test_help_lists_method_and_optimizer_options(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("qlora.block_size", "adalora.total_step", "prefix.num_virtual_tokens", "optim.galore.rank",
                "optim.galore.min_dim", "optim.badam.switch_every", "optim.lomo.clip_value", "qat.bits"):
        assert key in out, key


def test_help_lists_every_method_optimizer_and_stage_option(capsys):
    """Every field of every method's section and optimizer's options is a row of `lmforge train --help`, and every
    alignment stage's field one of `lmforge train stage=grpo --help` (keys from the classes, not from the help code)."""
    from lmforge.align.run import ALIGN_STAGES, AlignConfig
    from lmforge.train.config import OPTIMIZER_OPTIONS, OptimSection

    def rows(args):
        assert main(["train", *args, "--help"]) == 0
        return {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}

    want = set()
    for m in method_sections(TrainConfig):
        cls = TrainConfig.model_fields[m].annotation
        want |= {f"{m}.{f}" for f in cls.model_fields if f not in getattr(cls, "derived", ())}
    want |= {f"optim.{o}.{f}" for o in set(OPTIMIZER_OPTIONS.values())
             for f in OptimSection.model_fields[o].annotation.model_fields}
    want |= {f"optim.{f}" for f in OptimSection.model_fields if f not in OPTIMIZER_OPTIONS.values()}
    assert not want - rows([]), sorted(want - rows([]))
    stages = {f"{s}.{f}" for s in ALIGN_STAGES for f in AlignConfig.model_fields[s].annotation.model_fields}
    assert not stages - rows(["stage=grpo"]), sorted(stages - rows(["stage=grpo"]))


def test_every_help_row_says_what_the_option_does():
    """`lmforge VERB --help` (and `train stage=grpo --help`) lists every config key; each with a description."""
    from lmforge.align.run import AlignConfig
    from lmforge.cli import VERBS
    from lmforge.config import describe

    classes = {verb: cls if isinstance(cls, type) else cls() for verb, (cls, *_) in VERBS.items()}
    classes["train stage=grpo"] = AlignConfig
    bare = [f"{verb}: {key}" for verb, cls in classes.items() for key, _, _, desc in describe(cls) if not desc]
    assert not bare, bare


def test_sgd_and_adamw_shared_options_and_their_misuse(setup, capsys):
    """optim.momentum reaches SGD, optim.betas / eps / weight_decay reach AdamW; given to a built-in optimizer that
    does not read them (they were silently ignored) they are one-line errors naming the optimizer that does."""
    res = train(setup, "sgd", "optim.name=sgd", "optim.momentum=0.5")
    opt = res["optimizer"]
    assert all(g["momentum"] == 0.5 for g in opt.param_groups)
    assert any("momentum_buffer" in s for s in opt.state.values())
    res = train(setup, "adamw", "optim.betas=[0.8,0.95]", "optim.eps=1e-6", "optim.weight_decay=0.1")
    groups = res["optimizer"].param_groups
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in groups)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.1]  # 1-D parameters never decay
    root, ckpt, data = setup
    base = [f"model.path={ckpt}", f"data.path={data}", f"train.output_dir={root / 'bad'}"]
    for args, want in ((["optim.momentum=0.9"], "optim.momentum is an option of optimizer 'sgd', but optim.name is "
                                                "'adamw': set optim.name=sgd or drop it"),
                       (["optim.name=lomo", "optim.betas=[0.8,0.9]"], "optim.betas is an option of the Adam "
                                                                      "optimizers"),
                       (["optim.name=sgd", "optim.eps=1e-6"], "but optim.name is 'sgd'")):
        assert main(["train", *base, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and want in err, err


def test_option_of_another_alignment_stage_is_one_line_exit_2(setup, capsys):
    """An alignment stage's options under another stage, a DPO loss's under another loss, GRPO options whose switch
    is off (they were silently ignored): one line naming both and the fix."""
    root, ckpt, data = setup
    base = [f"model.path={ckpt}", f"data.path={data}", f"train.output_dir={root / 'bad'}"]
    for args, want in ((["stage=dpo", "grpo.num_generations=4"], "grpo.num_generations is an option of stage 'grpo', "
                                                                 "but stage is 'dpo': set stage=grpo instead"),
                       (["stage=dpo", "ppo.kl_coef=0.1"], "ppo.kl_coef is an option of stage 'ppo'"),
                       (["stage=rm", "dpo.max_prompt_len=8"], "but stage is 'rm': set rm.max_prompt_len instead"),
                       (["stage=grpo", "grpo.rewards=[{fn: format}]", "ppo.max_new_tokens=8"],
                        "set grpo.max_new_tokens instead"),
                       (["stage=dpo", "dpo.loss=ipo", "dpo.label_smoothing=0.1"],
                        "dpo.label_smoothing is an option of dpo.loss sigmoid, but dpo.loss is 'ipo'"),
                       (["stage=dpo", "dpo.loss=simpo", "dpo.reference=precomputed"], "set dpo.loss=sigmoid or drop it"),
                       (["stage=dpo", "dpo.simpo_gamma=1.0"], "dpo.simpo_gamma is an option of dpo.loss simpo"),
                       (["stage=grpo", "grpo.rewards=[{fn: format}]", "grpo.reference=copy"],
                        "grpo.reference is read only with grpo.beta > 0"),
                       (["stage=grpo", "grpo.rewards=[{fn: format}]", "grpo.max_resample_rounds=5"],
                        "with grpo.dynamic_sampling=true"),
                       (["stage=grpo", "grpo.rewards=[{fn: format}]", "grpo.overlong_penalty=0.5"],
                        "with grpo.overlong_buffer > 0"),
                       (["method=lora", "dora.r=4"], "dora.r is an option of method 'dora', but method is 'lora': "
                                                     "set lora.r instead")):
        assert main(["train", *base, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and want in err, err


def test_option_another_setting_of_the_method_reads_is_one_line_exit_2(setup, capsys):
    """prefix.encoder_hidden_size without the projection, prompt_tuning/ptuning init_text or tokenizer without
    init=text: read by nothing (they were silently ignored), so each is an error naming the setting that reads it."""
    root, ckpt, data = setup
    base = [f"model.path={ckpt}", f"data.path={data}", f"train.output_dir={root / 'bad'}"]
    for args, want in ((["method=prefix", "prefix.encoder_hidden_size=8"], "only prefix.prefix_projection=true"),
                       (["method=prompt_tuning", "prompt_tuning.init_text=hi"], "prompt_tuning.init_text is read by "
                                                                                "prompt_tuning.init=text only"),
                       (["method=ptuning", f"ptuning.tokenizer={ckpt}"], "set ptuning.init=text or drop it")):
        assert main(["train", *base, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and want in err, err
