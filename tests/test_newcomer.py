"""What a new user trips over first (issue 32): names they type, files they get, errors that say what to do."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

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
