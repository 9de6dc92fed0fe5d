"""How the next token is chosen and when a sequence stops: the logits pipeline (`logits`: penalties → temperature
→ top-k → top-p → draw), its per-request batched form on the device (`batch`, the engine's), the JSON-object
constraint (`json_constraint`) and stop strings (`stops`)."""
from .logits import SamplingParams, apply_repetition_penalty, finite_logits, sample, top_k_filter, top_p_filter

__all__ = ["SamplingParams", "apply_repetition_penalty", "finite_logits", "sample", "top_k_filter", "top_p_filter"]
