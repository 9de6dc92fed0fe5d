"""NF4: code values, round-trip error vs uniform INT4, storage size, NF4Linear forward / state dict / dtype moves."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.quant.nf4 import NF4_LEVELS, NF4Linear, dequantize_nf4, pack_nibbles, quantize_nf4, unpack_nibbles

# bitsandbytes' published NF4 table (functional.py, get_4bit_type("nf4")), used only as an oracle here.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def test_levels_are_the_published_normal_quantiles():
    assert torch.allclose(NF4_LEVELS, torch.tensor(PUBLISHED_NF4), atol=1e-6)


def test_pack_unpack_roundtrip():
    codes = torch.randint(0, 16, (3, 10), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (3, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), codes)


def _uniform_int4_blockwise(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Symmetric absmax INT4 (levels -7..7 scaled by absmax/7) per block: the uniform baseline, same constants."""
    flat = w.flatten().view(-1, block)
    scale = flat.abs().amax(1, keepdim=True) / 7
    return ((flat / scale).round().clamp(-8, 7) * scale).view_as(w)


def test_nf4_beats_uniform_int4_on_normal_weights():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    nf4_err = (dequantize_nf4(quantize_nf4(w)) - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()
    int4_err = (_uniform_int4_blockwise(w) - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()
    assert nf4_err < 0.9 * int4_err, (nf4_err, int4_err)
    assert nf4_err < 0.11  # ~0.095 measured: 16 levels on a normal block of 64


def test_bytes_per_parameter():
    w = torch.randn(1024, 1024)
    n = w.numel()
    dq = quantize_nf4(w)
    assert dq.nbytes / n == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256) + 4 / n, rel=1e-6)  # ~0.516
    plain = quantize_nf4(w, double_quant=False)
    assert plain.nbytes / n == pytest.approx(0.5 + 4 / 64)  # 0.5625
    # double quantization of the constants costs almost nothing in accuracy
    e_dq = (dq.dequantize() - w).pow(2).mean()
    e_plain = (plain.dequantize() - w).pow(2).mean()
    assert e_dq < 1.02 * e_plain


def test_odd_shapes_pad_and_exact_codes():
    w = torch.randn(7, 13)  # 91 elements: not a multiple of the block
    q = quantize_nf4(w)
    back = q.dequantize()
    assert back.shape == w.shape and back.dtype == w.dtype
    # values that are exactly absmax * level come back exactly (no double quant: exact fp32 scales)
    exact = (NF4_LEVELS[torch.randint(0, 16, (2, 64))] * 3.0).contiguous()
    exact[:, 0] = 3.0
    assert torch.allclose(quantize_nf4(exact, double_quant=False).dequantize(), exact, atol=1e-6)


def test_nf4_linear_matches_dequantized_reference_and_state_dict_roundtrip():
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=True)
    q = NF4Linear.from_linear(lin)
    assert (q.in_features, q.out_features) == (128, 96)
    assert q.weight.shape == (96, 128) and not any(p.requires_grad for p in q.parameters())
    x = torch.randn(2, 5, 128)
    expect = F.linear(x, q.weight, lin.bias)
    assert torch.allclose(q(x), expect, atol=1e-6)
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.12
    # a fresh module loads the state dict and reproduces the output bit-exactly
    fresh = NF4Linear(128, 96, bias=True, dtype=torch.float32)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))
    assert set(q.state_dict()) == {"codes", "absmax", "absmax_scale", "absmax_mean", "bias"}


def test_nf4_linear_dtype_move_keeps_fp32_constants_and_grads_flow_to_input():
    q = NF4Linear.from_linear(nn.Linear(64, 32))
    q.to(torch.bfloat16)
    assert q.absmax_scale.dtype == torch.float32 and q.absmax_mean.dtype == torch.float32
    assert q.bias.dtype == torch.bfloat16 and q.codes.dtype == torch.uint8
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
