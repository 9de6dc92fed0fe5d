"""`lmforge <verb>`: every verb reads a YAML config (`--config FILE`) plus overrides.

Overrides can be written `key=value`, `--key value` or `--key=value` (dashes and underscores are the same), and a
bare first argument is the model: `lmforge generate ./ckpt --prompt "Hi" --max-new-tokens 32 temperature=0`.
`lmforge <verb> --help` lists every key with its default. User errors print one line (traceback with `--debug`).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from . import __version__
from .args import report_errors, split_args  # noqa: F401  (re-exported: `from lmforge.cli import split_args`)
from .config import Section, format_help, load_config
from .errors import ConfigError, did_you_mean
from .params import SamplingParams  # torch-free: `lmforge --help` and the verb list never import torch

# ------------------------------------------------------------------------------------------------ configs


class ModelSource(Section):
    model: str = Field(description="checkpoint directory (config.json + safetensors), .gguf file or Hugging Face id "
                                   "(org/name), or a preset name for info")
    revision: str | None = None
    """Branch, tag or commit of a Hugging Face id (default: main); HF_HUB_OFFLINE=1 reads only the local cache."""
    device: str = "auto"
    """cpu, cuda, cuda:1 ... or auto (cuda when available)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; auto = bfloat16 on a GPU that supports it, else float32."""


class InfoConfig(ModelSource):
    json_output: bool = Field(False, alias="json", description="print the summary as JSON")


class GenerateConfig(SamplingParams, ModelSource):
    adapter: str | None = None
    """Adapter directory to apply: any lmforge trains or PEFT writes (LoRA, DoRA, IA3, AdaLoRA, prefix, prompt ...)."""
    prompt: str | None = None
    """Text to complete (or the user turn with chat=true); omit to read stdin."""
    chat: bool = False
    """Wrap the prompt in the model's chat template as a user turn."""
    system: str | None = None
    """System message for chat templates."""
    chat_template: str | None = None
    """Built-in template name (llama3, chatml, qwen, mistral, alpaca) or Jinja text, when the checkpoint has none."""
    stream: bool = True
    """Print tokens as they are generated."""
    compile: bool = False
    """Compile the decode step (CUDA graphs on GPU); pays a one-time compile."""


class ChatConfig(GenerateConfig):
    pass


# ------------------------------------------------------------------------------------------------ helpers


def _generation_defaults(model_dir: Path) -> dict:
    """The checkpoint's generation_config.json sampling settings, as SamplingParams fields (users expect them)."""
    f = model_dir / "generation_config.json"
    if not f.is_file():
        return {}
    g = json.loads(f.read_text())
    out = {k: g[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty") if g.get(k) is not None}
    if g.get("do_sample") is False:
        out["temperature"] = 0.0
    if g.get("max_new_tokens"):
        out["max_new_tokens"] = g["max_new_tokens"]
    return out


def _load_model_and_tokenizer(cfg: GenerateConfig):
    from .checkpoint import load_model_and_tokenizer

    return load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype, cfg.chat_template, require_tokenizer=True,
                                    progress=None, adapter=cfg.adapter, revision=cfg.revision)


def _prompt_ids(tok, cfg: GenerateConfig, messages: list[dict]) -> list[int]:
    if cfg.chat:
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return tok.encode(messages[-1]["content"])


def _params(cfg: GenerateConfig) -> SamplingParams:
    return SamplingParams(**cfg.model_dump(include=set(SamplingParams.model_fields)))


def _printer(out) -> Callable[[int, int | None, str], None]:
    def on_token(row: int, token_id: int | None, text: str) -> None:
        out.write(text)
        out.flush()

    return on_token


# ------------------------------------------------------------------------------------------------ verbs


def run_info(cfg: InfoConfig) -> None:
    from .hub import is_hub_id, resolve_model
    from .models.hf import config_from_hf
    from .models.presets import PRESETS, preset_config
    from .models.summary import format_summary, model_summary

    path = resolve_model(cfg.model, cfg.revision) if is_hub_id(cfg.model) else Path(cfg.model)
    if path.exists():
        summary = model_summary(config_from_hf(path), path)
    elif cfg.model.lower() in PRESETS:
        summary = model_summary(preset_config(cfg.model))
    else:
        raise ConfigError(f"model '{cfg.model}' is neither a checkpoint directory nor a preset"
                          f"{did_you_mean(cfg.model.lower(), PRESETS)}; presets: {', '.join(PRESETS)}")
    print(json.dumps(summary, indent=2) if cfg.json_output else format_summary(summary))


def run_generate(cfg: GenerateConfig) -> None:
    from .infer import generate

    model, tok = _load_model_and_tokenizer(cfg)
    prompt = cfg.prompt if cfg.prompt is not None else sys.stdin.read()
    messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [{"role": "user", "content": prompt}]
    ids = _prompt_ids(tok, cfg, messages)
    on_token = _printer(sys.stdout) if cfg.stream else None
    result = generate(model, [ids], _params(cfg), tokenizer=tok, on_token=on_token, compile=cfg.compile)[0]
    if not cfg.stream:
        sys.stdout.write(result.text)
    sys.stdout.write("\n")


def run_chat(cfg: ChatConfig) -> None:
    """Interactive multi-turn chat. Commands: /reset clears the history, /exit (or EOF) quits."""
    from .infer.api.chat import ChatSession

    model, tok = _load_model_and_tokenizer(cfg)
    if tok.chat_template is None:
        tok.apply_chat_template([{"role": "user", "content": "x"}])  # raises the one-line "no chat template" error
    session = ChatSession(model, tok, _params(cfg), system=cfg.system, compile=cfg.compile)
    interactive = sys.stdin.isatty()
    print(f"lmforge chat with {Path(cfg.model).name}: /reset clears the conversation, /exit quits", file=sys.stderr)
    while True:
        try:
            text = input("you> " if interactive else "").strip()
        except EOFError:
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
        elif text:
            sys.stdout.write("assistant> ")
            session.ask(text, on_token=_printer(sys.stdout))
            sys.stdout.write("\n")
            sys.stdout.flush()


class ExportConfig(Section):
    base: str = Field(description="checkpoint to export: an HF directory, a .gguf file or a Hugging Face id (the "
                                  "adapter's base model)")
    adapter: str | None = None
    """Adapter directory to merge in (LoRA, DoRA, IA3, AdaLoRA, BitFit ...); prefix/prompt methods and Houlsby
    adapters cannot be merged: they are copied to OUT/adapter beside the base. Omit to convert `base`."""
    out: str = Field(description="where to write the HF checkpoint directory, or the .gguf file with format=gguf")
    revision: str | None = None
    """Branch, tag or commit of a Hugging Face id (default: main)."""
    format: Literal["hf", "gguf"] = "hf"
    """Output format: hf = config.json + safetensors + tokenizer files (transformers and lmforge load it); gguf = one
    file llama.cpp / Ollama run (see quant)."""
    quant: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m",
                   "q6_k"] = "q8_0"
    """format=gguf: weight type (llama.cpp names, any case): f32/f16/bf16, q8_0, q4_0/q4_1/q5_0/q5_1, K-quants
    q4_k_m (the usual pick), q4_k_s, q5_k_m, q5_k_s, q6_k."""
    pre_tokenizer: str | None = None
    """format=gguf: llama.cpp's pre-tokenizer name (tokenizer.ggml.pre) when detection cannot tell (llama-bpe ...)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the written weights; auto = the base checkpoint's (float32 for a quantized GGUF)."""

    @field_validator("quant", mode="before")
    @classmethod
    def _lower(cls, v):
        return v.lower() if isinstance(v, str) else v


def train_config_class(config: str | None, overrides: list[str]) -> type:
    """TrainConfig, or AlignConfig when the config file or an override says `stage: rm | dpo | ppo | grpo | orpo | kto`."""
    from .config import _read_yaml

    stage = (_read_yaml(config) if config else {}).get("stage")
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "stage":
            stage = value.strip()
    if stage is not None and stage not in ("pretrain", "sft", "rm", "dpo", "ppo", "grpo", "orpo", "kto"):
        raise ConfigError(f"config key 'stage': unknown stage '{stage}'; use one of pretrain, sft, rm, dpo, ppo, "
                          "grpo, orpo, kto")
    if stage in ("rm", "dpo", "ppo", "grpo", "orpo", "kto"):
        from .align.run import AlignConfig

        return AlignConfig
    from .train.config import TrainConfig

    return TrainConfig


def run_train(cfg) -> None:
    from .align.run import AlignConfig, run_alignment
    from .train import run_training

    result = run_alignment(cfg) if isinstance(cfg, AlignConfig) else run_training(cfg)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()
             if isinstance(v, (int, float, str))}
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:  # torchrun: rank 0 reports
        print(json.dumps(shown))


def run_export(cfg: ExportConfig) -> None:
    """Write a full HF checkpoint of `base` (a directory, a .gguf file or a Hugging Face id), with an adapter merged
    in if given; tokenizer files copied along (or, from a GGUF, written from its metadata). An adapter that cannot be
    merged (virtual tokens, nonlinear layers) is copied to OUT/adapter instead, and the output says so."""
    import shutil

    from .atomic import atomic_dir, check_replaceable
    from .checkpoint import save_tokenizer_files
    from .hub import resolve_model
    from .models.hf import load_hf, save_hf
    from .peft import adapter_method
    from .quant.model import dequantize_model

    base, out = resolve_model(cfg.base, cfg.revision), Path(cfg.out)
    adapter = resolve_model(cfg.adapter, marker="adapter_config.json") if cfg.adapter is not None else None
    method = adapter_method(adapter) if adapter is not None else None  # an unreadable adapter fails before loading
    if cfg.format == "gguf":
        return _export_gguf(cfg, base, adapter, method)
    if cfg.pre_tokenizer is not None or cfg.quant != "q8_0":
        raise ConfigError("quant and pre_tokenizer apply to format=gguf; add --format gguf")
    check_replaceable(out)  # before the slow part: out must be new, empty, or an earlier export
    dtype = None if cfg.dtype == "auto" else cfg.dtype
    model = dequantize_model(load_hf(base, dtype=dtype))  # a quantized base is written in full precision
    with atomic_dir(out, replace_only_models=True) as tmp:  # a kill leaves no half-written checkpoint
        if method is not None and method.mergeable:
            method.load(model, adapter)
            method.export(model, tmp)
        else:
            save_hf(model, tmp, dtype=dtype)
            if method is not None:
                shutil.copytree(adapter, tmp / "adapter")
        save_tokenizer_files(base, tmp)
    if method is None:
        print(f"{cfg.base} → {cfg.out} ({cfg.format})")
    elif method.mergeable:
        print(f"merged {cfg.adapter} ({method.name}) into {cfg.base} → {cfg.out}")
    else:
        print(f"{cfg.adapter} is a {method.name} adapter ({method.trains}), which cannot be merged into weights: "
              f"wrote the base model to {cfg.out} and the adapter beside it to {out / 'adapter'}; use both with "
              f"`lmforge generate {cfg.out} --adapter {out / 'adapter'}`")


def _export_gguf(cfg: ExportConfig, base: Path, adapter: Path | None, method) -> None:
    """`export --format gguf`: one .gguf file (a mergeable adapter folded in first when given)."""
    from .models.hf import load_hf
    from .quant.gguf_export import export_gguf
    from .quant.model import dequantize_model

    out = Path(cfg.out)
    if out.is_dir() or out.suffix.lower() != ".gguf":
        raise ConfigError(f"out '{cfg.out}' must be a .gguf file path for format=gguf (e.g. model-q4_k_m.gguf)")
    if method is not None and not method.mergeable:
        raise ConfigError(f"{cfg.adapter} is a {method.name} adapter, which cannot be merged into weights; llama.cpp "
                          "runs merged models only: export format=hf and use the adapter with lmforge")
    model = dequantize_model(load_hf(base, dtype="float32"))
    if method is not None:
        method.load(model, adapter)
        method.merge(model)  # folded into plain weights: what llama.cpp runs
    export_gguf(model, out, tokenizer_dir=base, qtype=cfg.quant, name=Path(cfg.base).stem,
                pre_tokenizer=cfg.pre_tokenizer)
    print(f"{cfg.base}{f' + {cfg.adapter}' if cfg.adapter else ''} → {out} (gguf {cfg.quant}, "
          f"{out.stat().st_size / 2**20:.1f} MiB)")


def run_quickstart_verb(cfg) -> None:
    from .quickstart import run_quickstart

    run_quickstart(cfg)


def _lazy(module: str, name: str) -> Callable:
    """Import a verb's config class or run function only when that verb runs (keeps `lmforge --help` fast)."""
    def load(*args):
        import importlib

        obj = getattr(importlib.import_module(module, __package__), name)
        return obj(*args) if args else obj

    return load


# verb → (config class or a function returning it (lazy imports), run function, positional key, description)
VERBS: dict[str, tuple] = {
    "info": (InfoConfig, run_info, "model", "architecture, parameter count and bytes per dtype of a checkpoint or preset"),
    "generate": (GenerateConfig, run_generate, "model", "complete a prompt (streaming)"),
    "chat": (ChatConfig, run_chat, "model", "interactive multi-turn chat with the chat template"),
    "train": (_lazy(".train.config", "TrainConfig"), run_train, "config",
              "pretrain / fine-tune (full, LoRA, ...) or align (rm, dpo, ppo, grpo, orpo, kto; `stage=grpo --help` lists "
              "their options) from a YAML config; torchrun-ready"),
    "export": (ExportConfig, run_export, "base",
               "HF checkpoint from a .gguf file, a checkpoint or an HF id, optionally with an adapter merged in"),
    "quantize": (_lazy(".quant.run", "QuantizeConfig"), _lazy(".quant.run", "run_quantize"), "model",
                 "INT8 / INT4 / NF4 / AWQ / GPTQ / BitNet weights, and GGUF export for llama.cpp"),
    "serve": (_lazy(".serve.config", "ServeConfig"), _lazy(".serve.config", "run_serve"), "model",
              "OpenAI-compatible HTTP server on the continuous-batching engine"),
    "eval": (_lazy(".eval.runner", "EvalConfig"), _lazy(".eval.runner", "run_eval"), ("model", "tasks"),
             "evaluate a model on task files (perplexity, EM, BLEU, ROUGE, MC, pass@k, judge)"),
    "plan": (_lazy(".plan.planner", "PlanConfig"), _lazy(".plan.planner", "run_plan"), "model",
             "what fits: predicted memory and speed for training and inference, before you run"),
    "tokenizer": (_lazy(".tokenizer.train_cli", "TokenizerConfig"), _lazy(".tokenizer.train_cli", "run_tokenizer"),
                  ("action", "inputs"), "train a tokenizer, merge one into a base keeping every id, resize a model"),
    "quickstart": (_lazy(".quickstart", "QuickstartConfig"), run_quickstart_verb, "out",
                   "LoRA-fine-tune SmolLM2-135M-Instruct, before/after, serve it, RAG with citations (CPU, minutes); "
                   "--from-scratch: pretrain a tiny model first"),
}

# ------------------------------------------------------------------------------------------------ argv


def _usage() -> str:
    rows = "\n".join(f"  {v:10} {entry[-1]}" for v, entry in VERBS.items())
    rows += "\n  rag        index documents (rag index DOCS --store DIR), answer with cited sources (rag ask Q)"
    return (f"lmforge {__version__}\n\nusage: lmforge <verb> [MODEL] [--config FILE] [key=value | --key value ...]\n\n"
            f"verbs:\n{rows}\n\n`lmforge <verb> --help` lists every config key.")


def verb_config(verb: str, args: list[str]):
    """The validated config `lmforge VERB ARGS...` runs with; no weights are loaded and nothing runs (the README
    test checks every command with it)."""
    cls, _, positional, _ = VERBS[verb]
    cls = cls if isinstance(cls, type) else cls()  # lazily imported config class
    config, overrides = split_args(args, positional, cls)
    if verb == "train":  # one verb for every stage: sft/pretrain on TrainConfig, rm/dpo/ppo on AlignConfig
        cls = train_config_class(config, overrides)
    cfg = load_config(cls, config, overrides)
    if isinstance(cfg, GenerateConfig):  # checkpoint's sampling defaults < config file < command line
        from .hub import resolve_model

        defaults = _generation_defaults(resolve_model(cfg.model, cfg.revision))
        cfg = load_config(cls, config, overrides, base=defaults) if defaults else cfg
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb == "rag":  # sub-verbs: rag index DOCS_DIR --store DIR | rag ask QUESTION --store DIR
        from .rag.cli import main as rag_main

        return rag_main(rest, debug=debug)

    def body() -> None:
        if verb not in VERBS:
            raise ConfigError(f"unknown verb '{verb}'{did_you_mean(verb, VERBS)}; verbs: {', '.join(VERBS)}")
        cls, run, positional, desc = VERBS[verb]
        cls = cls if isinstance(cls, type) else cls()  # lazily imported config class
        if "-h" in rest or "--help" in rest:
            if verb == "train":  # `lmforge train stage=grpo --help`: the alignment stages' options
                cls = train_config_class(None, [a for a in rest if a.startswith("stage=")])
            print(f"lmforge {verb}: {desc}\n\n{format_help(cls)}")
            return
        run(verb_config(verb, rest))

    return report_errors(f"lmforge {verb}", body, debug)


if __name__ == "__main__":
    sys.exit(main())
