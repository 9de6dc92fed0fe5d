"""Adapters at inference (`--adapter` on generate/chat/serve/eval, export, runtime LoRA on a running server) and
model ids resolved through a Hugging Face cache laid out on disk (offline)."""
from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest
import torch

from lmforge.checkpoint import load_model_and_tokenizer
from lmforge.cli import main
from lmforge.infer import LLM, EngineConfig, SamplingParams, generate
from lmforge.models import load_hf
from lmforge.peft import build_method, load_adapter
from lmforge.testing import make_tiny_checkpoint
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "sk-adapters"
GREEDY = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
OPTIONS = {"lora": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), "ia3": {},
           "prefix": dict(num_virtual_tokens=3), "prompt_tuning": dict(num_virtual_tokens=3)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint, {method: adapter dir}): a tiny checkpoint and one trained-looking adapter per kind (weights
    moved well away from their identity init, so each visibly changes the output)."""
    root = tmp_path_factory.mktemp("adapters")
    ckpt = make_tiny_checkpoint(root / "tiny")
    adapters = {}
    for i, (name, options) in enumerate([*OPTIONS.items(), ("lora", OPTIONS["lora"])]):
        model = load_hf(ckpt, progress=False)
        method = build_method(name, **options)
        method.apply(model)
        torch.manual_seed(i)
        with torch.no_grad():
            for _, p in method.trainable_parameters(model):
                p.add_(torch.randn_like(p) * (0.5 if name in ("lora", "ia3") else 2.0))
        name = f"{name}2" if name in adapters else name  # a second LoRA, other weights
        adapters[name] = method.save(model, root / name)
    return ckpt, adapters


def _reference(ckpt, adapter, prompt: list[int], n: int = 8) -> list[int]:
    """Greedy tokens by full forwards (no cache) of the base model with `adapter` applied."""
    model = load_hf(ckpt, progress=False)
    if adapter is not None:
        load_adapter(model, adapter)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model.eval()(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_prefix_and_prompt_adapters_on_the_paged_engine_match_full_forwards(tiny):
    """The paged engine numbers keys by sequence index while a prompt method shifts queries by n: keys must shift
    too, or prefill sees n tokens into the future. Chunked prefill and a prefix-cache hit are exercised."""
    ckpt, adapters = tiny
    prompts = [list(range(5, 19)), list(range(5, 15)) + [40, 41, 42]]  # share 2 full blocks of 4 (a cache hit)
    for name in ("prefix", "prompt_tuning"):
        model, _ = load_model_and_tokenizer(ckpt, "cpu", "float32", adapter=adapters[name])
        llm = LLM(model, config=EngineConfig(block_size=4, num_blocks=64, max_model_len=64, max_num_seqs=4,
                                             max_num_batched_tokens=6, decode_steps=1))
        want = [_reference(ckpt, adapters[name], p) for p in prompts]
        assert want[0] != _reference(ckpt, None, prompts[0])  # the adapter matters at this size
        first = llm.generate(prompts[:1], GREEDY)[0].token_ids
        second = llm.generate(prompts[1:], GREEDY)[0].token_ids  # after the first: its blocks are cached
        assert [first, second] == want, name
        assert llm.engine.pool.stats["prefix_cache_hits"] >= 2


def test_generate_takes_every_adapter_kind(tiny, capsys):
    ckpt, adapters = tiny
    tok = Tokenizer.from_dir(ckpt)
    prompt = "The quick brown fox"
    base_out = None
    for name, adapter in [("base", None), *((n, adapters[n]) for n in OPTIONS)]:
        args = ["generate", str(ckpt), "--prompt", prompt, "temperature=0", "max_new_tokens=8", "ignore_eos=true",
                "stream=false", "device=cpu"] + (["--adapter", str(adapter)] if adapter else [])
        assert main(args) == 0
        out = capsys.readouterr().out.strip()
        want = tok.decode(_reference(ckpt, adapter, tok.encode(prompt)))
        assert out == want.rstrip("\ufffd").strip(), name  # (generate holds back a split character)
        if adapter is None:
            base_out = out
        else:
            assert out != base_out, f"{name} changed nothing"
    assert main(["generate", str(ckpt), "--adapter", str(ckpt), "--prompt", "x"]) == 2  # a model, not an adapter
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no adapter_config.json" in err and str(ckpt) in err


def test_chat_takes_an_adapter(tiny, capsys, monkeypatch):
    import io

    from lmforge.infer.api.chat import ChatSession

    ckpt, adapters = tiny
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    replies = {}
    for adapter in (None, adapters["prefix"]):
        model, tok = load_model_and_tokenizer(ckpt, "cpu", "float32", adapter=adapter)
        replies[adapter] = ChatSession(model, tok, params).ask("hello")
    assert replies[None] != replies[adapters["prefix"]]
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    assert main(["chat", str(ckpt), "--adapter", str(adapters["prefix"]), "temperature=0", "max_new_tokens=6",
                 "ignore_eos=true", "device=cpu"]) == 0
    assert capsys.readouterr().out == f"assistant> {replies[adapters['prefix']]}\n"


def test_eval_model_loads_an_adapter(tiny):
    from lmforge.eval.model import LocalModel

    ckpt, adapters = tiny
    base = LocalModel.load(ckpt, device="cpu", dtype="float32")
    ia3 = LocalModel.load(ckpt, adapters["ia3"], device="cpu", dtype="float32")
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(base.model(x), ia3.model(x), atol=1e-3)


def test_eval_cli_takes_an_adapter(tiny, tmp_path):
    """`lmforge eval MODEL TASK --adapter DIR` scores the adapted model: its perplexity is the one of a model with
    the adapter loaded, not the base's."""
    from lmforge.eval.model import LocalModel

    ckpt, adapters = tiny
    (tmp_path / "ppl.txt").write_text("the quick brown fox jumps over the lazy dog. " * 4)
    (tmp_path / "ppl.yaml").write_text(f"name: ppl\ntype: perplexity\ntext_file: {tmp_path / 'ppl.txt'}\n"
                                       "window: 32\nstride: 16\n")
    ppl = {}
    for name, extra in (("base", []), ("ia3", ["--adapter", str(adapters["ia3"])])):
        assert main(["eval", str(ckpt), str(tmp_path / "ppl.yaml"), "--device", "cpu", "dtype=float32",
                     "--output", str(tmp_path / name), *extra]) == 0
        report = json.loads((tmp_path / name / "results.json").read_text())
        ppl[name] = report["results"][0]["metrics"]["perplexity"]
    assert report["adapter"] == str(adapters["ia3"]) and ppl["ia3"] != pytest.approx(ppl["base"], rel=1e-3)


def test_export_merges_what_merges_and_says_what_cannot(tiny, tmp_path, capsys):
    ckpt, adapters = tiny
    x = torch.tensor([[5, 6, 7, 8, 9]])
    for name in ("lora", "ia3"):
        assert main(["export", str(ckpt), "adapter=" + str(adapters[name]), f"out={tmp_path / name}"]) == 0
        assert "merged" in capsys.readouterr().out
        adapted = load_hf(ckpt, progress=False)
        load_adapter(adapted, adapters[name])
        with torch.no_grad():
            torch.testing.assert_close(load_hf(tmp_path / name, progress=False)(x), adapted.eval()(x),
                                       atol=1e-4, rtol=1e-4)
    out = tmp_path / "prefix"
    assert main(["export", str(ckpt), "adapter=" + str(adapters["prefix"]), f"out={out}"]) == 0
    said = capsys.readouterr().out
    assert "cannot be merged" in said and str(out / "adapter") in said
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "tokenizer.json").is_file()
    with torch.no_grad():  # the base, unchanged, and the copied adapter together give the adapted model
        torch.testing.assert_close(load_hf(out, progress=False)(x), load_hf(ckpt, progress=False)(x))
        model, _ = load_model_and_tokenizer(out, "cpu", "float32", adapter=out / "adapter")
        ref = load_hf(ckpt, progress=False)
        load_adapter(ref, adapters["prefix"])
        torch.testing.assert_close(model(x), ref.eval()(x))


# ------------------------------------------------------------------------------------------------ model ids


@pytest.fixture
def hub_cache(tiny, tmp_path, monkeypatch):
    """A Hugging Face cache with org/tiny at two commits (refs/main -> the second), offline."""
    ckpt, _ = tiny
    repo = tmp_path / "hub" / "models--org--tiny"
    old, new = "a" * 40, "b" * 40
    for commit in (old, new):
        shutil.copytree(ckpt, repo / "snapshots" / commit)
    config = repo / "snapshots" / old / "config.json"  # the old commit differs: a shorter context
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_position_embeddings": 96}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return old, new


def test_model_ids_resolve_through_the_hub_cache_offline(tiny, hub_cache, capsys, tmp_path, monkeypatch):
    ckpt, adapters = tiny
    old, _ = hub_cache
    args = ["--prompt", "Hello", "temperature=0", "ignore_eos=true", "stream=false", "device=cpu"]
    assert main(["generate", str(ckpt), "max_new_tokens=8", *args]) == 0
    local = capsys.readouterr().out
    assert main(["generate", "org/tiny", "max_new_tokens=8", *args]) == 0
    assert capsys.readouterr().out == local
    assert main(["info", "org/tiny"]) == 0 and "max_seq_len 128" in capsys.readouterr().out
    assert main(["info", "org/tiny", "--revision", old]) == 0 and "max_seq_len 96" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)  # quantize writes beside a local model; for an id, here (not into the cache)
    assert main(["quantize", "org/tiny", "method=int8"]) == 0
    assert (tmp_path / "tiny-int8" / "config.json").is_file()


def test_every_model_verb_takes_a_model_id_offline(tiny, hub_cache, capsys, tmp_path):
    """train (model.path), eval, export, plan and serve take `org/tiny` from the offline cache as they take its
    directory (generate, info and quantize are checked above)."""
    from lmforge.cli import verb_config
    from lmforge.serve import build_server

    ckpt, adapters = tiny
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}))
    assert main(["train", "model.path=org/tiny", f"data.path={data}", "data.max_seq_len=32", "train.max_steps=1",
                 "train.micro_batch_size=1", "train.device=cpu", "train.progress=false", "train.tensorboard=false",
                 f"train.output_dir={tmp_path / 'run'}", "method=lora"]) == 0
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()
    (tmp_path / "ppl.txt").write_text("the quick brown fox jumps over the lazy dog. " * 2)
    (tmp_path / "ppl.yaml").write_text(f"name: ppl\ntype: perplexity\ntext_file: {tmp_path / 'ppl.txt'}\n")
    ppl = []
    for model in ("org/tiny", str(ckpt)):
        assert main(["eval", model, str(tmp_path / "ppl.yaml"), "--device", "cpu", "--output", str(tmp_path / "ev")]) == 0
        ppl.append(json.loads((tmp_path / "ev" / "results.json").read_text())["results"][0]["metrics"]["perplexity"])
    assert ppl[0] == pytest.approx(ppl[1])
    assert main(["export", "org/tiny", "adapter=" + str(adapters["lora"]), f"out={tmp_path / 'merged'}"]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    assert main(["plan", "org/tiny"]) == 0
    capsys.readouterr()
    app, engine = build_server(verb_config("serve", ["org/tiny", "--device", "cpu", "tools=false"]))
    engine.shutdown()


def test_unknown_model_id_offline_is_one_line_naming_it(hub_cache, capsys):
    assert main(["generate", "org/missing", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "org/missing" in err and "HF_HUB_OFFLINE" in err
    assert "hf download org/missing" in err
    assert main(["generate", "org/tiny", "--revision", "v9", "--prompt", "x"]) == 2
    assert "org/tiny@v9" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ runtime LoRA


@pytest.fixture(scope="module")
def server(tiny, serve):
    from lmforge.serve import ServeConfig

    ckpt, _ = tiny
    return serve(ServeConfig(model=str(ckpt), device="cpu", api_key=KEY, tools=False,
                             engine=dict(block_size=4, num_blocks=512, max_model_len=256, max_num_seqs=8,
                                         decode_steps=1)))


def test_lora_adapters_load_and_unload_on_a_running_server(tiny, server):
    ckpt, adapters = tiny
    url, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    tok = Tokenizer.from_dir(ckpt)
    prompt = "Once upon a time"
    want_lora = tok.decode(_reference(ckpt, adapters["lora"], tok.encode(prompt), 6))
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    load = {"lora_name": "sql", "lora_path": str(adapters["lora"])}

    async def stream_while(request: dict, route: str, payload: dict) -> str:
        """Stream `request`; after its first tokens, POST `payload` to `route` (200 expected). The streamed text."""
        async with httpx.AsyncClient(base_url=url, timeout=60, headers=auth) as c:
            text, posted = "", False
            async with c.stream("POST", "/v1/completions", json={**body, **request, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if not posted and text:
                        answer = await c.post(route, json=payload)
                        assert answer.status_code == 200, answer.text
                        posted = True
            assert posted
            return text

    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.post("/v1/load_lora_adapter", json=load).status_code == 401  # behind the API key
    # loaded while a base-model request streams: the first load wraps and unpacks the linears under it
    text = asyncio.run(stream_while({"max_tokens": 40}, "/v1/load_lora_adapter", load))
    assert text == tok.decode(_reference(ckpt, None, tok.encode(prompt), 40))
    with httpx.Client(base_url=url, timeout=60, headers=auth) as c:
        assert "sql" in [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert "lmforge_lora_adapters 1" in c.get("/metrics").text
        got = c.post("/v1/completions", json={**body, "model": "sql"}).json()
        assert got["choices"][0]["text"] == want_lora

        again = c.post("/v1/load_lora_adapter", json=load)  # the name is taken: 400, OpenAI schema
        assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
        bad = c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(ckpt)})
        assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
        prefix = c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(adapters["prefix"])})
        assert prefix.status_code == 400 and prefix.json()["error"]["param"] == "lora_path"
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "x"}).status_code == 400
        gone = c.post("/v1/unload_lora_adapter", json={"lora_name": "nope"})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"

    # unloaded while a request using it streams: that request keeps it to the end
    text = asyncio.run(stream_while({"model": "sql", "max_tokens": 40}, "/v1/unload_lora_adapter",
                                    {"lora_name": "sql"}))
    assert text == tok.decode(_reference(ckpt, adapters["lora"], tok.encode(prompt), 40))
    with httpx.Client(base_url=url, timeout=60, headers=auth) as c:
        r = c.post("/v1/completions", json={**body, "model": "sql"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        # another adapter under the old name: nothing cached under the old one is reused (same prompt, 4 full blocks)
        other = tok.decode(_reference(ckpt, adapters["lora2"], tok.encode(prompt), 6))
        assert other != want_lora
        assert c.post("/v1/load_lora_adapter", json={**load, "lora_path": str(adapters["lora2"])}).status_code == 200
        assert c.post("/v1/completions", json={**body, "model": "sql"}).json()["choices"][0]["text"] == other


def test_serve_takes_an_adapter_for_the_served_model(tiny, serve):
    from lmforge.cli import verb_config

    ckpt, adapters = tiny
    cfg = verb_config("serve", [str(ckpt), "--adapter", str(adapters["prefix"]), "--device", "cpu", "tools=false",
                                "engine.block_size=4", "engine.num_blocks=128", "engine.max_model_len=64",
                                "engine.max_num_seqs=4"])  # the config `lmforge serve ...` runs with
    url, _ = serve(cfg)
    tok = Tokenizer.from_dir(ckpt)
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={"model": "tiny", "prompt": "Once upon a time",
                                                              "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    want = tok.decode(_reference(ckpt, adapters["prefix"], tok.encode("Once upon a time")))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want


def test_engine_adds_and_removes_lora_between_steps_of_running_requests(tiny):
    """Deterministic at the engine: requests mid-decode keep their output when an adapter is added (linears wrapped
    under them) or the adapter they use is removed; a removed adapter's slot is not reused while they run."""
    ckpt, adapters = tiny
    prompt = list(range(5, 14))
    model, _ = load_model_and_tokenizer(ckpt, "cpu", "float32")
    engine = LLM(model, config=EngineConfig(block_size=4, num_blocks=64, max_model_len=64, max_num_seqs=4,
                                            decode_steps=1)).engine
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)

    def run(steps_then_act, *requests):
        ids = [engine.add_request(prompt, params, adapter=a) for a in requests]
        done, n = {}, 0
        while len(done) < len(ids):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
            n += 1
            if n == 3:
                steps_then_act()
        return [done[i] for i in ids]

    base = _reference(ckpt, None, prompt, 12)
    assert run(lambda: engine.add_adapter("a", str(adapters["lora"])), None) == [base]
    def swap():  # 'a' is removed under its request, and another adapter loaded: it must not take 'a''s slot
        engine.remove_adapter("a")
        engine.add_adapter("c", str(adapters["lora2"]))

    assert run(swap, "a", None) == [_reference(ckpt, adapters["lora"], prompt, 12), base]
    assert engine.adapters.slots == {"c": 2}
    engine.add_adapter("a", str(adapters["lora"]))  # nothing runs now: the freed slot 1 is taken again
    assert engine.adapters.slots == {"c": 2, "a": 1}
    assert run(lambda: None, "a", "c") == [_reference(ckpt, adapters[n], prompt, 12) for n in ("lora", "lora2")]


@pytest.mark.gpu
def test_gpu_adapters_under_cuda_graphs_and_the_paged_kernel(tiny):
    """On CUDA: a prompt adapter with captured decode graphs (the hook keeps it off the paged kernel), and LoRA
    adapters added and removed between steps of captured graphs (the stacks grow: graphs must be recaptured)."""
    ckpt, adapters = tiny
    prompt = list(range(5, 19))
    engine = dict(block_size=4, num_blocks=128, max_model_len=64, max_num_seqs=4)
    model, _ = load_model_and_tokenizer(ckpt, "cuda", "float32", adapter=adapters["prefix"])
    llm = LLM(model, config=EngineConfig(**engine))
    assert llm.generate([prompt], GREEDY)[0].token_ids == _reference(ckpt, adapters["prefix"], prompt)

    model, _ = load_model_and_tokenizer(ckpt, "cuda", "float32")
    llm = LLM(model, config=EngineConfig(**engine))
    assert llm.generate([prompt], GREEDY)[0].token_ids == _reference(ckpt, None, prompt)  # graphs captured
    for name in ("lora", "lora2"):
        llm.engine.add_adapter(name, str(adapters[name]))
        outs = llm.generate([prompt, prompt], GREEDY, adapter=[name, None])
        assert [o.token_ids for o in outs] == [_reference(ckpt, adapters[name], prompt), _reference(ckpt, None, prompt)]
    llm.engine.remove_adapter("lora")
    assert llm.generate([prompt], GREEDY, adapter="lora2")[0].token_ids == _reference(ckpt, adapters["lora2"], prompt)
