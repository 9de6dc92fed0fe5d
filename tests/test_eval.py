"""Evaluation: metrics against hand-computed values / the reference libraries, the sandbox, judge parsing, task
files, and whole runs on a tiny checkpoint."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.eval import (EvalConfig, Judge, LocalModel, Task, bleu, choice_accuracy, contains, exact_match,
                          load_tasks, markdown_table, parse_rating, parse_verdict, pass_at_k, rouge, run_eval,
                          run_program, sliding_windows, split_eval_args)
from lmforge.eval.runner import build_program, extract_answer
from lmforge.infer import SamplingParams, generate
from lmforge.models import load_hf
from lmforge.testing import make_tiny_checkpoint
from lmforge.tokenizer import Tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "eval"


# ------------------------------------------------------------------------------------------------ metrics


def test_exact_match_and_contains():
    assert exact_match("The Answer!", "answer") == 1.0
    assert exact_match("The Answer!", "answer", normalize=False) == 0.0
    assert exact_match(" 42 ", ["41", "42"], normalize=False) == 1.0
    assert exact_match("诗仙。", "诗仙") == 1.0
    assert contains("the code is 7341, ok", "7341") == 1.0 and contains("nothing", "7341") == 0.0


def test_bleu_matches_sacrebleu_and_hand_values():
    import sacrebleu

    preds = ["the cat sat on the mat", "a quick brown fox"]
    refs = ["the cat sat on the mat", "the quick brown fox jumps"]
    assert bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # several references: matching the second one is a perfect score
    assert bleu(["hello there my friend"], [["good bye", "hello there my friend"]]) == pytest.approx(100.0)
    assert bleu(["我爱北京天安门"], ["我爱北京天安门"], tokenize="zh") == pytest.approx(100.0)


def test_rouge_hand_computed_and_chinese():
    r = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert r["rouge1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P = 3/3, R = 3/6
    assert r["rouge2"] == pytest.approx(2 * 1.0 * 0.4 / 1.4)  # 2 of 2 bigrams, 2 of 5
    assert r["rougeL"] == pytest.approx(r["rouge1"])
    assert rouge(["我爱上海"], ["我爱北京"])["rouge1"] == 0.0  # the default tokenizer sees no (ASCII) words
    zh = rouge(["我爱上海"], ["我爱北京"], tokenizer="chars")
    assert zh["rouge1"] == pytest.approx(0.5) and zh["rouge2"] == pytest.approx(1 / 3)
    words = rouge(["我爱北京"], ["我爱北京天安门"], tokenizer="jieba")
    assert 0 < words["rouge1"] < 1
    with pytest.raises(ConfigError, match="rouge_tokenizer"):
        rouge(["a"], ["a"], tokenizer="klingon")


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 7, 5) == 1.0
    for n, c, k in [(20, 3, 5), (100, 13, 10), (7, 6, 3)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    with pytest.raises(ConfigError, match="n_samples"):
        pass_at_k(3, 1, 5)


def test_choice_accuracy_raw_and_length_normalised():
    ll = [[-3.0, -4.0], [-10.0, -6.0]]
    choices = [["a", "bbbb"], ["cccccccccc", "d"]]
    # raw: picks 0 then 1; per character: -3/1 vs -4/4 -> 1, and -10/10 vs -6/1 -> 0
    assert choice_accuracy(ll, choices, [0, 1]) == {"acc": 1.0, "acc_norm": 0.0}
    assert choice_accuracy(ll, choices, [1, 0]) == {"acc": 0.0, "acc_norm": 1.0}


def test_sliding_windows_score_every_token_once():
    for n, w, s in [(10, 4, 2), (10, 4, 4), (7, 16, 8), (100, 32, 1)]:
        wins = sliding_windows(n, w, s)
        scored = [t for b, e, new in wins for t in range(e - new, e)]
        assert scored == list(range(1, n))  # every token but the first, once, in order
        assert all(e - b <= w for b, e, _ in wins)
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 5)


def test_extract_answer():
    assert extract_answer("so 3 x 2 = 6. The answer is 6.", r"answer is\s*(-?\d+)") == "6"
    assert extract_answer("no match here ", r"answer is (\d+)") == "no match here"


# ------------------------------------------------------------------------------------------------ sandbox


def test_sandbox_pass_fail_timeout_network():
    prog = build_program("def add(a, b):\n", "    return a + b\n", "def check(f):\n    assert f(2, 3) == 5\n",
                         "add", chat=False)
    assert run_program(prog, timeout=5).passed
    wrong = build_program("def add(a, b):\n", "    return a - b\n", "def check(f):\n    assert f(2, 3) == 5\n",
                          "add", chat=False)
    res = run_program(wrong, timeout=5)
    assert not res.passed and res.status == "failed" and "AssertionError" in res.stderr
    assert run_program("while True:\n    pass\n", timeout=1).status == "timeout"
    net = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n", timeout=5)
    assert not net.passed and net.network in ("namespace", "guard")
    raw = run_program("import _socket\ns = _socket.socket()\ns.connect(('1.1.1.1', 80))\n", timeout=5)
    assert not raw.passed
    assert not run_program("x = bytearray(8 * 2**30)\n", timeout=5, memory_mb=256).passed  # memory limit
    fenced = build_program("def add(a, b):\n", "Here:\n```python\ndef add(a, b):\n    return a + b\n```\n",
                           "assert add(1, 1) == 2", None, chat=True)
    assert run_program(fenced, timeout=5).passed


# ------------------------------------------------------------------------------------------------ judge


@pytest.mark.parametrize("text,want", [
    ("Good answer. Rating: [[8]]", 8.0), ("I'd give it 7/10.", 7.0), ("Score: 6", 6.0),
    ("The rating is [[3]] because ... [[9]]", 9.0), ("评分：9", 9.0), ("7", 7.0), ("Rating: [[15]]", None),
    ("no idea", None), ("between 3 and 5", None), ("a rating of 4.5 out of 10", 4.5)])
def test_parse_rating(text, want):
    assert parse_rating(text) == want


@pytest.mark.parametrize("text,want", [
    ("A is more detailed. [[A]]", "A"), ("[[B]]", "B"), ("Both fine: [[C]]", "tie"), ("Assistant B is better.", "B"),
    ("It's a tie.", "tie"), (" A ", "A"), ("I cannot decide", None)])
def test_parse_verdict(text, want):
    assert parse_verdict(text) == want


# ------------------------------------------------------------------------------------------------ model-backed


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    return path, LocalModel(load_hf(path, dtype="float32"), Tokenizer.from_dir(path), batch_size=3)


def test_loglikelihood_matches_direct_forward_and_batching(tiny):
    path, lm = tiny
    tok = lm.tokenizer
    reqs = [(tok.encode("hello world"), tok.encode(" how are you", add_special_tokens=False)),
            (tok.encode("the"), tok.encode(" quick brown fox jumps", add_special_tokens=False)),
            (tok.encode("大语言模型"), tok.encode("把文本", add_special_tokens=False))]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), ll in zip(reqs, got):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(ids)[0].float(), -1)
        want = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert ll == pytest.approx(want, abs=1e-4)
    one = LocalModel(lm.model, tok, batch_size=1).loglikelihood(reqs)
    assert one == pytest.approx(got, abs=1e-4)


def test_rolling_perplexity_matches_manual_windows(tiny):
    _, lm = tiny
    ids = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6, add_special_tokens=False)
    window, stride = 16, 6
    nll, n = lm.rolling_nll(ids, window, stride)
    assert n == len(ids) - 1
    want = 0.0
    with torch.no_grad():
        for b, e, new in sliding_windows(len(ids), window, stride):
            logp = torch.log_softmax(lm.model(torch.tensor([ids[b:e]]))[0].float(), -1)
            want -= sum(float(logp[t - b - 1, ids[t]]) for t in range(e - new, e))
    assert nll == pytest.approx(want, rel=1e-5)
    full_nll, _ = lm.rolling_nll(ids, len(ids), len(ids))  # one window = the whole-sequence NLL
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids]))[0].float(), -1)
    assert full_nll == pytest.approx(-sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids))), rel=1e-5)


def test_judge_runs_a_local_judge_model(tiny):
    _, lm = tiny
    ratings, raw = Judge(lm, max_new_tokens=8).rate(["What is 2+2?"], ["4"])
    assert len(ratings) == 1 and isinstance(raw[0], str)
    assert ratings[0] == parse_rating(raw[0])  # a random judge rarely gives a parseable verdict; it is not invented
    verdicts, raw = Judge(lm, max_new_tokens=8).compare(["q"], ["a"], ["b"])
    assert len(raw) == 2 and verdicts[0] in ("A", "B", "tie", None)


def test_task_files_and_errors(tmp_path):
    tasks = load_tasks(EXAMPLES / "capability_probe.yaml")
    assert {t.category for t in tasks} == {"comprehension", "generation", "knowledge", "reasoning", "long_context",
                                           "safety"}
    assert all(t.load_rows() for t in tasks)
    (mc,) = load_tasks(EXAMPLES / "knowledge_mc.jsonl")
    assert mc.type == "multiple_choice" and len(mc.load_rows()) == 3
    assert load_tasks(EXAMPLES / "code_small.yaml")[0].type == "code"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrows: [{q: 1}]\nmetrics: [exact_matc]\n")
    with pytest.raises(ConfigError, match="metrics"):
        load_tasks(bad)
    t = Task(name="t", prompt="Q: {question}", rows=[{"q": 1}])
    with pytest.raises(ConfigError, match="field 'question'"):
        t.render(t.rows[0])
    code = tmp_path / "code.yaml"
    code.write_text("name: c\ntype: code\nrows: [{}]\nk: [5]\nn_samples: 2\n")
    with pytest.raises(ConfigError, match="n_samples >= 5"):
        load_tasks(code)
    assert split_eval_args(["ckpt", "a.yaml", "b.jsonl", "limit=3", "--batch-size", "2"]) == (
        None, ["model=ckpt", 'tasks=["a.yaml","b.jsonl"]', "limit=3", "batch_size=2"])



def test_jsonl_task_rows_split_at_newlines_only_and_bad_bytes_name_the_line(tmp_path):
    """U+2028 inside a JSON string is one row (str.splitlines would cut it in two); a stray byte is a one-line error."""
    path = tmp_path / "seps.jsonl"
    rows = [{"prompt": "a\u2028b", "answer": "c\u0085d"}, {"prompt": "e", "answer": "f"}]
    path.write_bytes("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode())
    (task,) = load_tasks(path)
    assert task.load_rows() == rows
    path.write_bytes(path.read_bytes() + b'\n{"prompt": "caf\xe9", "answer": "x"}\n')
    with pytest.raises(ConfigError, match=r"seps\.jsonl:3: not UTF-8: byte 0xE9 at line 3, column 16$"):
        load_tasks(path)[0].load_rows()

def test_run_eval_end_to_end(tiny, tmp_path):
    path, lm = tiny
    tok = lm.tokenizer
    prompts = ["hello", "the quick"]
    greedy = [o.text for o in generate(lm.model, [tok.encode(p) for p in prompts],
                                       SamplingParams(temperature=0, max_new_tokens=6), tokenizer=tok)]
    gen = tmp_path / "gen.jsonl"  # references = what greedy decoding produces: exact match must be 1
    gen.write_text("".join(json.dumps({"prompt": p, "answer": g}) + "\n" for p, g in zip(prompts, greedy)))
    (tmp_path / "gen.yaml").write_text("name: gen\ndata: gen.jsonl\nmax_new_tokens: 6\nnormalize: false\n"
                                       "metrics: [exact_match, bleu, rouge]\n")
    (tmp_path / "ppl.yaml").write_text(f"name: ppl\ntype: perplexity\ntext_file: {EXAMPLES / 'sample.txt'}\n"
                                       "window: 32\nstride: 16\n")
    (tmp_path / "code.yaml").write_text(f"name: code\ntype: code\ndata: {EXAMPLES / 'code_small.jsonl'}\n"
                                        "n_samples: 2\nk: [1, 2]\ntemperature: 0.8\nmax_new_tokens: 8\ntimeout: 5\n")
    cfg = EvalConfig(model=str(path), tasks=[str(tmp_path / "gen.yaml"), str(EXAMPLES / "knowledge_mc.jsonl"),
                                             str(tmp_path / "ppl.yaml"), str(tmp_path / "code.yaml")],
                     output=str(tmp_path / "out"), device="cpu", dtype="float32", batch_size=2)
    report = run_eval(cfg, model=lm)
    by = {r["task"]: r["metrics"] for r in report["results"]}
    assert by["gen"]["exact_match"] == 1.0 and by["gen"]["rouge1"] == pytest.approx(1.0)
    assert 0.0 <= by["knowledge_mc"]["acc"] <= 1.0 and "acc_norm" in by["knowledge_mc"]
    assert 1.0 < by["ppl"]["perplexity"] < 10 * tok.vocab_size and by["ppl"]["tokens"] > 0
    assert 0.0 <= by["code"]["pass@1"] <= by["code"]["pass@2"] <= 1.0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["task"] for r in saved["results"]] == ["gen", "knowledge_mc", "ppl", "code"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| gen |" in md and "| perplexity |" in md
    assert markdown_table(report["results"]).count("\n") >= 8
    # judge tasks without a judge: said before anything runs, the other tasks still run and their results are written
    probe = EvalConfig(model=str(path), tasks=[str(EXAMPLES / "capability_probe.yaml")], output=str(tmp_path / "p"),
                       limit=1)
    assert probe.out == str(tmp_path / "p")  # `output` is the old name of `out`, the key every verb uses
    with pytest.raises(ConfigError, match=r"2 of 6 tasks not run \(task 'generation' needs a judge"):
        run_eval(probe, model=lm)
    saved = json.loads((tmp_path / "p" / "results.json").read_text())["results"]
    assert [r["task"] for r in saved if "metrics" in r] == ["comprehension", "knowledge", "reasoning", "long_context"]
    assert [r["task"] for r in saved if "error" in r] == ["generation", "safety"]
    assert "generation: not run (task 'generation' needs a judge" in (tmp_path / "p" / "results.md").read_text()
