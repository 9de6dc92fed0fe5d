"""The serving engine: `Engine` (`core`) steps requests through the `scheduler` (continuous batching over the
`paged_cache`'s blocks, prefix caching, preemption); the `model_runner` runs the forwards (CUDA graphs on GPU) and
`multi_lora` holds the LoRA adapters requests may pick."""
from .core import ContextLengthError, Engine, EngineConfig

__all__ = ["ContextLengthError", "Engine", "EngineConfig"]
