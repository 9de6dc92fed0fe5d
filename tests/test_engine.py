"""Serving engine: greedy parity with generate() under continuous batching, chunked prefill, preemption, prefix
caching, per-request sampling, stop rules, JSON mode, several LoRA adapters at once, aborts."""
from __future__ import annotations

import json
import random

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer import LLM, SamplingParams, generate
from lmforge.infer.engine import ContextLengthError, Engine, EngineConfig
from lmforge.infer.engine.paged_cache import BlockPool, block_hashes
from lmforge.infer.kernels.options import KernelOptions
from lmforge.models import load_hf
from lmforge.testing import make_tiny_checkpoint
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


GREEDY = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)


def _prompts(n: int, lo: int = 1, hi: int = 60, seed: int = 0, vocab: int = 120) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("engine") / "tiny")


@pytest.fixture(scope="module")
def model(ckpt):
    return load_hf(ckpt, progress=False)


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_dir(ckpt)


def _engine(model, tokenizer=None, **cfg) -> LLM:
    return LLM(model, tokenizer, config=EngineConfig(**{"block_size": 4, "num_blocks": 512, **cfg}))


def test_greedy_matches_generate_for_32_mixed_length_prompts_served_concurrently(model):
    prompts = _prompts(32, vocab=500)
    want = [r.token_ids for r in generate(model, prompts, GREEDY)]
    # a small token budget forces chunked prefill, mixed prefill/decode steps and multi-step decodes
    llm = _engine(model, max_num_batched_tokens=48, decode_steps=4)
    out = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in out] == want
    assert all(o.finish_reason == "length" for o in out)
    stats = llm.engine.stats()
    assert stats["steps"] < sum(map(len, prompts)) // 4  # requests really were batched together
    assert stats["free_blocks"] == stats["num_blocks"] - 1  # every block came back (block 0 is never lent)
    # the same through the static-shape decode path CUDA graphs replay (bucketed batch sizes, padding rows)
    llm = _engine(model, max_num_batched_tokens=48, decode_steps=4, max_model_len=128)
    llm.engine.runner.enable_static_decode()
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == want
    graphs = llm.engine.runner.graphs
    assert len(graphs) > 1
    assert any(greedy for (_, _, _, greedy) in graphs)  # multi-step decodes sampled inside the step


def test_static_decode_samples_in_the_graph_only_when_plain_greedy(model):
    """Penalties, logprobs or a seeded draw keep sampling outside the replayed step; their output through the
    static-shape path equals the dynamic path's, while plain greedy requests take the self-sampling step."""
    prompts = _prompts(3, lo=4, hi=12, seed=9, vocab=500)
    params = [SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True, frequency_penalty=1.5),
              SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.8, seed=3, max_new_tokens=10, ignore_eos=True)]
    dynamic = _engine(model, decode_steps=4, max_model_len=64)
    static = _engine(model, decode_steps=4, max_model_len=64)
    static.engine.runner.enable_static_decode()
    for p in params:
        want, got = dynamic.generate(prompts, p), static.generate(prompts, p)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        if p.logprobs:
            assert [lp.logprob for o in got for lp in o.logprobs] == pytest.approx(
                [lp.logprob for o in want for lp in o.logprobs], abs=1e-5)
    assert not any(greedy for (_, _, _, greedy) in static.engine.runner.graphs)
    want = dynamic.generate(prompts, SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True))
    assert [o.token_ids for o in static.generate(
        prompts, SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True))] == [o.token_ids for o in want]
    assert any(greedy for (_, _, _, greedy) in static.engine.runner.graphs)


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "GPT2LMHeadModel", "BloomForCausalLM", "Qwen3ForCausalLM",
                                  "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Olmo2ForCausalLM", "SmolLM3ForCausalLM",
                                  "Phi3ForCausalLM"])
def test_greedy_parity_across_position_schemes_and_sliding_window(tiny_hf, arch):
    """Sliding window (Mistral, window 6 < block reuse), learned positions (GPT-2), ALiBi (BLOOM); the 2024-25
    block variants: qk-norm + yarn (Qwen3), soft-caps + sandwich norms + alternating windows (Gemma 2), local/global
    RoPE (Gemma 3), post-norms (OLMo 2), NoPE layers (SmolLM3), per-row longrope (Phi-3)."""
    _, path = tiny_hf
    model = load_hf(path, progress=False)
    prompts = _prompts(8, hi=40)
    want = [r.token_ids for r in generate(model, prompts, GREEDY)]
    out = _engine(model, max_num_batched_tokens=32, max_model_len=128).generate(prompts, GREEDY)
    assert [o.token_ids for o in out] == want


def test_preemption_under_tiny_block_budget_still_completes_every_request(model):
    prompts = _prompts(16, lo=8, hi=30, seed=1)
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    want = [r.token_ids for r in generate(model, prompts, params)]
    llm = _engine(model, num_blocks=24, max_num_batched_tokens=64)  # 92 token slots for ~16 x 45 tokens
    out = llm.generate(prompts, params)
    assert [o.token_ids for o in out] == want
    stats = llm.engine.stats()
    assert stats["preemptions"] > 0 and stats["finished"] == 16
    assert stats["free_blocks"] == 23


def test_request_larger_than_the_cache_or_context_is_refused_not_crashed(model):
    llm = _engine(model, num_blocks=8)  # 28 token slots
    with pytest.raises(ContextLengthError, match="KV cache"):
        llm.generate([[5] * 20], SamplingParams(max_new_tokens=10))
    with pytest.raises(ContextLengthError, match="context length"):
        _engine(model).generate([[5] * 100], SamplingParams(max_new_tokens=100))
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        _engine(model).generate([[5, 10**6]], GREEDY)


def test_prefix_caching_reuses_blocks_and_gives_identical_output(model):
    shared = _prompts(1, lo=41, hi=41, seed=2)[0]
    prompts = [shared + tail for tail in _prompts(6, lo=1, hi=9, seed=3)]
    want = [r.token_ids for r in generate(model, prompts, GREEDY)]
    llm = _engine(model)
    first = llm.generate(prompts[:1], GREEDY)  # computes (and caches) the shared prefix blocks
    rest = llm.generate(prompts[1:], GREEDY)
    assert [o.token_ids for o in first + rest] == want
    stats = llm.engine.stats()
    assert stats["prefix_cache_hits"] >= 5 * (41 // 4)  # each later prompt found every full block of the prefix
    assert stats["prefix_cache_hit_tokens"] == 4 * stats["prefix_cache_hits"]
    # caching off: same tokens, no hits
    off = _engine(model, enable_prefix_caching=False)
    assert [o.token_ids for o in off.generate(prompts, GREEDY)] == want
    assert off.engine.stats()["prefix_cache_hits"] == 0


def test_block_pool_refcounts_lru_eviction_and_token_verified_hits():
    pool = BlockPool(num_blocks=5, block_size=2)
    keys = block_hashes([1, 2, 3, 4], 2)
    a = pool.allocate(2)
    for b, key in zip(a, keys):
        pool.register(b, key)
    assert pool.lookup(keys) == a
    forged = [(keys[0][0], (9, 9))]  # same hash, other tokens: must not hit
    assert pool.lookup(forged) == []
    pool.acquire(a)  # a second sequence shares the prefix
    assert pool.release(a) == 0 and pool.release(a) == 2
    assert pool.lookup(keys) == a  # freed but still cached
    fresh = pool.allocate(3)  # least recently freed first; a freed prefix queues its tail before its head
    assert a[1] in fresh and a[0] not in fresh
    assert pool.lookup(keys) == [a[0]]
    assert pool.allocate(5) is None and pool.num_free == 1


def test_per_request_sampling_seeds_penalties_top_k(model):
    prompts = _prompts(4, lo=5, hi=20, seed=4)
    llm = _engine(model)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=12, ignore_eos=True)
    alone = llm.generate(prompts[:1], seeded)[0].token_ids
    batched = llm.generate(prompts, [seeded, GREEDY, SamplingParams(temperature=1.0, seed=8, max_new_tokens=12),
                                     GREEDY])
    assert batched[0].token_ids == alone  # a seeded request's draws do not depend on its batch
    assert llm.generate(prompts[:1], seeded.model_copy(update={"seed": 8}))[0].token_ids != alone
    top1 = llm.generate(prompts[:1], SamplingParams(temperature=1.5, top_k=1, max_new_tokens=12, ignore_eos=True))[0]
    greedy = llm.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids
    long = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    plain = llm.generate(prompts[:1], long)[0].token_ids
    penalized = llm.generate(prompts[:1], long.model_copy(update={"frequency_penalty": 2.0}))[0].token_ids
    assert len(set(penalized)) > len(set(plain))
    rep = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True, repetition_penalty=1.6)
    assert llm.generate(prompts[1:2], rep)[0].token_ids == generate(model, prompts[1:2], rep)[0].token_ids


def test_logprobs_are_the_models_log_softmax(model):
    prompt = _prompts(1, lo=9, hi=9, seed=5)[0]
    out = _engine(model).generate([prompt], SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True,
                                                           logprobs=4))[0]
    with torch.no_grad():
        ref = model(torch.tensor([prompt]))[0, -1].float().log_softmax(-1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0] == int(ref.argmax())
    assert first.logprob == pytest.approx(float(ref.max()), abs=1e-5)
    assert [t for t, _ in first.top] == ref.topk(4).indices.tolist()
    assert len(out.logprobs) == 3


def test_stop_strings_and_stop_ids_follow_generate(model, tok):
    llm = _engine(model, tok)
    prompt = [tok.encode("Hello world")]
    free = llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))[0]
    stop = free.text[5:8]
    want = generate(model, prompt, SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True, stop=[stop]),
                    tokenizer=tok)[0]
    got = llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True, stop=[stop]))[0]
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, "stop")
    stop_id = free.token_ids[4]
    got = llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True,
                                              stop_token_ids=[stop_id]))[0]
    assert got.token_ids == free.token_ids[:free.token_ids.index(stop_id)] and got.finish_reason == "stop"
    assert llm.generate("Hello world", SamplingParams(temperature=0, max_new_tokens=16,
                                                      ignore_eos=True))[0].text == free.text


@pytest.mark.parametrize("max_tokens", [3, 9, 40])
def test_json_object_mode_output_always_parses(model, tok, max_tokens):
    llm = _engine(model, tok)
    outs = llm.generate(["Reply in JSON:", "{"], SamplingParams(temperature=1.0, seed=11, max_new_tokens=max_tokens,
                                                     json_object=True))
    for o in outs:
        assert isinstance(json.loads(o.text), dict), o.text
        assert len(o.token_ids) <= max_tokens and o.finish_reason == "stop"


def test_json_automaton_accepts_json_and_completes_prefixes():
    from lmforge.infer.sampling.json_constraint import START, advance, closing

    doc = '{"a": [1, -2.5e+3, true, null, {"b": "x\\n\\u00e9"}], "c": {}, "d": []}'
    state = START
    for i, ch in enumerate(doc):
        completed = doc[:i] + closing(state)
        assert json.loads(completed) is not None, completed
        state = advance(state, ch)
        assert state is not None, doc[:i + 1]
    assert state[0] == "done" and closing(state) == ""
    for bad in ('[1]', '{"a" 1}', '{"a": 01}', '{"a": tru}x', '{,}', ' {}', '{"a": "\x01"}'):
        assert advance(START, bad) is None or advance(START, bad)[0] != "done", bad


def test_several_lora_adapters_in_one_batch_match_each_adapter_alone(ckpt, model, tmp_path):
    from lmforge.peft.lora import LoraConfig, apply_lora, lora_layers
    from lmforge.peft.peft_format import load_peft_adapter, save_peft_adapter

    adapters = {}
    for i, (r, targets) in enumerate([(4, ["q_proj", "v_proj"]), (8, ["o_proj", "gate_proj", "down_proj", "lm_head"])]):
        m = load_hf(ckpt, progress=False)
        cfg = LoraConfig(r=r, alpha=2 * r, target_modules=targets)
        apply_lora(m, cfg)
        torch.manual_seed(i)
        for layer in lora_layers(m).values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
        adapters[f"ad{i}"] = str(save_peft_adapter(m, cfg, tmp_path / f"ad{i}"))
    prompts = _prompts(6, lo=2, hi=30, seed=6)
    names = [None, "ad0", "ad1", "ad1", None, "ad0"]
    want = {}
    for name in (None, "ad0", "ad1"):
        m = load_hf(ckpt, progress=False)
        if name:
            load_peft_adapter(m, adapters[name])
        want[name] = [r.token_ids for r in generate(m, prompts, GREEDY)]
    assert want["ad0"] != want[None] and want["ad1"] != want[None]
    served = load_hf(ckpt, progress=False)
    llm = LLM(served, config=EngineConfig(block_size=4, num_blocks=256, decode_steps=4), adapters=adapters)
    out = llm.generate(prompts, GREEDY, adapter=names)
    assert [o.token_ids for o in out] == [want[n][i] for i, n in enumerate(names)]
    with pytest.raises(ConfigError, match="unknown adapter"):
        llm.generate(prompts[:1], GREEDY, adapter="nope")


def test_abort_frees_blocks_and_reports_it(model):
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=128))
    rid = engine.add_request(_prompts(1, lo=30, hi=30)[0], SamplingParams(max_new_tokens=60, ignore_eos=True))
    other = engine.add_request(_prompts(1, lo=10, hi=10, seed=9)[0], SamplingParams(max_new_tokens=5, ignore_eos=True))
    outs = []
    for _ in range(2):
        outs += engine.step()
    held = engine.pool.num_blocks - 1 - engine.pool.num_free
    assert held > 0 and engine.abort(rid) and not engine.abort(rid)
    while engine.has_unfinished():
        outs += engine.step()
    aborted = [o for o in outs if o.request_id == rid][-1]
    assert aborted.finished and aborted.finish_reason == "abort"
    assert any(o.request_id == other and o.finished for o in outs)
    stats = engine.stats()
    assert stats["aborted"] == 1 and stats["blocks_freed_on_abort"] >= 8
    assert stats["free_blocks"] == stats["num_blocks"] - 1


@pytest.mark.parametrize("one_launch_tail", [False, True])
def test_greedy_run_ahead_matches_generate_and_drops_tokens_past_a_stop(model, monkeypatch, one_launch_tail):
    """Greedy-graph decodes launch the next run before reading the current one: outputs still equal generate()
    for requests of different lengths, one stopping on a stop id mid-run (its run-ahead tokens dropped); an abort
    while a run is in flight; every block comes back. `one_launch_tail`: the step's argmax and bookkeeping run as
    the Triton kernel (CPU interpreter), as on CUDA."""
    if one_launch_tail:
        from lmforge.infer.kernels.paged_attention import kernel_available

        if not kernel_available(torch.device("cpu")):
            pytest.skip("needs triton's CPU interpreter")
    prompts = _prompts(3, lo=5, hi=20, seed=4, vocab=500)
    probe = generate(model, prompts[:1], SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))[0]
    stop = probe.token_ids[6]
    params = [SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop]),
              SamplingParams(temperature=0, max_new_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0, max_new_tokens=23, ignore_eos=True)]
    want = [generate(model, [p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    assert len(want[0]) < 12  # the stop id ended it
    llm = _engine(model, decode_steps=4, max_model_len=64, kernels=KernelOptions(cpu_interpreter=one_launch_tail))
    runner = llm.engine.runner
    runner.enable_static_decode()
    launched = []
    continue_greedy = runner.continue_greedy

    def counting(reqs, steps):
        out = continue_greedy(reqs, steps)
        launched.append(out is not None)
        return out

    monkeypatch.setattr(runner, "continue_greedy", counting)
    out = llm.generate(prompts, params)
    assert [o.token_ids for o in out] == want
    assert [o.finish_reason for o in out] == ["stop", "length", "length"]
    assert sum(launched) >= 3  # runs really were launched ahead (23 tokens at 4 per run)
    engine = llm.engine
    assert engine._inflight is None
    assert engine.stats()["free_blocks"] == engine.stats()["num_blocks"] - 1

    rid = engine.add_request(prompts[2], SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True))
    outs = []
    while engine._inflight is None:
        outs += engine.step()
    n_before = sum(len(o.new_token_ids) for o in outs)
    assert engine.abort(rid)
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].finish_reason == "abort" and sum(len(o.new_token_ids) for o in outs) == n_before
    assert engine._inflight is None
    assert engine.stats()["free_blocks"] == engine.stats()["num_blocks"] - 1


@pytest.mark.gpu
def test_gpu_run_ahead_changes_no_token(tmp_path, monkeypatch):
    """On CUDA (graphs, the paged kernel, async copies of the tokens): the engine with runs launched ahead gives
    the tokens it gives without them, for a batch and for one request alone."""
    model = load_hf(make_tiny_checkpoint(tmp_path / "tiny"), progress=False, device="cuda", dtype=torch.bfloat16)
    prompts = _prompts(8, lo=3, hi=40, seed=5, vocab=500)
    params = [SamplingParams(temperature=0, max_new_tokens=7 + 5 * i, ignore_eos=True) for i in range(8)]
    outs, launched = [], []
    for ahead in (True, False):
        if not ahead:
            monkeypatch.setattr(Engine, "_run_ahead", lambda self, run: None)
        llm = _engine(model, decode_steps=4, max_model_len=128)
        continue_greedy = llm.engine.runner.continue_greedy
        llm.engine.runner.continue_greedy = lambda reqs, k: launched.append(k) or continue_greedy(reqs, k)
        outs.append([o.token_ids for o in llm.generate(prompts, params)] +
                    [o.token_ids for o in llm.generate(prompts[:1], params[-1])])
        assert llm.engine.stats()["free_blocks"] == llm.engine.stats()["num_blocks"] - 1
    assert outs[0] == outs[1] and len(launched) > 3


@pytest.mark.parametrize("V", [128256, 1000, 50])
def test_two_stage_argmax_equals_argmax_ties_included(V):
    from lmforge.infer.sampling.batch import argmax_rows

    g = torch.Generator().manual_seed(V)
    x = torch.randn(3, V, generator=g).to(torch.bfloat16)
    x[1, V // 3] = x[1, V - 1] = x[1].max() + 1  # a tie across chunks: the first index wins
    x[2] = 0.5  # every entry tied
    assert argmax_rows(x).tolist() == x.argmax(-1).tolist() == [int(x[0].float().argmax()), V // 3, 0]


def _run_all(engine: Engine) -> dict:
    """Step until idle; request id → its final output."""
    finals = {}
    while engine.has_unfinished():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    return finals


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_a_request_whose_sampling_raises_fails_alone(model, tok, monkeypatch, decode_steps):
    """An exception in one request's per-request work (here its JSON constraint) ends that request with an error;
    the requests batched with it finish with the tokens they get alone, and every block comes back."""
    from lmforge.infer.sampling import json_constraint

    def broken(self, *args):
        raise RuntimeError("constraint exploded")

    monkeypatch.setattr(json_constraint.JsonObjectConstraint, "pick", broken)
    prompts = _prompts(6, lo=3, hi=30, seed=11, vocab=500)
    want = [r.token_ids for r in generate(model, prompts, GREEDY)]
    engine = Engine(model, tok, EngineConfig(block_size=4, num_blocks=256, decode_steps=decode_steps))
    ids = [engine.add_request(p, GREEDY) for p in prompts[:3]]
    bad = engine.add_request(prompts[0], SamplingParams(max_new_tokens=8, json_object=True, temperature=0.5))
    ids += [engine.add_request(p, GREEDY) for p in prompts[3:]]
    finals = _run_all(engine)
    assert finals[bad].finish_reason == "error" and "constraint exploded" in finals[bad].error
    assert [finals[i].token_ids for i in ids] == want and all(finals[i].error is None for i in ids)
    stats = engine.stats()
    assert stats["failed"] == 1 and stats["free_blocks"] == stats["num_blocks"] - 1


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_a_batched_failure_is_bisected_to_the_request_that_causes_it(model, monkeypatch, where):
    """A forward that raises whenever one request is in its batch: the step is retried without each suspect (by
    halves) until that request is found; it alone fails, the others match generate()."""
    prompts = _prompts(7, lo=3, hi=30, seed=12, vocab=500)
    want = [r.token_ids for r in generate(model, prompts, GREEDY)]
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=256, decode_steps=4))
    ids = [engine.add_request(p, GREEDY, request_id=f"r{i}") for i, p in enumerate(prompts)]
    real = getattr(engine.runner, where)
    calls = []

    def poisoned(batch, *args):
        reqs = [getattr(x, "request", x) for x in batch]
        calls.append(len(reqs))
        if any(r.request_id == "r3" and (where == "prefill" or r.num_generated > 2) for r in reqs):
            raise ValueError("poisoned batch")
        return real(batch, *args)

    monkeypatch.setattr(engine.runner, where, poisoned)
    finals = _run_all(engine)
    assert finals["r3"].finish_reason == "error" and "poisoned batch" in finals["r3"].error
    assert [finals[i].token_ids for i in ids if i != "r3"] == want[:3] + want[4:]
    assert engine.stats()["free_blocks"] == engine.stats()["num_blocks"] - 1
    assert min(calls) == 1  # the culprit was tried on its own


def test_a_failure_no_request_is_to_blame_for_is_raised(model, monkeypatch):
    """A forward that fails whatever it is given is a broken engine: step() raises (the server then fails every
    request in flight) instead of blaming some request."""
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=256))
    for p in _prompts(3, seed=13):
        engine.add_request(p, GREEDY)

    def dead(*args):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "prefill", dead)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
