"""Inference: `generate()` (the simple reference path), the serving engine and `LLM` (offline batches on it).

    from lmforge.infer import LLM, SamplingParams, generate

The package's parts:

- `api/`: what callers use — `generate()`, `LLM`, `ChatSession`, `AsyncEngine` (the server's), the output types;
- `engine/`: the serving engine — scheduler, paged KV cache, model runner (CUDA graphs), multi-LoRA adapters;
- `sampling/`: how the next token is chosen and when a sequence stops — the logits pipeline, its batched per-request
  form, the JSON-object constraint, stop strings;
- `kernels/`: the Triton decode kernels (paged attention, GEMV, greedy step) and the fused decode modules.
"""
from .api.generate import generate
from .api.llm import LLM
from .api.outputs import Completion, TokenLogprob
from .engine.core import Engine, EngineConfig
from .kernels.options import KernelOptions
from .sampling.logits import SamplingParams, apply_repetition_penalty, sample, top_k_filter, top_p_filter

__all__ = ["Completion", "Engine", "EngineConfig", "KernelOptions", "LLM", "SamplingParams", "TokenLogprob",
           "apply_repetition_penalty", "generate", "sample", "top_k_filter", "top_p_filter"]
