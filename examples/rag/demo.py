"""RAG, an agent and self-consistency end to end, offline, in about a minute on a CPU:

1. index examples/rag/docs (Markdown, HTML, Chinese) with all-MiniLM-L6-v2 into a FAISS store;
2. show hybrid retrieval for an English and a Chinese question;
3. start an lmforge server on 127.0.0.1 (a tiny random model unless --base-url points at a real one) and ask it a
   question with retrieval QA, then run the ReAct agent with the calculator and retrieval tools;
4. print the chat page's address and keep serving until Ctrl-C if --keep-serving.

    python examples/rag/demo.py                                  # everything local, tiny random model
    python examples/rag/demo.py --base-url http://127.0.0.1:8000/v1   # answers from your `lmforge serve` model

With the tiny random model the answers are noise: the point is the flow (what is retrieved, what is sent, what
comes back); point --base-url at a real instruction model for real answers.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from lmforge.rag import (
    Agent,
    OpenAIChat,
    RagIndex,
    RetrievalQA,
    calculator,
    load_documents,
    load_embedder,
    retrieval_tool,
)

HERE = Path(__file__).parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", default=None, help="an OpenAI-compatible endpoint; default: start a tiny server")
    p.add_argument("--store", default="runs/rag-example")
    p.add_argument("--keep-serving", action="store_true", help="leave the local server (and its chat page) up")
    args = p.parse_args()

    shutil.rmtree(args.store, ignore_errors=True)
    index = RagIndex.create(args.store, load_embedder("minilm"), backend="faiss", max_tokens=96)
    n = index.add_documents(load_documents(HERE / "docs"))
    print(f"indexed {n} chunks into {args.store}")
    retriever = index.retriever(mode="hybrid", k=3, min_score=0.1)
    for q in ("How do I serve a LoRA adapter?", "智能体可以调用哪些工具？"):
        print(f"\nQ: {q}")
        for h in retriever.search(q):
            print(f"  {h.score:.4f}  {h.citation}: {h.text[:70]!r}")

    server = None
    base_url = args.base_url
    if base_url is None:
        from lmforge.rag.testing import start_test_server

        server = start_test_server(tempfile.mkdtemp(prefix="lmforge-rag-demo-"), with_rag=False)
        base_url = server.url + "/v1"
        print(f"\nstarted a tiny random-model server at {server.url} (chat page: {server.url}/chat)")
    llm = OpenAIChat(base_url)
    answer = RetrievalQA(llm, retriever, max_tokens=64).ask("How do I serve a LoRA adapter?")
    print(f"\nretrieval QA answer: {answer.text!r}")
    print("sources: " + "; ".join(f"[{i}] {h.citation}" for i, h in enumerate(answer.sources, 1)))
    print("cited:   " + ("; ".join(h.citation for h in answer.cited) or "(none)"))

    result = Agent(llm, [calculator(), retrieval_tool(retriever)], max_steps=3, max_tokens=64).run(
        "How many minutes does the quickstart take, times 3?")
    print(f"\nagent: stopped={result.stopped}, answer={result.answer!r}")
    for i, s in enumerate(result.steps, 1):
        print(f"  step {i}: action={s.action} observation={str(s.observation)[:80]!r}")

    if server is not None:
        if args.keep_serving:
            print(f"\nserving {server.url}/chat until Ctrl-C")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        server.stop()


if __name__ == "__main__":
    main()
