"""What a new user trips over first (issue 32): names they type, files they get, errors that say what to do."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.config import format_help, load_config
from lmforge.peft.lora import LoraConfig


def test_lora_takes_the_names_users_type():
    cfg = load_config(LoraConfig, None, ["rank=4", "lora_alpha=8", "lora_dropout=0.1"])
    assert (cfg.r, cfg.alpha, cfg.dropout) == (4, 8.0, 0.1)
    assert load_config(LoraConfig, None, ["lora_rank=2"]).r == 2
    assert cfg.model_dump()["r"] == 4  # saved under the field's own name
    help_text = format_help(LoraConfig)
    assert "(also: rank, lora_rank)" in help_text and "(also: lora_alpha)" in help_text


def test_written_weights_have_the_permissions_of_every_other_file(tmp_path):
    """safetensors writes 0600; a checkpoint's weights must be as readable as its config.json (0644 here)."""
    from lmforge.models import ModelConfig, Transformer, save_hf

    old = os.umask(0o022)
    try:
        model = Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16))
        save_hf(model, tmp_path / "ckpt")
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "ckpt").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes


def test_embeddings_404_says_how_to_turn_them_on():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lmforge.serve.app import create_app

    client = TestClient(create_app(engine=None, tokenizer=None, model_name="m", runtime_lora=False))  # routes only
    r = client.post("/v1/embeddings", json={"input": "hi", "model": "m"})
    assert r.status_code == 404
    error = r.json()["error"]  # OpenAI's error schema, not FastAPI's {"detail": ...}
    assert "--embeddings minilm" in error["message"] and error["type"] == "invalid_request_error"
    assert "Invalid URL (GET /nope)" == client.get("/nope").json()["error"]["message"]


def test_verb_list_and_help_do_not_import_torch():
    code = ("import sys, io, contextlib; from lmforge.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['--help']) == 0 and main(['generate', '--help']) == 0\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_training_on_a_mostly_broken_file_stops_before_training(tmp_path, capsys):
    from lmforge.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    good = {"instruction": "say hi", "output": "hi"}
    rows = [json.dumps(good) if i % 5 in (0, 1) else '{"instruction": broken' for i in range(10)]  # 6 of 10 bad
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(rows) + "\n")
    args = ["train", f"model.path={ckpt}", f"data.path={data}", f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=1", "train.device=cpu", "method=lora"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "6 of 10 data rows are bad (60%, above data.max_bad_row_share=0.1)" in err and "data.jsonl:3:" in err
    assert not (tmp_path / "run" / "final").exists()
    assert main(args + ["data.max_bad_row_share=0.7", "train.save_every=0"]) == 0  # the user's call: it trains
    assert (tmp_path / "run" / "final").is_dir()


@pytest.mark.parametrize("model", ["./nothere.gguf", "model.gguf", "ckpt/model.gguf", "./ckpt"])
def test_a_missing_local_path_is_not_looked_up_on_the_hub(model, tmp_path, monkeypatch, capsys):
    """A mistyped path must say so, not become a Hugging Face id (offline here: a lookup would fail differently)."""
    from lmforge.hub import is_hub_id

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", model, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"no such file or directory: '{model}'" in err
    assert "name a checkpoint directory, a .gguf file or a hub id like org/name" in err
    assert is_hub_id("org/name") and is_hub_id("org/repo-GGUF/model-Q4_K_M.gguf") and is_hub_id("Qwen/Qwen2.5-0.5B")


SHARED = next((p for p in (Path(__file__).parents[1] / ".." / "shared", Path("/work/shared")) if p.is_dir()), None)


def _dpo_row() -> dict:
    """One valid row of LLaMA-Factory's dpo_en_demo.json (sharegpt turns, chosen/rejected as one message each)."""
    demo = SHARED / "data" / "llamafactory" / "dpo_en_demo.json" if SHARED else None
    if demo is not None and demo.is_file():
        return json.loads(demo.read_text())[10]  # a short one
    return {"conversations": [{"from": "human", "value": "Translate to Spanish: Without the sex part."}],
            "chosen": {"from": "gpt", "value": "Sin la parte del sexo."},
            "rejected": {"from": "gpt", "value": "I cannot translate that."}}


def _stage_rows(stage: str) -> tuple[dict, list[str]]:
    """(a valid row, bad rows) for a stage's reader: each bad row is bad for that reader's own reason."""
    dpo = _dpo_row()
    conv, chosen = dpo["conversations"], dpo["chosen"]
    broken = '{"conversations": [{"from": "human", "value": "Hi"'  # cut off: invalid JSON
    if stage == "kto":
        return ({"conversations": conv, "completion": chosen, "label": True},
                [broken, json.dumps({"conversations": conv, "completion": chosen}),  # no label
                 json.dumps({"completion": chosen, "label": False})])  # no prompt
    if stage == "grpo":
        return {"conversations": conv}, [broken, json.dumps({"conversations": "Hi"}), json.dumps({"chosen": chosen})]
    return dpo, [broken, json.dumps({"conversations": conv, "chosen": chosen}),  # no rejected
                 json.dumps({**dpo, "rejected": chosen})]  # identical replies


@pytest.mark.parametrize("stage", ["dpo", "rm", "orpo", "kto", "grpo"])
def test_alignment_on_a_mostly_broken_file_stops_before_training(stage, tmp_path, capsys):
    """As for SFT: 6 of 10 bad rows stop every alignment stage before any model is built, in one line with the
    counts, the setting and the first bad rows (file:row)."""
    from lmforge.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    good, bad = _stage_rows(stage)
    rows = [json.dumps(good) if i % 5 in (0, 1) else bad[i % len(bad)] for i in range(10)]  # rows 3-5, 8-10 bad
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(rows) + "\n")
    config = {"stage": stage, "method": "lora", "model": {"path": str(ckpt)},
              "data": {"path": str(data), "max_seq_len": 128},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "device": "cpu", "save_every": 0,
                        "progress": False, "tensorboard": False}}
    if stage == "grpo":
        config["grpo"] = {"rewards": [{"fn": "lmforge.align.demo:mentions_target"}], "num_generations": 2,
                          "max_new_tokens": 4}
    (tmp_path / "align.yaml").write_text(json.dumps(config))  # JSON is YAML
    capsys.readouterr()
    assert main(["train", str(tmp_path / "align.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "6 of 10 data rows are bad (60%, above data.max_bad_row_share=0.1)" in err and "data.jsonl:3:" in err
    assert not (tmp_path / "run" / "final").exists()
    if stage == "dpo":  # the user's call: above the share they chose, it trains
        assert main(["train", str(tmp_path / "align.yaml"), "data.max_bad_row_share=0.7"]) == 0
        assert (tmp_path / "run" / "final").is_dir()
