"""Parameter-efficient fine-tuning: LoRA layers, the training-method seam, PEFT-format adapters."""
from .lora import LoraConfig, LoRALinear, apply_lora, lora_layers, lora_state_dict, merge_lora, merged
from .methods import METHODS, FullMethod, LoraMethod, Method, build_method
from .peft_format import load_peft_adapter, save_peft_adapter

__all__ = ["LoraConfig", "LoRALinear", "apply_lora", "lora_layers", "lora_state_dict", "merge_lora", "merged",
           "METHODS", "Method", "FullMethod", "LoraMethod", "build_method", "load_peft_adapter", "save_peft_adapter"]
