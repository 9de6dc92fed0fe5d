"""The CLI on a checkpoint written by transformers: info, generate, chat, config files, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmforge.cli import GenerateConfig, main, split_args
from lmforge.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "tiny")


def test_split_args_forms():
    cfg, ov = split_args(["ckpt", "--config", "c.yaml", "--max-new-tokens", "5", "--stream=false", "temperature=0",
                          "--chat"])
    assert cfg == "c.yaml"
    assert ov == ["model=ckpt", "max_new_tokens=5", "stream=false", "temperature=0", "chat=true"]


def test_a_bare_boolean_flag_does_not_eat_the_override_after_it(monkeypatch):
    """`--ui rag_store=X` is ui=true plus an override (it was ui='rag_store=X', "Input should be a valid boolean"),
    for every verb: with the verb's config class booleans take only true/false; without it, a following key=value
    is never a value. Other flags still take any value, '=' included."""
    from lmforge.serve import ServeConfig

    assert split_args(["ckpt", "--ui", "rag_store=X", "--port", "9"], "model", ServeConfig)[1] == [
        "model=ckpt", "ui=true", "rag_store=X", "port=9"]
    assert split_args(["ckpt", "--ui", "false", "--tools"], "model", ServeConfig)[1] == [
        "model=ckpt", "ui=false", "tools=true"]
    assert split_args(["ckpt", "--chat", "temperature=0", "--prompt", "a=b"], "model", GenerateConfig)[1] == [
        "model=ckpt", "chat=true", "temperature=0", "prompt=a=b"]
    assert split_args(["ckpt", "--chat", "temperature=0"])[1] == ["model=ckpt", "chat=true", "temperature=0"]
    assert split_args(["--device", "cpu", "ckpt"])[1] == ["device=cpu", "model=ckpt"]  # the model after a flag
    seen = {}
    monkeypatch.setattr("lmforge.serve.config.run_serve", lambda cfg: seen.setdefault("cfg", cfg))
    assert main(["serve", "ckpt", "--ui", "rag_store=store", "--api-key", "k=v"]) == 0
    cfg = seen["cfg"]
    assert cfg.ui is True and cfg.rag_store == "store" and cfg.api_key == "k=v"


def test_info_on_checkpoint_and_preset(ckpt, capsys):
    assert main(["info", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["parameters"] == info["config"]["vocab_size"] * 64 * 2 + info["parameters_without_embeddings"]
    assert info["weight_bytes"]["bfloat16"] == 2 * info["parameters"]
    assert main(["info", "qwen2.5-0.5b"]) == 0
    assert "494,032,768" in capsys.readouterr().out


def test_generate_greedy_is_deterministic_and_respects_max_new_tokens(ckpt, capsys):
    args = ["generate", str(ckpt), "--prompt", "Hello world", "--max-new-tokens", "6", "temperature=0"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args + ["--stream", "false"]) == 0
    assert capsys.readouterr().out == first  # streamed pieces == final text
    from lmforge.tokenizer import Tokenizer

    assert len(Tokenizer.from_dir(ckpt).encode(first.rstrip("\n"), add_special_tokens=False)) <= 6


def test_generate_reads_yaml_config_and_overrides_win(ckpt, tmp_path, capsys):
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(f"model: {ckpt}\nprompt: Hi\nmax_new_tokens: 4\ntemperature: 0\nchat: true\n")
    assert main(["generate", "--config", str(cfg)]) == 0
    assert main(["generate", "--config", str(cfg), "max_new_tokens=not-a-number"]) == 2
    assert "config key 'max_new_tokens'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["generate", "MODEL", "--promt", "x"], "unknown config key 'promt' (did you mean 'prompt'?)"),
    (["generate", "/no/such/dir", "--prompt", "x"], "no config.json in '/no/such/dir'"),
    (["genrate"], "unknown verb 'genrate' (did you mean 'generate'?)"),
    (["generate", "MODEL", "--temperature", "-1"], "config key 'temperature'"),
    (["info", "llama-3.2-1bb"], "did you mean 'llama-3.2-1b'?"),
])
def test_bad_input_is_one_line_without_traceback(ckpt, capsys, argv, message):
    argv = [str(ckpt) if a == "MODEL" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_help_lists_every_key_with_defaults(capsys):
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("model", "prompt", "max_new_tokens", "temperature", "top_p", "stop", "chat_template"):
        assert f"\n{key} " in out


def test_console_script_chat_is_multi_turn_over_stdin(ckpt):
    """The installed `lmforge` entry point, as a user runs it: two turns, then /exit."""
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "chat", str(ckpt), "--max-new-tokens", "5", "temperature=0"],
        input="hello\nand again\n/exit\n", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2


def test_chat_session_renders_the_whole_history(ckpt):
    from lmforge.infer import SamplingParams
    from lmforge.infer.api.chat import ChatSession
    from lmforge.models import load_hf
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(ckpt)
    session = ChatSession(load_hf(ckpt, progress=False), tok, SamplingParams(temperature=0, max_new_tokens=4),
                          system="Be brief.")
    reply = session.ask("first question")
    text = tok.decode(session.prompt_ids("second question"), skip_special_tokens=False)
    assert text.index("Be brief.") < text.index("first question") < text.index("second question")
    assert reply in text and text.endswith("<|im_start|>assistant\n")
    session.reset()
    assert "first question" not in tok.decode(session.prompt_ids("again"), skip_special_tokens=False)


@pytest.mark.parametrize("verb", ["info", "generate", "chat", "train", "export", "quantize", "serve", "eval", "plan",
                                  "quickstart"])
def test_every_verb_has_help(verb, capsys):
    assert main([verb, "--help"]) == 0
    assert "key" in capsys.readouterr().out


def test_eval_takes_the_model_then_any_number_of_task_files():
    _, overrides = split_args(["ckpt", "a.yaml", "b.jsonl", "--limit", "3"], ("model", "tasks"))
    assert overrides == ["model=ckpt", "limit=3", 'tasks=["a.yaml", "b.jsonl"]']


def test_plan_verb_on_a_preset(capsys):
    assert main(["plan", "llama-3.2-1b", "--gpu-mem", "80GiB", "--method", "lora"]) == 0
    assert "verdict" in capsys.readouterr().out


def test_train_verb_runs_alignment_stages(ckpt, tmp_path, capsys):
    """`lmforge train` with `stage: rm` trains a reward model on the one verb (TrainConfig has no rm stage)."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"say {w}", "chosen": f"{w} {w}", "rejected": "no"} for w in ("cat", "dog", "sun", "sky")]
    pairs.write_text("\n".join(json.dumps(r) for r in rows * 2))
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(f"stage: rm\nmodel: {{path: {ckpt}}}\ndata: {{path: {pairs}, max_seq_len: 32}}\n"
                   f"train: {{output_dir: {tmp_path / 'rm'}, max_steps: 2, micro_batch_size: 2, log_every: 1}}\n")
    assert main(["train", str(cfg)]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["step"] == 2 and (tmp_path / "rm" / "final" / "score.safetensors").is_file()
    assert main(["train", str(cfg), "stage=sft"]) == 2  # the same file read as SFT: preference rows are not SFT rows
