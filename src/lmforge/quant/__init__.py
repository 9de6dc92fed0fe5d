"""Quantization: NF4, INT8/INT4 weight-only PTQ, AWQ, GPTQ, QAT, BitNet b1.58, quantized checkpoints, GGUF export."""
