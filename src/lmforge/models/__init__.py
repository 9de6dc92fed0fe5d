"""One configurable decoder (`Transformer` + `ModelConfig`), presets, and Hugging Face checkpoint I/O."""
from .config import ModelConfig, RopeScaling
from .kv_cache import KVCache, RollingKVCache
from .transformer import CheckpointPolicy, Transformer, default_linear, transformers_in

__all__ = ["ModelConfig", "RopeScaling", "KVCache", "RollingKVCache", "CheckpointPolicy", "Transformer",
           "default_linear", "transformers_in"]
from .converters import REGISTRY, converter_for  # noqa: E402
from .hf import config_from_hf, load_hf, save_hf  # noqa: E402

__all__ += ["REGISTRY", "converter_for", "config_from_hf", "load_hf", "save_hf"]
from .presets import PRESETS, preset_config  # noqa: E402

__all__ += ["PRESETS", "preset_config"]
