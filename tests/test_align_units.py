"""Alignment mechanics on tiny models: log-probs, GAE, the LoRA-off reference, DPO/IPO/SimPO starting values and
reference modes, reward-model files (transformers reads them), checkpoints with heads, PPO's first step, config errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.align.common import WithHeads, adapters_disabled, token_logps
from lmforge.align.config import DPOSection, PPOSection, RewardSection
from lmforge.align.data import PreferenceDataset, PromptDataset, encode_reply
from lmforge.align.dpo import DPOObjective
from lmforge.align.ppo import PolicyWithValue, PPOObjective, gae, load_reward_fn
from lmforge.align.reward import RewardModel, RewardObjective, load_reward_model, save_reward_model
from lmforge.align.run import AlignConfig
from lmforge.data import DataConfig
from lmforge.data.encode import IGNORE
from lmforge.errors import ConfigError
from lmforge.models import ModelConfig, Transformer, load_hf
from lmforge.peft.lora import lora_layers
from lmforge.peft.methods import build_method
from lmforge.testing import make_tiny_checkpoint
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import ModelSection, OptimSection, TrainSection
from lmforge.train.trainer import Trainer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("align_units") / "tiny")


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_dir(ckpt)


QUESTIONS = ["Name a colour.", "What is two plus two?", "Say hello.", "Pick a fruit."]
REPLIES = [("Blue.", "Seven."), ("Four.", "Banana."), ("Hello!", "No."), ("An apple.", "Four hundred.")]


@pytest.fixture(scope="module")
def pairs(tok):
    rows = []
    for q, (good, bad) in zip(QUESTIONS, REPLIES):
        (ct, cl), (rt, rl) = (encode_reply(tok, [{"role": "user", "content": q}], r) for r in (good, bad))
        rows.append({"chosen_tokens": ct, "chosen_labels": cl, "rejected_tokens": rt, "rejected_labels": rl})
    return rows


def _cfg(tmp_path, stage="dpo", **kw) -> AlignConfig:
    train = dict(output_dir=str(tmp_path), max_steps=kw.pop("max_steps", 4), micro_batch_size=kw.pop("mbs", 2),
                 device="cpu", precision="fp32", progress=False, tensorboard=False, grad_clip=None)
    return AlignConfig(stage=stage, model=ModelSection(path="unused"), data=DataConfig(path="unused"),
                       optim=OptimSection(lr=kw.pop("lr", 1e-3)), train=TrainSection(**train), **kw)


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


# ------------------------------------------------------------------------------------------------ building blocks


def test_token_logps_match_log_softmax_and_its_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.tensor([[3, IGNORE, 7, 1, IGNORE], [IGNORE, 0, 10, 4, 2]])
    logp, entropy = token_logps(head, hidden, labels, 0.7, with_entropy=True, chunk_elements=3 * 11)  # 3-row chunks
    full = torch.log_softmax(head(hidden) / 0.7, -1)
    want = full.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != IGNORE)
    torch.testing.assert_close(logp, want)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1) * (labels != IGNORE))
    (g1,) = torch.autograd.grad(logp.sum() + entropy.sum(), hidden)
    (g2,) = torch.autograd.grad((want + -(full.exp() * full).sum(-1) * (labels != IGNORE)).sum(), hidden)
    torch.testing.assert_close(g1, g2)


def test_gae_follows_the_recursion():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0], [0.5, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.3, 0.2, 0.4, 9.0], [1.0, -1.0, 9.0, 9.0]])  # 9s sit past the end: must not count
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate((3, 2)):
        v, r = values[i, :n].tolist() + [0.0], rewards[i, :n].tolist()
        expected, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            running = r[t] + gamma * v[t + 1] - v[t] + gamma * lam * running
            expected[t] = running
        torch.testing.assert_close(adv[i, :n], torch.tensor(expected))
        torch.testing.assert_close(ret[i, :n], torch.tensor(expected) + values[i, :n])
        assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0


@pytest.mark.parametrize("dora", [False, True])
def test_adapters_disabled_runs_the_base_model_exactly(dora):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32))
    tokens = torch.randint(0, 50, (2, 9))
    base = model(tokens)
    build_method("lora", r=4, target_modules="all-linear", use_dora=dora).apply(model)
    _randomize_lora(model)
    adapted = model(tokens)
    assert (adapted - base).abs().max() > 1e-3
    with adapters_disabled(model):
        torch.testing.assert_close(model(tokens), base, rtol=0, atol=0)
    torch.testing.assert_close(model(tokens), adapted, rtol=0, atol=0)
    assert len(lora_layers(model)) == 14  # put back


# ------------------------------------------------------------------------------------------------ DPO


@pytest.mark.parametrize("method, loss, start", [
    ("lora", "sigmoid", math.log(2)), ("full", "sigmoid", math.log(2)), ("lora", "ipo", (1 / (2 * 0.1)) ** 2)])
def test_dpo_starts_at_its_closed_form_and_learns(ckpt, tok, pairs, tmp_path, method, loss, start):
    """Policy == reference at step 0 whether the reference is the LoRA-off model or precomputed log-probs, so
    DPO's loss is log 2 and IPO's (1 / 2beta)^2; training on the pairs lowers the loss and widens the margin."""
    model = load_hf(ckpt)
    m = build_method(method, **({"r": 8, "alpha": 16, "target_modules": "all-linear"} if method == "lora" else {}))
    m.apply(model)
    data, val = PreferenceDataset(pairs, []), PreferenceDataset(list(pairs), [])
    obj = DPOObjective(DPOSection(loss=loss, beta=0.1))
    trainer = Trainer(model, m, data, val, _cfg(tmp_path, lr=5e-3), pad_id=tok.pad_id, device=CPU, objective=obj)
    assert obj.reference == ("adapters_off" if method == "lora" else "precomputed")
    assert (data.ref_logps is None) == (method == "lora")
    before = trainer.evaluate()
    assert before["eval_loss"] == pytest.approx(start, rel=1e-4)
    assert before["eval_margin"] == pytest.approx(0.0, abs=1e-4)
    for _ in range(4):
        trainer.train_step()
    after = trainer.evaluate()
    assert after["eval_loss"] < start and after["eval_margin"] > 0.05 and after["eval_reward_accuracy"] == 1.0


def test_simpo_needs_no_reference_and_dpo_refuses_an_impossible_one(ckpt, tok, pairs, tmp_path):
    model = load_hf(ckpt)
    m = build_method("full")
    m.apply(model)
    simpo = DPOObjective(DPOSection(loss="simpo", beta=2.0, simpo_gamma=0.5))
    trainer = Trainer(model, m, PreferenceDataset(pairs, []), None, _cfg(tmp_path), tok.pad_id, CPU, objective=simpo)
    assert simpo.reference is None and trainer.train_data.ref_logps is None
    assert math.isfinite(trainer.train_step()["loss"])
    with pytest.raises(ConfigError, match="adapters_off needs a LoRA run"):
        Trainer(model, m, PreferenceDataset(pairs, []), None, _cfg(tmp_path), tok.pad_id, CPU,
                objective=DPOObjective(DPOSection(reference="adapters_off")))


# ------------------------------------------------------------------------------------------------ reward model


def test_reward_model_files_load_back_and_transformers_reads_them(ckpt, tok, pairs, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    backbone = load_hf(ckpt)
    m = WithHeads(build_method("lora", r=4, target_modules="all-linear"), ["score"])
    rm = RewardModel(backbone)
    m.apply(rm)
    _randomize_lora(backbone)
    with torch.no_grad():
        rm.score.weight.normal_()
    from lmforge.align.data import collate_pairs

    batch = collate_pairs(pairs, tok.pad_id)  # right-padded rows of different lengths
    rewards = rm(batch["tokens"], batch["positions"])
    out = save_reward_model(rm, tmp_path / "rm", m.method)  # LoRA merged into the saved backbone
    torch.testing.assert_close(load_reward_model(out)(batch["tokens"], batch["positions"]), rewards,
                               rtol=1e-4, atol=1e-4)
    load_hf(out)  # the backbone alone still loads as a causal LM (the index lists only its shard)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.num_labels == 1
    from safetensors.torch import load_file

    hf.score.weight.data.copy_(load_file(out / "score.safetensors")["score.weight"])
    with torch.no_grad():
        hf_rewards = hf(input_ids=batch["tokens"], attention_mask=(batch["positions"] >= 0).long()).logits[:, 0]
    torch.testing.assert_close(hf_rewards, rewards, rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="not a reward model"):
        load_reward_model(ckpt)


def test_checkpoints_carry_the_head_and_resume_restores_it(ckpt, tok, pairs, tmp_path):
    def build():
        rm = RewardModel(load_hf(ckpt))
        m = WithHeads(build_method("lora", r=4, target_modules="all-linear"), ["score"])
        m.apply(rm)
        return rm, m

    rm, m = build()
    cfg = _cfg(tmp_path, stage="rm", max_steps=3, lr=1e-2)
    trainer = Trainer(rm, m, PreferenceDataset(pairs, []), None, cfg, tok.pad_id, CPU, objective=RewardObjective())
    assert {n for n, _ in trainer.params} >= {"score.weight"}
    for _ in range(3):
        trainer.train_step()
    trainer.save()
    assert "score.weight" in m.state_dict(rm) and any(k.startswith("backbone.layers.0") for k in m.state_dict(rm))
    fresh, m2 = build()
    resumed = Trainer(fresh, m2, PreferenceDataset(pairs, []), None, cfg, tok.pad_id, CPU, objective=RewardObjective())
    assert resumed.maybe_resume() == 3
    for name, t in m.state_dict(rm).items():
        torch.testing.assert_close(m2.state_dict(fresh)[name], t, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ PPO


def _prompts(tok, n=8):
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}]
        rows.append({"tokens": tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True),
                     "messages": msgs})
    return PromptDataset(rows)


def _length_reward(prompts, completions):
    return [len(c) / 10 for c in completions]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_ppo_first_step_has_ratio_one_and_zero_kl(ckpt, tok, tmp_path, method):
    model = PolicyWithValue(load_hf(ckpt))
    m = WithHeads(build_method(method, **({"r": 4, "target_modules": "all-linear"} if method == "lora" else {})),
                  ["value_head"])
    m.apply(model)
    ppo = PPOSection(reward_fn="unused:fn", max_new_tokens=6, rollout_batch_size=8, ppo_epochs=2)
    obj = PPOObjective(ppo, tok, _length_reward)
    trainer = Trainer(model, m, _prompts(tok), _prompts(tok, 4), _cfg(tmp_path, stage="ppo", ppo=ppo, mbs=4),
                      tok.pad_id, CPU, objective=obj)
    assert obj.reference == ("adapters_off" if method == "lora" else "copy")
    rec = trainer.train_step()
    # first micro-batches of a rollout: the policy is the one that sampled, and it equals the reference
    assert rec["clip_fraction"] == 0 and rec["approx_kl"] == pytest.approx(0, abs=1e-6)
    assert rec["kl"] == pytest.approx(0, abs=1e-4) and rec["reply_tokens"] > 0
    assert 0 < rec["entropy"] and math.isfinite(rec["loss"]) and rec["reward_mean"] > 0
    assert len(obj.buffer) == 2 * 8 // 4 - 1  # ppo_epochs x micro-batches per rollout, one step taken
    mb = obj.buffer[0]  # sequence-level metrics come out as per-sequence means after the loop divides by tokens
    units = int(mb["mask"].sum())
    with torch.no_grad():
        _, metrics = obj.loss_sum(trainer.ctx, mb, units)
    assert metrics["reward_mean"] / units == pytest.approx(float(mb["scores"].mean()))
    assert metrics["reply_len"] / units == pytest.approx(units / len(mb["scores"]))
    trainer.train_step()
    assert trainer.train_step()["approx_kl"] > 0  # a later pass over the same rollout: the policy has moved
    ev = trainer.evaluate()
    assert set(ev) >= {"eval_reward_mean", "eval_kl", "eval_loss"} and ev["eval_kl"] != 0  # the policy moved


def test_ppo_config_errors(ckpt, tok, tmp_path):
    with pytest.raises(ConfigError, match="stage ppo needs a reward"):
        from lmforge.config import load_config

        load_config(AlignConfig, base={"stage": "ppo", "model": {"path": "x"}, "data": {"path": "y"}})
    model = PolicyWithValue(load_hf(ckpt))
    m = WithHeads(build_method("full"), ["value_head"])
    m.apply(model)
    ppo = PPOSection(reward_fn="unused:fn", rollout_batch_size=6)
    with pytest.raises(ConfigError, match=r"rollout_batch_size \(6\) must be a multiple .* \(4\)"):
        Trainer(model, m, _prompts(tok), None, _cfg(tmp_path, stage="ppo", ppo=ppo, mbs=4), tok.pad_id, CPU,
                objective=PPOObjective(ppo, tok, _length_reward))
    with pytest.raises(ConfigError, match="must look like"):
        load_reward_fn("no_function_here")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        load_reward_fn("lmforge.align.demo:nope")
    assert load_reward_fn("lmforge.align.demo:mentions_target")([[]], ["reversed: a z"]) == [1.0]
    fn_file = tmp_path / "my_reward.py"
    fn_file.write_text("def score(prompts, completions):\n    return [1.5 for _ in completions]\n")
    assert load_reward_fn(f"{fn_file}:score")([[]], ["x"]) == [1.5]


def test_reward_section_center_coef_penalises_offset_rewards(ckpt, tok, pairs, tmp_path):
    rm = RewardModel(load_hf(ckpt))
    m = WithHeads(build_method("full"), ["score"])
    m.apply(rm)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1)
    plain, centred = RewardObjective(), RewardObjective(RewardSection(center_coef=0.5))
    trainer = Trainer(rm, m, PreferenceDataset(pairs, []), None, _cfg(tmp_path, stage="rm"), tok.pad_id, CPU,
                      objective=plain)
    batch = plain.collate(pairs, trainer.ctx)
    with torch.no_grad():
        a, _ = plain.loss_sum(trainer.ctx, batch, 4)
        b, _ = centred.loss_sum(trainer.ctx, batch, 4)
        r = rm(batch["tokens"], batch["positions"])
    c, rj = r.chunk(2)
    torch.testing.assert_close(b - a, 0.5 * ((c + rj) ** 2).sum())


def test_align_config_round_trips_through_yaml(tmp_path):
    from lmforge.config import dump_config, load_config

    cfg = AlignConfig(stage="dpo", model=ModelSection(path="m"), data=DataConfig(path="d"),
                      dpo=DPOSection(loss="ipo", beta=0.2))
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(AlignConfig, path, ["dpo.beta=0.3"])
    assert (again.stage, again.dpo.loss, again.dpo.beta) == ("dpo", "ipo", 0.3)
    with pytest.warns(UserWarning, match="its 'dpo' section is not used"):  # stage=rm replaces the file's stage
        assert load_config(AlignConfig, path, ["stage=rm"]).dpo == DPOSection()
    with pytest.raises(ConfigError, match="is an option of stage 'dpo', but stage is 'rm'"):
        load_config(AlignConfig, path, ["stage=rm", "dpo.beta=0.3"])  # set on the command line: refused
    with pytest.raises(ConfigError, match="dpo.los"):
        load_config(AlignConfig, path, ["dpo.los=ipo"])
    json.dumps(again.model_dump(mode="json"))


@pytest.mark.parametrize("name", ["align_rm", "align_dpo", "align_ppo", "align_dpo_demo", "align_grpo", "align_orpo", "align_kto"])
def test_example_configs_are_valid(name):
    from pathlib import Path

    from lmforge.config import load_config

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.yaml"
    cfg = load_config(AlignConfig, path)
    assert cfg.stage == name.split("_")[1]
