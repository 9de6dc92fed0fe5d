"""Parameter-efficient fine-tuning: LoRA and its relatives, adapters, prompts; the training-method seam; PEFT files.

Importing this package registers every method in `METHODS` (each module registers its own class on import).
"""
from .lora import LoraConfig, LoRALinear, apply_lora, lora_layers, lora_state_dict, merge_lora, merged
from .methods import (METHODS, FullMethod, LoraMethod, Method, adapter_method, build_method, describe_methods,
                      load_adapter, register_method)
from .peft_format import load_peft_adapter, save_peft_adapter
from .adalora import AdaLoraMethod, SVDLinear
from .adapters import AdapterLinear, AdapterMethod
from .bitfit import BitFitMethod
from .dora import DoRALinear, DoraMethod
from .ia3 import IA3Linear, IA3Method
from .prilora import PriLoraMethod
from .prompts import PrefixTuningMethod, PromptTuningMethod, PTuningMethod, PTuningV2Method
from .qlora import QLoraMethod

__all__ = ["LoraConfig", "LoRALinear", "apply_lora", "lora_layers", "lora_state_dict", "merge_lora", "merged",
           "METHODS", "Method", "FullMethod", "LoraMethod", "adapter_method", "load_adapter", "build_method",
           "describe_methods", "register_method",
           "load_peft_adapter", "save_peft_adapter", "AdaLoraMethod", "SVDLinear", "AdapterLinear", "AdapterMethod",
           "BitFitMethod", "DoRALinear", "DoraMethod", "IA3Linear", "IA3Method", "PriLoraMethod",
           "PrefixTuningMethod", "PTuningV2Method", "PromptTuningMethod", "PTuningMethod", "QLoraMethod"]
