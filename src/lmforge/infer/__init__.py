"""Inference: sampling and `generate()` (the serving engine joins here later)."""
from .generate import Completion, generate
from .sampling import SamplingParams, apply_repetition_penalty, sample, top_k_filter, top_p_filter

__all__ = ["Completion", "generate", "SamplingParams", "apply_repetition_penalty", "sample", "top_k_filter",
           "top_p_filter"]
