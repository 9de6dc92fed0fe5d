"""Known bad combinations of options, walked through the CLI in-process: each is one line on stderr that names the
key and the fix, exit status 2, never a traceback (validators in train/config.py, align/config.py, quant/run.py,
serve/config.py and the checks the trainer and generate() make once the model is loaded)."""
from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q {i}"},
                                                    {"role": "assistant", "content": f"a {i}"}]}) + "\n"
                           for i in range(8)))
    return {"ckpt": make_tiny_checkpoint(root / "tiny"), "sft": sft, "root": root}


def _train(f, *extra):
    return ["train", f"model.path={f['ckpt']}", f"data.path={f['sft']}", "data.max_seq_len=32", "train.device=cpu",
            "train.max_steps=1", f"train.output_dir={f['root'] / 'out'}", "train.progress=false",
            "train.tensorboard=false", "train.save_every=0", *extra]


# (argv builder, text the one line must contain: the key to change or the fix)
CASES = {
    # optimizers that update weights inside backward (checked by the trainer, once the model is loaded)
    "lomo_grad_accum": (lambda f: _train(f, "optim.name=lomo", "train.grad_accum=4"), "set train.grad_accum=1"),
    "adalomo_fp16": (lambda f: _train(f, "optim.name=adalomo", "train.precision=fp16"), "train.precision=bf16"),
    # train/config.py
    "option_of_another_optimizer": (lambda f: _train(f, "optim.name=adamw", "optim.lomo.clip_value=1.0"),
                                    "set optim.name=lomo"),
    "option_of_another_method": (lambda f: _train(f, "method=full", "lora.r=4"), "set method=lora"),
    "checkpoint_and_preset": (lambda f: _train(f, "model.preset=llama-3.2-1b"), "model.path loads a checkpoint"),
    "val_split_and_val_path": (lambda f: _train(f, "data.val_split=0.1", f"data.val_path={f['sft']}"),
                               "set either val_split or val_path"),
    "adalora_budget_grows": (lambda f: _train(f, "method=adalora", "adalora.target_r=16", "adalora.init_r=8"),
                             "target_r must be <= init_r"),
    "qat_group_size": (lambda f: _train(f, "method=qat", "qat.group_size=48"), "use qat.group_size=32"),
    # align/config.py, align/run.py
    "ppo_two_rewards": (lambda f: _train(f, "stage=ppo", "ppo.reward_model=x", "ppo.reward_fn=a:b"),
                        "set either ppo.reward_model or ppo.reward_fn"),
    "ppo_no_reward": (lambda f: _train(f, "stage=ppo"), "set ppo.reward_model"),
    "stage_option_without_the_stage": (lambda f: _train(f, "dpo.beta=0.2"),
                                       "unknown config key 'dpo': dpo.* are the options of stage dpo: set stage=dpo"),
    "grpo_epsilon_high_below_epsilon": (lambda f: _train(f, "stage=grpo", "grpo.epsilon=0.3",
                                                         "grpo.epsilon_high=0.1", "grpo.rewards=[{fn: a:b}]"),
                                        "epsilon_high (0.1) is below grpo.epsilon"),
    # quant/run.py
    "quantize_none_without_gguf": (lambda f: ["quantize", str(f["ckpt"]), "--method", "none"], "also set gguf"),
    "quantize_nf4_as_gptq": (lambda f: ["quantize", str(f["ckpt"]), "--method", "nf4", "--format", "gptq"],
                             "saved with format lmforge"),
    "quantize_awq_without_calib": (lambda f: ["quantize", str(f["ckpt"]), "--method", "awq"], "set calib=PATH"),
    # serve/config.py
    "serve_block_size_zero": (lambda f: ["serve", str(f["ckpt"]), "engine.block_size=0"], "engine.block_size"),
    # generate() with nothing to complete
    "generate_empty_prompt": (lambda f: ["generate", str(f["ckpt"]), "--prompt", "", "device=cpu"], "--prompt"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_combination_is_one_line_and_exit_2(name, files, capsys):
    build, expected = CASES[name]
    assert main(build(files)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge ") and ": error: " in err, err
    assert expected in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_one_is_one_line(files, capsys):
    assert main(["quantize", str(files["ckpt"]), "--method", "int8", "device=cuda",
                 f"out={files['root'] / 'q'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "use device=cpu" in err, err
