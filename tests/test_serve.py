"""OpenAI-compatible server, driven by the official `openai` client against a real uvicorn on 127.0.0.1."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from lmforge.infer import SamplingParams, generate  # noqa: E402
from lmforge.models import load_hf  # noqa: E402
from lmforge.serve import ServeConfig  # noqa: E402
from lmforge.testing import make_tiny_checkpoint  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


KEY = "sk-test"
HELLO = [{"role": "user", "content": "Hello"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    path = make_tiny_checkpoint(root / "tiny")
    from lmforge.peft.lora import LoraConfig, apply_lora, lora_layers
    from lmforge.peft.peft_format import save_peft_adapter

    m = load_hf(path, progress=False)
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    apply_lora(m, cfg)
    torch.manual_seed(0)
    for layer in lora_layers(m).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    save_peft_adapter(m, cfg, root / "lora")
    return path, root / "lora"


@pytest.fixture(scope="module")
def server(ckpt, serve):
    path, lora = ckpt
    return serve(ServeConfig(model=str(path), device="cpu", api_key=KEY, adapters={"tiny-lora": str(lora)},
                             engine=dict(block_size=4, num_blocks=4096, max_model_len=2048, max_num_seqs=64)))


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_chat_completion_and_streaming_agree_and_match_generate(client, ckpt):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 12
    tok = Tokenizer.from_dir(ckpt[0])
    prompt = tok.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=True)
    assert r.usage.prompt_tokens == len(prompt)
    want = generate(load_hf(ckpt[0], progress=False), [prompt],
                    SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True), tokenizer=tok)[0]
    assert r.choices[0].message.content == want.text

    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completions_text_ids_n_seed_stop_echo_logprobs(client):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 8 and len(lp.top_logprobs[0]) == 3
    assert max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0])  # greedy picks the best
    ids = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=4, temperature=0)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 5
    many = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, n=3, temperature=1.0, seed=3,
                                     extra_body={"ignore_eos": True})
    again = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, n=3, temperature=1.0, seed=3,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in many.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in many.choices}) > 1  # ... and each choice has its own seed
    greedy = dict(model="tiny", prompt="Hello", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**greedy).choices[0].text
    assert len(text) >= 8
    stop = text[len(text) // 2:][:3]
    cut = client.completions.create(**greedy, stop=stop)
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    assert client.completions.create(**greedy, echo=True).choices[0].text == "Hello" + text
    assert "".join(c.choices[0].text for c in client.completions.create(**greedy, stream=True)) == text


def test_json_object_response_parses(client):
    for max_tokens in (5, 40):
        r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=max_tokens, seed=1,
                                           response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_lora_adapter_is_a_model_name(client):
    names = [m.id for m in client.models.list().data]
    assert names == ["tiny", "tiny-lora"]
    kw = dict(prompt="Hello", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert client.completions.create(model="tiny-lora", **kw).choices[0].text != \
        client.completions.create(model="tiny", **kw).choices[0].text


def test_errors_are_openai_shaped_400s_naming_the_field(client, server):
    cases = [(dict(max_tokens=100000), "messages", "context_length_exceeded"),
             (dict(temperature=3), "temperature", None), (dict(top_p=0), "top_p", None),
             (dict(n=0), "n", None), (dict(messages=[]), "messages", None),
             (dict(messages=[{"role": "wizard", "content": "x"}]), "messages.0.role", None),
             (dict(response_format={"type": "json_schema", "json_schema": {}}), "response_format", None)]
    for extra, param, code in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": "tiny", "messages": HELLO, **extra})
        err = e.value.body
        assert e.value.status_code == 400 and err["param"] == param and err["code"] == code, err
        assert param.split(".")[0] in err["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}  # health needs no key


def test_64_concurrent_streaming_requests_complete_without_errors(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)

        async def one(i: int) -> tuple[str, str | None]:
            stream = await client.completions.create(model="tiny", prompt=f"Request {i}:", max_tokens=16 + i % 8,
                                                     temperature=0.8, stream=True, extra_body={"ignore_eos": True})
            text, reason = "", None
            async for chunk in stream:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            return text, reason

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(64)), return_exceptions=True)
        await client.close()
        return results, time.perf_counter() - t0

    before = server[1].stats()["finished"]
    results, seconds = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [] and all(reason == "length" for _, reason in results)
    assert server[1].stats()["finished"] - before == 64
    assert seconds < 60


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_aborts_the_request_and_frees_its_blocks(server):
    url, engine = server
    body = {"model": "tiny", "prompt": "Tell me a long story", "max_tokens": 1800, "stream": True,
            "ignore_eos": True}
    before = engine.stats()
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # it is generating
    assert _wait_for(lambda: engine.stats()["aborted"] == before["aborted"] + 1)
    stats = engine.stats()
    assert stats["blocks_freed_on_abort"] > before["blocks_freed_on_abort"]
    assert _wait_for(lambda: engine.stats()["free_blocks"] == engine.stats()["num_blocks"] - 1)
    # a non-streaming request whose client gives up is aborted too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", json={**body, "stream": False}, headers=headers, timeout=1.0)
    assert _wait_for(lambda: engine.stats()["aborted"] == before["aborted"] + 2)
    metrics = httpx.get(url + "/metrics", headers=headers).text  # with --api-key, metrics need it too
    assert f"lmforge_aborted {before['aborted'] + 2}" in metrics


def test_module_entry_point_serves(ckpt, tmp_path):
    """`python -m lmforge.serve MODEL --port P` (what `lmforge serve` runs) answers the openai client."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.serve", str(ckpt[0]), "--port", str(port),
                             "--device", "cpu", "--log-level", "warning", "engine.num_blocks=256"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None
        assert _wait_for(up, 60) and proc.poll() is None, proc.stdout.read().decode()[-2000:]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
        assert r.usage.completion_tokens <= 4
    finally:
        proc.terminate()
        proc.wait(20)
