"""Quantization: NF4, INT8/INT4 weight-only PTQ (LLM.int8() outliers), AWQ, GPTQ, QAT, BitNet b1.58, quantized
checkpoints and GGUF export. Quantized linears replace `nn.Linear` modules by path (`quantize_model`) or come from a
linear factory; every one exposes nn.Linear's surface (in/out_features, bias, a dequantized `weight`)."""
from .base import QuantKernels, QuantLinear, set_kernels
from .bitnet import BitLinear, PackedBitLinear, bitnet_linear_factory
from .calibration import calibration_tokens
from .linear import Int4Linear, Int8Linear, prepare_fast_path
from .model import QUANT_LINEARS, load_quantized, quantize_model, quantized_linears, quantized_size, save_quantized
from .nf4 import NF4Linear, NF4Tensor, dequantize_nf4, nf4_linear_factory, quantize_nf4
from .qat import FakeQuantLinear, QATMethod, apply_qat, convert_qat, qat_linear_factory

__all__ = ["QuantLinear", "QuantKernels", "set_kernels", "BitLinear", "PackedBitLinear", "bitnet_linear_factory", "calibration_tokens",
           "Int4Linear", "Int8Linear", "prepare_fast_path", "QUANT_LINEARS", "load_quantized", "quantize_model",
           "quantized_linears", "quantized_size", "save_quantized", "NF4Linear", "NF4Tensor", "dequantize_nf4", "nf4_linear_factory",
           "quantize_nf4", "FakeQuantLinear", "QATMethod", "apply_qat", "convert_qat", "qat_linear_factory"]
