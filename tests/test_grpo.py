"""GRPO: advantages and loss variants against hand computation, rewards (built-ins, failures, missing columns), the
engine in the loop (rollouts follow the live weights, the prefix cache is reset, the engine's log-probs equal the
trainer's), and `lmforge train` stage grpo raising a verifiable reward on a tiny model. ORPO and KTO, the other
reference-light stages of issue 31: their losses against the papers' formulas, and learning on a tiny model."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.align.config import GRPOSection, ORPOSection, RewardSpec
from lmforge.align.data import PreferenceDataset, PromptDataset, encode_reply
from lmforge.align.dpo import sequence_logps
from lmforge.align.grpo import GRPOObjective, aggregate, group_advantages, grpo_token_loss, overlong_penalty, units
from lmforge.align.ppo import pad_rollout, reply_logps
from lmforge.align.orpo import ORPOObjective
from lmforge.align.rewards import RewardSet, extract_answer, extract_number, reference_number
from lmforge.align.run import AlignConfig
from lmforge.data import DataConfig
from lmforge.errors import ConfigError
from lmforge.infer import SamplingParams
from lmforge.models import load_hf
from lmforge.peft.methods import build_method
from lmforge.testing import make_tiny_checkpoint
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import ModelSection, OptimSection, TrainSection
from lmforge.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------ loss, by hand


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, float("nan"), 1.0, 2.0])
    adv, flat = group_advantages(r, 4)
    std = math.sqrt(4 * 0.25 / 3)  # group 1: mean 0.5, Bessel-corrected std
    want = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0,
            1 / (1 + 1e-4), 0.0, -1 / (1 + 1e-4), 0.0]  # group 3: mean 2, std 1 over the three present rewards
    torch.testing.assert_close(adv, torch.tensor(want))
    assert flat.tolist() == [False, True, False]
    adv, _ = group_advantages(r, 4, scale=False)  # Dr. GRPO: no std division
    torch.testing.assert_close(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    torch.testing.assert_close(overlong_penalty(torch.tensor([4, 6, 7, 8]), 8, 4, 1.0),
                               torch.tensor([0.0, -0.5, -0.75, -1.0]))


def test_clipped_loss_and_its_aggregations_by_hand():
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 0.9, 1.0], [0.5, 1.1, 1.0]]))  # ratios
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss, fig = grpo_token_loss(logp, old, adv, eps_low=0.2, eps_high=0.28)
    # A > 0: -min(r, clip(r)) A; A < 0: -min(r A, clip(r) A) = max(r, clip(r)) * |A|
    want = torch.tensor([[-1.28, -0.9, -1.0], [2 * 0.8, 2 * 1.1, 2 * 1.0]])
    torch.testing.assert_close(loss, want)
    assert fig["clipped"].tolist() == [[1, 0, 0], [1, 0, 0]]
    ref = torch.log(torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]))
    with_kl, fig = grpo_token_loss(logp, old, adv, 0.2, 0.2, beta=0.1, ref_logp=ref)
    d = ref - logp
    torch.testing.assert_close(with_kl - grpo_token_loss(logp, old, adv, 0.2, 0.2)[0], 0.1 * (d.exp() - d - 1))
    m = mask.float()
    assert float(aggregate(loss, mask, "grpo")) == pytest.approx(float((loss * m).sum(1)[0] / 2 + (loss * m).sum(1)[1] / 3))
    assert float(aggregate(loss, mask, "dapo")) == pytest.approx(float((loss * m).sum()))
    assert (units(mask, "grpo", 8), units(mask, "dapo", 8), units(mask, "dr_grpo", 8)) == (2, 5, 16)


# ------------------------------------------------------------------------------------------------ rewards


def test_builtin_rewards_and_failures_are_contained(tmp_path, caplog):
    assert extract_number("so \\boxed{1,234.5} there") == 1234.5
    assert extract_number("first 3\nthe answer is 42.") == 42 and reference_number("x\n#### 72") == 72
    assert extract_answer("<think>hm</think><answer> Paris </answer>") == "Paris"
    flaky = tmp_path / "flaky.py"
    flaky.write_text("def score(prompts, completions, answer):\n"
                     "    return [1 / (len(c) - 3) for c in completions]  # raises on a 3-letter completion\n"
                     "def nan(prompts, completions):\n    return [float('nan')] + [0.5] * (len(completions) - 1)\n")
    rs = RewardSet([RewardSpec(fn="number_match"), RewardSpec(fn="format", weight=0.5),
                    RewardSpec(fn="exact_match"), RewardSpec(fn=f"{flaky}:score"), RewardSpec(fn=f"{flaky}:nan")])
    comps = ["<think>a</think> <answer>\\boxed{72}</answer>", "abc", "The answer: 71"]
    rows = [{"answer": "#### 72"}, {"answer": "abc"}, {"answer": "71"}]
    with caplog.at_level("WARNING", logger="lmforge.grpo"):
        scores, missing = rs([[]] * 3, comps, rows, [[1]] * 3, [[2]] * 3, group=3)
    assert scores[[0, 2], 0].tolist() == [1, 1] and math.isnan(scores[1, 0])  # 'abc' has no number: no opinion
    assert scores[:, 1].tolist() == [1, 0, 0] and scores[:, 2].tolist() == [0, 1, 0]
    assert math.isnan(scores[1, 3]) and scores[0, 3] > 0 and math.isnan(scores[0, 4]) and missing == 3
    assert "prompt 0 (completion 1)" in caplog.text  # the failing sample is named, the others still scored
    assert float(rs.total(scores)[0]) == pytest.approx(1 + 0.5 + 0 + float(scores[0, 3]))
    data = PromptDataset([{"tokens": [1], "messages": [], "record": {"question": "q"}}])
    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\] \(number_match\) reads column 'answer'"):
        rs.check_columns(data, "data.path")
    with pytest.raises(ConfigError, match="neither a built-in"):
        RewardSet([RewardSpec(fn="no_such_reward")])
    with pytest.raises(ConfigError, match="stage grpo needs at least one reward"):
        from lmforge.config import load_config

        load_config(AlignConfig, base={"stage": "grpo", "model": {"path": "m"}, "data": {"path": "d"}})


def test_exact_match_normalises_format_takes_a_pattern_and_defaults_follow_current_practice():
    """exact_match compares after normalisation (case, punctuation, articles, whitespace; GSM8K's text before '####'
    dropped); format takes its own regex, matched whole; beta defaults to 0 (no KL, no reference) and Dr. GRPO drops
    the std division unless scale_rewards says otherwise; epsilon_high defaults to epsilon."""
    rs = RewardSet([RewardSpec(fn="exact_match"), RewardSpec(fn="format", pattern=r"\d+")])
    comps = ["<answer> The  Eiffel tower. </answer>", "eiffel Tower!", "42", "the tower"]
    rows = [{"answer": "Eiffel Tower"}, {"answer": "Paris is wrong\n#### the eiffel tower"}, {"answer": "42"},
            {"answer": "Eiffel Tower"}]
    scores, missing = rs([[]] * 4, comps, rows, [[1]] * 4, [[2]] * 4)
    assert scores[:, 0].tolist() == [1, 1, 1, 0] and scores[:, 1].tolist() == [0, 0, 1, 0] and missing == 0
    cfg = GRPOSection(rewards=[RewardSpec(fn="format")])
    assert cfg.beta == 0 and cfg.loss_type == "dapo"
    obj = GRPOObjective(cfg, None, rs)
    assert obj.scale and obj.eps_high == cfg.epsilon and obj.reference is None
    assert not GRPOObjective(GRPOSection(rewards=cfg.rewards, loss_type="dr_grpo"), None, rs).scale
    assert GRPOObjective(GRPOSection(rewards=cfg.rewards, loss_type="dr_grpo", scale_rewards=True), None, rs).scale


def test_a_non_finite_reward_is_reported_with_its_prompt(tmp_path, caplog):
    """A reward function that returns NaN or inf (not None, its 'no opinion') is reported with the prompt index, one
    line per reward and batch, and those scores are missing and counted; the other completions keep theirs."""
    (tmp_path / "broken.py").write_text("def broken(prompts, completions):\n"
                                        "    return [1.0, float('nan'), None, float('inf')]\n")
    rs = RewardSet([RewardSpec(fn=f"{tmp_path / 'broken.py'}:broken")])
    with caplog.at_level("WARNING", logger="lmforge.grpo"):
        scores, missing = rs([[]] * 4, ["a", "b", "c", "d"], [{}] * 4, [[1]] * 4, [[2]] * 4, group=2)
    assert scores[0, 0] == 1 and scores[1:, 0].isnan().all() and missing == 3
    assert [r.message for r in caplog.records] == [
        "reward 'broken' returned a non-finite value on prompt 0 (completion 1): nan; and on 1 more completions "
        "(prompts 1); marked missing"]


def test_code_tests_and_reward_model_builtins(ckpt, tmp_path):
    """code_tests runs the completion's code (its fenced block, else all of it) with the row's tests in the sandbox:
    1 when they pass, 0 on a failed assert or a timeout; reward_model scores prompt + completion with a stage-rm
    directory exactly as the reward model does on the unpadded sequence (a RewardSet built without a device: CPU)."""
    from lmforge.align.reward import RewardModel, load_reward_model, save_reward_model

    rs = RewardSet([RewardSpec(fn="code_tests", column="tests", timeout=3)])
    comps = ["Here:\n```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b):\n    return a - b",
             "def add(a, b):\n    while True:\n        pass"]
    scores, missing = rs([[]] * 3, comps, [{"tests": "assert add(2, 3) == 5"}] * 3, [[1]] * 3, [[2]] * 3, group=3)
    assert scores[:, 0].tolist() == [1, 0, 0] and missing == 0
    rm = RewardModel(load_hf(ckpt))
    torch.nn.init.normal_(rm.score.weight, generator=torch.Generator().manual_seed(0))
    save_reward_model(rm, tmp_path / "rm")
    rs = RewardSet([RewardSpec(fn="reward_model", model=str(tmp_path / "rm"))])
    prompt_ids, completion_ids = [[3, 4, 5], [3, 4, 5, 6, 7]], [[8, 9], [10]]
    scores, missing = rs([[]] * 2, ["a", "b"], [{}, {}], prompt_ids, completion_ids)
    ref = load_reward_model(tmp_path / "rm")
    with torch.no_grad():
        want = [float(ref(torch.tensor([p + c]), torch.arange(len(p + c))[None]))
                for p, c in zip(prompt_ids, completion_ids)]
    torch.testing.assert_close(scores[:, 0], torch.tensor(want), atol=1e-5, rtol=1e-5)
    assert missing == 0 and len(set(want)) == 2



def test_gsm8k_rows_work_as_they_are(ckpt, tmp_path):
    """GSM8K's {question, answer: '... #### 72'} rows: the question is the prompt, number_match reads the answer
    column's number after '####' (and passes the pre-training column check)."""
    from lmforge.align.data import build_prompt_datasets

    rows = [{"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
             "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\n48+24 = <<48+24=72>>72\n#### 72"},
            {"question": "What is 6 times 7?", "answer": "6*7 = 42\n#### 42"}]
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, _, report = build_prompt_datasets(DataConfig(path=str(tmp_path / "gsm8k.jsonl")), Tokenizer.from_dir(ckpt),
                                            max_prompt_len=128)
    assert len(data) == 2 and report.bad_row_count == 0
    assert data.rows[0]["messages"] == [{"role": "user", "content": rows[0]["question"]}]
    rs = RewardSet([RewardSpec(fn="number_match")])
    rs.check_columns(data.rows, "data.path")
    comps = ["48 + 24 = \\boxed{72}", "The answer is 41.", "I think it is 42"]
    records = [data.rows[0]["record"], data.rows[1]["record"], data.rows[1]["record"]]
    scores, missing = rs([[]] * 3, comps, records, [[1]] * 3, [[2]] * 3)
    assert scores[:, 0].tolist() == [1, 0, 1] and missing == 0


def test_chat_messages_prompt_rows_keep_their_columns(ckpt, tmp_path):
    """A prompts file of chat `messages` (system + user, no reply) with an extra column: the messages are the prompt
    (rendered with the chat template and its generation prompt), the column reaches the reward functions."""
    from lmforge.align.data import build_prompt_datasets

    turns = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 6 times 7?"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": turns, "answer": "42"}) + "\n")
    tok = Tokenizer.from_dir(ckpt)
    data, _, report = build_prompt_datasets(DataConfig(path=str(tmp_path / "chat.jsonl")), tok, max_prompt_len=128)
    assert len(data) == 1 and report.bad_row_count == 0 and data.rows[0]["messages"] == turns
    assert data.rows[0]["tokens"] == tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    rs = RewardSet([RewardSpec(fn="number_match")])
    rs.check_columns(data.rows, "data.path")
    scores, _ = rs([turns], ["\\boxed{42}"], [data.rows[0]["record"]], [[1]], [[2]])
    assert scores.tolist() == [[1.0]]


# ------------------------------------------------------------------------------------------------ engine in the loop


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("grpo") / "tiny")


def _prompt_rows(tok, n=4):
    text = "Tell me about the quick brown fox and the lazy dog, then say hello to the world please"
    return PromptDataset([{"tokens": tok.apply_chat_template([{"role": "user", "content": f"{text} {i}"}],
                                                             add_generation_prompt=True, tokenize=True),
                           "messages": [], "record": {}} for i in range(n)])


@pytest.mark.parametrize("method", ["lora", "full", "qlora"])  # qlora: the engine runs the NF4 base + live LoRA
def test_rollouts_use_the_live_weights_and_a_fresh_prefix_cache(ckpt, tmp_path, method):
    tok = Tokenizer.from_dir(ckpt)
    model = load_hf(ckpt)
    options = {"lora": {"r": 4, "target_modules": "all-linear"},
               "qlora": {"r": 4, "block_size": 32, "compute_dtype": "float32"}}.get(method, {})
    m = build_method(method, **options)
    m.apply(model)
    cfg = GRPOSection(rewards=[RewardSpec(fn="format")], num_generations=2, max_new_tokens=6)
    obj = GRPOObjective(cfg, tok, RewardSet(cfg.rewards))
    align = AlignConfig(stage="grpo", model=ModelSection(path="unused"), data=DataConfig(path="unused"), grpo=cfg,
                        optim=OptimSection(lr=1e-3),
                        train=TrainSection(output_dir=str(tmp_path), micro_batch_size=4, device="cpu",
                                           precision="fp32", progress=False, tensorboard=False))
    data = _prompt_rows(tok)
    trainer = Trainer(model, m, data, None, align, tok.pad_id, CPU, objective=obj)
    prompts = [r["tokens"] for r in data.rows]
    assert len(prompts[0]) > 32  # two full KV blocks: cached prefixes would be reused without a reset

    def engine_logps():
        """Greedy completions and the engine's log-probs of them (temperature 1, as the trainer computes)."""
        eng = obj.engine or obj.build_engine(trainer.ctx)
        params = SamplingParams(temperature=0, max_new_tokens=6, logprobs=0, ignore_eos=True)
        ids = [eng.add_request(p, params) for p in prompts]
        done = {}
        while len(done) < len(ids):
            done.update({o.request_id: o for o in eng.step() if o.finished})
        eng.reset_prefix_cache()
        outs = [done[i] for i in ids]
        return [o.token_ids for o in outs], torch.tensor([[lp.logprob for lp in o.logprobs] for o in outs])

    def trainer_logps(replies):
        b = pad_rollout(prompts, replies, tok.pad_id)
        with torch.no_grad():
            return reply_logps(model.eval(), b["tokens"], b["positions"], b["mask"], int(b["prompt_len"]), 1.0)[0]

    first = obj.sample(trainer.ctx, prompts, seed=3)
    assert len(obj.engine.pool.cached) == 0 and obj.engine.runner.cache.k.numel() == 0  # reset and released
    again = obj.sample(trainer.ctx, prompts, seed=3)
    assert [o.token_ids for o in again] == [o.token_ids for o in first]  # seeded: same weights, same samples
    replies, lp = engine_logps()
    torch.testing.assert_close(lp, trainer_logps(replies), atol=2e-4, rtol=0)
    with torch.no_grad():  # an update in place, as the optimizer does: no copy anywhere
        g = torch.Generator().manual_seed(0)
        for _, p in m.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    changed = obj.sample(trainer.ctx, prompts, seed=3)
    assert [o.token_ids for o in changed] != [o.token_ids for o in first]
    replies2, lp2 = engine_logps()  # prompts' K/V recomputed with the new weights, not read from the prefix cache
    torch.testing.assert_close(lp2, trainer_logps(replies2), atol=2e-4, rtol=0)
    assert not torch.allclose(lp2[:, 0], lp[:, 0])
    rec = trainer.train_step()  # and a whole step runs on that engine
    assert {"reward", "reward_format", "gen_s", "train_s", "rollout_tokens_per_s", "zero_std_groups",
            "clip_fraction", "completion_len"} <= rec.keys() and math.isfinite(rec["loss"])


def test_old_logps_reference_kl_and_dynamic_sampling(ckpt, tmp_path):
    """num_iterations=2 keeps the rollout's log-probs: the first pass is on-policy (ratio 1, KL to the LoRA-off
    reference 0), the second is not; dynamic sampling keeps only groups with reward spread."""
    tok = Tokenizer.from_dir(ckpt)
    model = load_hf(ckpt)
    m = build_method("lora", r=4, target_modules="all-linear")
    m.apply(model)
    reward = tmp_path / "r.py"
    reward.write_text("def ids(prompts, completions, completion_ids, flat):\n"  # flat prompts: no spread
                      "    return [0.0 if f else float(sum(c) % 3) for c, f in zip(completion_ids, flat)]\n")
    cfg = GRPOSection(rewards=[RewardSpec(fn=f"{reward}:ids")], num_generations=4, prompts_per_step=2,
                      max_new_tokens=5, num_iterations=2, beta=0.1, dynamic_sampling=True, loss_type="grpo",
                      temperature=1.5)
    obj = GRPOObjective(cfg, tok, RewardSet(cfg.rewards))
    align = AlignConfig(stage="grpo", model=ModelSection(path="unused"), data=DataConfig(path="unused"), grpo=cfg,
                        optim=OptimSection(lr=1e-2),
                        train=TrainSection(output_dir=str(tmp_path), micro_batch_size=4, device="cpu",
                                           precision="fp32", progress=False, tensorboard=False))
    data = _prompt_rows(tok, 6)
    for i, r in enumerate(data.rows):
        r["record"] = {"flat": i % 2 == 0}
    trainer = Trainer(model, m, data, None, align, tok.pad_id, CPU, objective=obj)
    assert obj.reference == "adapters_off" and obj.unit == "completions"
    first = trainer.train_step()
    assert first["approx_kl"] == pytest.approx(0, abs=1e-6) and first["kl"] == pytest.approx(0, abs=1e-6)
    assert first["clip_fraction"] == 0 and len(obj.buffer) == 1  # the second pass over this rollout is waiting
    step = obj.buffer[0]
    assert all({"old_logps", "ref_logps"} <= mb.keys() for mb in step)
    kept = torch.cat([mb["advantages"] for mb in step])
    assert len(kept) == first["groups_kept"] * 4 == 8  # refilled to prompts_per_step groups with spread
    assert first["rollout_prompts"] > 2 and first["zero_std_groups"] > 0  # flat groups were sampled, and dropped
    assert kept.abs().sum() > 0
    second = trainer.train_step()
    assert second["approx_kl"] > 0 and second["kl"] > 0 and "reward" not in second  # same rollout, moved policy
    assert "reward" in trainer.train_step()  # a fresh rollout


def test_mask_truncated_drops_cut_completions_from_the_loss(ckpt, tmp_path):
    """DAPO's overlong filtering (grpo.mask_truncated): completions cut at max_new_tokens keep no loss token; those
    that stopped keep theirs, ending with the stop token."""
    tok = Tokenizer.from_dir(ckpt)
    model = load_hf(ckpt)
    m = build_method("full")
    m.apply(model)
    cfg = GRPOSection(rewards=[RewardSpec(fn="format")], num_generations=4, prompts_per_step=2, max_new_tokens=3,
                      mask_truncated=True)
    obj = GRPOObjective(cfg, tok, RewardSet(cfg.rewards))
    align = AlignConfig(stage="grpo", model=ModelSection(path="unused"), data=DataConfig(path="unused"), grpo=cfg,
                        train=TrainSection(output_dir=str(tmp_path), micro_batch_size=8, device="cpu",
                                           precision="fp32", progress=False, tensorboard=False))
    trainer = Trainer(model, m, _prompt_rows(tok), None, align, tok.pad_id, CPU, objective=obj)
    (mb,) = obj.micro_batches(trainer.ctx)
    assert obj._log["truncated_share"] > 0
    P, lengths = int(mb["prompt_len"]), mb["mask"].sum(-1)
    assert int((lengths == 0).sum()) == round(obj._log["truncated_share"] * 8)  # every cut completion, masked
    for row, n in enumerate(lengths.tolist()):
        if n:
            assert int(mb["tokens"][row, P + n - 1]) == obj.stop_id


# ------------------------------------------------------------------------------------------------ end to end


def test_lmforge_train_grpo_raises_a_verifiable_reward(ckpt, tmp_path):
    from lmforge.cli import main

    words = "the quick brown fox jumps over lazy dog hello world model token".split()
    g = torch.Generator().manual_seed(0)
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for _ in range(48):
            f.write(json.dumps({"prompt": " ".join(words[int(i)] for i in torch.randint(len(words), (5,), generator=g)),
                                "letter": "e"}) + "\n")
    (tmp_path / "rewards.py").write_text(
        "def letter_share(prompts, completions, letter):\n"
        "    return [c.count(x) / max(len(c), 1) for c, x in zip(completions, letter)]\n")
    (tmp_path / "grpo.yaml").write_text(f"""
stage: grpo
method: full
model: {{path: {ckpt}}}
data: {{path: {tmp_path / 'prompts.jsonl'}, max_seq_len: 48}}
grpo:
  rewards: [{{fn: "{tmp_path / 'rewards.py'}:letter_share"}}]
  num_generations: 8
  prompts_per_step: 2
  max_new_tokens: 6
optim: {{lr: 0.01}}
schedule: {{kind: constant}}
train: {{output_dir: {tmp_path / 'out'}, max_steps: 40, micro_batch_size: 16, device: cpu, precision: fp32,
        progress: false, tensorboard: false, save_every: 0, seed: 0}}
""")
    assert main(["train", str(tmp_path / "grpo.yaml")]) == 0
    recs = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "reward" in r]
    first, last = sum(r["reward"] for r in steps[:3]) / 3, sum(r["reward"] for r in steps[-3:]) / 3
    print(f"GRPO: share of 'e' in completions {first:.3f} -> {last:.3f}")
    assert last > first + 0.2  # measured 0.07 -> 0.50 with train seeds 0, 1 and 2
    assert all(0 <= r["clip_fraction"] <= 1 and r["gen_s"] > 0 and r["rollout_tokens_per_s"] > 0 for r in steps)
    assert (tmp_path / "out" / "final" / "model.safetensors").exists() or any((tmp_path / "out" / "final").iterdir())


def test_the_documented_grpo_run_logs_every_figure_to_tensorboard_and_exports(ckpt, tmp_path, monkeypatch):
    """docs/alignment.md's GRPO run as written, at small size: examples/align_grpo.yaml (its three weighted rewards,
    one from examples/grpo_rewards.py) on GSM8K rows, `lmforge export --adapter`, then generation from the merged
    model. Every step figure of the JSONL metrics reaches TensorBoard with the same value: reward mean/std overall
    and per reward, clip fraction, completion lengths, zero-spread groups, rollout tokens/s and the gen_s/train_s
    split; at the default beta 0 no KL is logged (no reference is computed)."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lmforge.cli import main

    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(8)]
    for name, part in (("train", rows), ("test", rows[:2])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the example names examples/grpo_rewards.py
    out = tmp_path / "run"
    assert main(["train", "examples/align_grpo.yaml", f"model.path={ckpt}", f"data.path={tmp_path / 'train.jsonl'}",
                 f"data.val_path={tmp_path / 'test.jsonl'}", "data.max_seq_len=64", "grpo.max_new_tokens=8",
                 "grpo.num_generations=2", "grpo.prompts_per_step=2", "train.max_steps=2", "train.micro_batch_size=4",
                 "train.device=cpu", "train.eval_every=2", "train.save_every=0", "train.progress=false",
                 f"train.output_dir={out}"]) == 0
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    assert len(steps) == 2 and not any("kl" in r for r in steps)
    want = {"reward", "reward_std", "clip_fraction", "approx_kl", "completion_len", "completion_len_min",
            "completion_len_max", "zero_std_groups", "reward_missing", "rollout_tokens_per_s", "gen_s", "train_s",
            *(f"reward_{n}{s}" for n in ("number_match", "format", "brevity") for s in ("", "_std"))}
    assert want <= steps[0].keys(), want - steps[0].keys()
    tb = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    for r in steps:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                got = {e.step: e.value for e in tb.Scalars(k)}
                assert got[r["step"]] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    merged = tmp_path / "merged"
    assert main(["export", str(ckpt), "--adapter", str(out / "final"), "--out", str(merged)]) == 0
    assert main(["generate", str(merged), "--prompt", "What is 2 plus 2?", "--chat", "--max-new-tokens", "4",
                 "temperature=0"]) == 0


# ------------------------------------------------------------------------------------------------ ORPO, KTO

QUESTIONS = ["Name a colour.", "What is two plus two?", "Say hello.", "Pick a fruit."]
REPLIES = [("Blue.", "Seven."), ("Four.", "Banana."), ("Hello!", "No."), ("An apple.", "Four hundred.")]


@pytest.fixture(scope="module")
def pairs(ckpt):
    tok = Tokenizer.from_dir(ckpt)
    rows = []
    for q, (good, bad) in zip(QUESTIONS, REPLIES):
        (ct, cl), (rt, rl) = (encode_reply(tok, [{"role": "user", "content": q}], r) for r in (good, bad))
        rows.append({"chosen_tokens": ct, "chosen_labels": cl, "rejected_tokens": rt, "rejected_labels": rl})
    return rows


def _trainer(ckpt, pairs, tmp_path, objective, stage, lr=3e-3, method="full"):
    model = load_hf(ckpt)
    m = build_method(method, **({"r": 8, "alpha": 16, "target_modules": "all-linear"} if method == "lora" else {}))
    m.apply(model)
    cfg = AlignConfig(stage=stage, model=ModelSection(path="unused"), data=DataConfig(path="unused"),
                      optim=OptimSection(lr=lr),
                      train=TrainSection(output_dir=str(tmp_path), max_steps=100, micro_batch_size=4, device="cpu",
                                         precision="fp32", progress=False, tensorboard=False, grad_clip=None))
    return model, Trainer(model, m, PreferenceDataset(pairs, []), None, cfg, 0, CPU, objective=objective)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_orpo_matches_its_formula_and_raises_the_odds_ratio(ckpt, pairs, tmp_path, method):
    obj = ORPOObjective(ORPOSection(beta=0.5))
    model, trainer = _trainer(ckpt, pairs, tmp_path, obj, "orpo", method=method, lr=3e-3 if method == "full" else 1e-2)
    batch = obj.collate(pairs, trainer.ctx)
    with torch.no_grad():
        loss, metrics = obj.loss_sum(trainer.ctx, batch, 4)
        logp, count = sequence_logps(model, batch)
    want = 0.0
    (lcs, lrs), (ncs, nrs) = logp.double().chunk(2), count.double().chunk(2)
    for lc, lr_, nc, nr in zip(lcs.tolist(), lrs.tolist(), ncs.tolist(), nrs.tolist()):
        pc, pr = math.exp(lc / nc), math.exp(lr_ / nr)  # per-token probabilities, then the odds ratio
        ratio = (pc / (1 - pc)) / (pr / (1 - pr))
        want += -lc / nc - 0.5 * math.log(1 / (1 + 1 / ratio))
    assert float(loss) == pytest.approx(want, rel=1e-4)
    first = metrics["log_odds_ratio"] / 4
    for _ in range(15):
        rec = trainer.train_step()
    assert rec["log_odds_ratio"] > first + 1.0 and rec["reward_accuracy"] == 1.0  # the chosen replies win
    assert rec["nll"] < metrics["nll"] / 4  # and the SFT term taught them


@pytest.mark.parametrize("method", ["full", "lora"])
def test_kto_matches_its_formula_and_separates_the_replies(ckpt, tmp_path, method):
    from lmforge.align.config import KTOSection
    from lmforge.align.kto import KTOObjective, build_kto_datasets

    rows = []
    for q, (good, bad) in zip(QUESTIONS, REPLIES):  # unpaired: each reply its own row, kto_tag as LLaMA-Factory has it
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
                     "label": True})
        rows.append({"prompt": q, "completion": bad, "label": "false"})
    rows.append({"prompt": "x", "completion": "y"})  # no label: a bad row, reported, not fatal
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = Tokenizer.from_dir(ckpt)
    data, _, report = build_kto_datasets(DataConfig(path=str(path), max_seq_len=64), tok)
    assert len(data) == 8 and report.bad_row_count == 1 and [r["desirable"] for r in data.rows][:2] == [True, False]
    obj = KTOObjective(KTOSection(beta=0.5, undesirable_weight=1.5))
    model = load_hf(ckpt)
    m = build_method(method, **({"r": 8, "alpha": 16, "target_modules": "all-linear"} if method == "lora" else {}))
    m.apply(model)
    cfg = AlignConfig(stage="kto", model=ModelSection(path="unused"), data=DataConfig(path="unused"),
                      optim=OptimSection(lr=3e-3 if method == "full" else 1e-2),
                      train=TrainSection(output_dir=str(tmp_path / "o"), max_steps=100, micro_batch_size=8,
                                         device="cpu", precision="fp32", progress=False, tensorboard=False))
    trainer = Trainer(model, m, data, None, cfg, tok.pad_id, CPU, objective=obj)
    assert obj.reference == ("adapters_off" if method == "lora" else "precomputed")
    batch = obj.collate([data[i] for i in range(len(data))], trainer.ctx)  # (with the precomputed reference)
    with torch.no_grad():  # at the start the policy is the reference: r = 0, z0 = 0, every loss is w * (1 - 1/2)
        loss, metrics = obj.loss_sum(trainer.ctx, batch, 8)
    assert float(loss) == pytest.approx(4 * 0.5 + 4 * 1.5 * 0.5, rel=1e-5) and metrics["kl"] == pytest.approx(0)

    def margin():
        with torch.no_grad():
            logp = sequence_logps(model.eval(), {k: batch[k][:8] for k in ("tokens", "positions", "labels")})[0]
        return float(logp[0::2].mean() - logp[1::2].mean())  # desirable minus undesirable replies, nats

    before = margin()
    for _ in range(15):
        rec = trainer.train_step()
    assert margin() > before + 5 and rec["reward_desirable"] > 0 > rec["reward_undesirable"]
    # the loss of the trained policy, from its log-ratios by the paper's formula
    with torch.no_grad():
        loss, _ = obj.loss_sum(trainer.ctx, batch, 8)
        logp = sequence_logps(model, batch)[0]
        ref = obj._reference(trainer.ctx, batch)
    r, z0 = (logp - ref)[:8], max(0.0, float((logp - ref)[8:].mean()))
    d = batch["desirable"]
    want = sum(float(1 - torch.sigmoid(0.5 * (r[i] - z0))) if d[i] else 1.5 * float(1 - torch.sigmoid(0.5 * (z0 - r[i])))
               for i in range(8))
    assert float(loss) == pytest.approx(want, rel=1e-4)


def test_lmforge_train_grpo_bad_rewards_and_missing_columns(ckpt, tmp_path, capsys, caplog):
    """Issue 31's bad input through `lmforge train`: a prompts file without the column a reward function reads stops
    before training in one line naming the reward, the column and the fix; a reward that raises, returns the wrong
    count or NaN is reported with the prompt index and the run goes on, those scores counted in reward_missing."""
    from lmforge.cli import main

    rows = [{"prompt": f"say hello {i}", "answer": str(i)} for i in range(6)] + [{"prompt": "say hi"}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rw.py").write_text(
        "def needs(prompts, completions, answer):\n    return [1.0] * len(completions)\n"
        "def wrong_len(prompts, completions):\n    return [0.5] * (len(completions) + 1)\n"
        "def flaky(prompts, completions):\n"
        "    if len(completions) > 1:\n        raise RuntimeError('boom')\n"
        "    return [float('nan')] if len(completions[0]) % 2 else [1.0]\n")
    args = ["train", "stage=grpo", "method=lora", f"model.path={ckpt}", f"data.path={tmp_path / 'prompts.jsonl'}",
            "data.max_seq_len=48", "grpo.num_generations=2", "grpo.max_new_tokens=4", "train.max_steps=2",
            "train.micro_batch_size=4", "train.device=cpu", "train.progress=false", "train.tensorboard=false",
            "train.save_every=0"]
    rw = tmp_path / "rw.py"
    assert main([*args, f"train.output_dir={tmp_path / 'a'}", f'grpo.rewards=[{{fn: "{rw}:needs"}}]']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (tmp_path / "a" / "metrics.jsonl").exists(), err
    assert (f"grpo.rewards[0] ({rw}:needs) reads column 'answer', which 1 of 7 prompts in data.path lack; add it to "
            "every row, or give the function's parameter 'answer' a default") in err
    with caplog.at_level("WARNING", logger="lmforge.grpo"):
        assert main([*args, f"train.output_dir={tmp_path / 'b'}",
                     f'grpo.rewards=[{{fn: "{rw}:wrong_len"}}, {{fn: "{rw}:flaky"}}]']) == 0
    assert "reward 'wrong_len' failed on prompt 0 (completion 0): ValueError: returned 2 values for 1" in caplog.text
    wrong = [r.message for r in caplog.records if r.message.startswith("reward 'wrong_len' failed on prompt")]
    assert len(wrong) == 2 and all(m.endswith("; and on 3 more completions (prompts 0, 1); marked missing")
                                   for m in wrong)  # one line per reward and step, not one per completion
    assert "reward 'flaky' failed on the batch (RuntimeError: boom)" in caplog.text
    recs = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "reward_missing" in r]
    assert len(steps) == 2 and all(r["reward_missing"] >= 4 for r in steps)  # every wrong_len score, each step
    assert all(math.isfinite(r["loss"]) for r in steps) and (tmp_path / "b" / "final").is_dir()
