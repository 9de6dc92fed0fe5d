"""GPTQ and AWQ checkpoints: `lmforge quantize --format gptq|awq` writes the layout transformers/vLLM load, checked by
an independent unpacker (AutoGPTQ's and AutoAWQ's published formulas, written out here) feeding a `transformers`
model; and lmforge reads checkpoints packed by such tools (act-order g_idx, symmetric v1 zeros, AWQ's GEMM order)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lmforge.cli import main
from lmforge.errors import CheckpointError
from lmforge.models import load_hf
from lmforge.models.converters import converter_for
from lmforge.quant import Int4Linear, Int8Linear, quantize_model, quantized_linears
from lmforge.quant.formats import Int4ActOrderLinear, save_format
from lmforge.quant.rtn import int4_dequantize
from lmforge.testing import make_tiny_hf_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")

# ----------------------------------------------------------------------- reference packing (not lmforge's code)


def ref_gptq_dequant(qweight, qzeros, scales, g_idx, v1=True, bits=4):
    """AutoGPTQ's reference dequantization: (in, out) weight from qweight (in*bits/32, out), qzeros
    (G, out*bits/32)."""
    per, mask = 32 // bits, 2**bits - 1
    wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
    small = torch.int16 if bits == 8 else torch.int8
    zeros = torch.bitwise_right_shift(torch.unsqueeze(qzeros, 2).expand(-1, -1, per), wf.unsqueeze(0)).to(small)
    zeros = torch.bitwise_and(zeros + (1 if v1 else 0), mask).reshape(scales.shape)
    weight = torch.bitwise_right_shift(torch.unsqueeze(qweight, 1).expand(-1, per, -1), wf.unsqueeze(-1)).to(small)
    weight = torch.bitwise_and(weight, mask).reshape(-1, weight.shape[-1])
    g = g_idx.long()
    return scales[g].float() * (weight.float() - zeros[g].float())


def ref_awq_dequant(qweight, qzeros, scales, group_size):
    """AutoAWQ's unpack + reverse order: (in, out) weight from qweight (in, out/8), qzeros (G, out/8)."""
    shifts = torch.arange(0, 32, 4)
    iw = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8).view(qweight.shape[0], -1)
    iz = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8).view(qzeros.shape[0], -1)
    rev = torch.arange(iw.shape[-1]).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
    iw, iz = torch.bitwise_and(iw[:, rev], 15), torch.bitwise_and(iz[:, rev], 15)
    return (iw.float() - iz.float().repeat_interleave(group_size, 0)) * scales.float().repeat_interleave(group_size, 0)


def ref_pack_columns(values: np.ndarray, order=(0, 1, 2, 3, 4, 5, 6, 7)) -> np.ndarray:
    """AutoAWQ-style loop: (rows, 8m) ints -> (rows, 8m/8) int32, value i of word c = column 8c + order[i]."""
    out = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.uint32)
    for c in range(out.shape[1]):
        for i in range(8):
            out[:, c] |= (values[:, c * 8 + order[i]].astype(np.uint32) & 15) << (4 * i)
    return out.view(np.int32)


def ref_pack_rows(values: np.ndarray) -> np.ndarray:
    """AutoGPTQ-style loop: (8m, cols) ints -> (m, cols) int32, value j of word r = row 8r + j."""
    out = np.zeros((values.shape[0] // 8, values.shape[1]), dtype=np.uint32)
    for r in range(out.shape[0]):
        for j in range(8):
            out[r] |= (values[8 * r + j].astype(np.uint32) & 15) << (4 * j)
    return out.view(np.int32)


def _reference_model(path, weights: dict[str, torch.Tensor]):
    """A transformers model of `path`'s config (quantization_config dropped) holding the file's float tensors and
    the given dequantized (out, in) weights."""
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("quantization_config", None)
    config = transformers.AutoConfig.for_model(**cfg)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    plain = {k: v.float() for k, v in load_file(path / "model.safetensors").items()
             if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    plain.update({f"{m}.weight": w for m, w in weights.items()})
    names = model.state_dict()
    plain = {k: v for k, v in plain.items() if k in names or v.any()}  # GPTQ tools' zero biases: nothing to load
    missing, unexpected = model.load_state_dict(plain, strict=False)
    assert not unexpected and all("rotary" in k or k == "lm_head.weight" for k in missing), (missing, unexpected)
    if "lm_head.weight" in missing:
        model.tie_weights()
    return model


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
        return (out.logits if hasattr(out, "logits") else out).float()


# --------------------------------------------------------------------------------------------------- writing


@pytest.mark.parametrize("fmt,arch,method", [("gptq", "LlamaForCausalLM", "int4"), ("awq", "Qwen2ForCausalLM", "int4"),
                                             ("gptq", "Phi3ForCausalLM", "int4"), ("gptq", "Qwen2ForCausalLM", "int8")])
def test_quantize_writes_the_layout_other_tools_read(tmp_path, fmt, arch, method):
    """`lmforge quantize --format gptq|awq`: config.json and tensor shapes/dtypes as transformers/vLLM expect; the
    independent unpacker gives the in-memory quantized weights exactly (scales at fp16; Phi-3's fused q|k|v and
    gate|up as stacked rows; INT8 as 8-bit GPTQ per channel); a transformers model holding what it unpacks computes
    the logits lmforge computes from the same file, and those match the in-memory model."""
    src, out = tmp_path / "src", tmp_path / fmt
    torch.manual_seed(0)
    make_tiny_hf_model(arch, src)
    assert main(["quantize", str(src), "--method", method, "--group-size", "32", "--format", fmt,
                 "--out", str(out)]) == 0
    bits, gs = (8, -1) if method == "int8" else (4, 32)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == fmt and qc["bits"] == bits and qc["group_size"] == gs
    assert (qc["checkpoint_format"], qc["desc_act"], qc["sym"]) == ("gptq", False, bits == 8) if fmt == "gptq" else \
        (qc["version"], qc["zero_point"]) == ("gemm", True)
    mem = quantize_model(load_hf(src), method, group_size=32)  # what the CLI computed, in memory
    layers = quantized_linears(mem)
    fp16_scales = {f"{p}.weight": int4_dequantize(m.codes(), m.scale.half().float(), m.zero) if bits == 4 else
                   m.qweight.float() * m.scale.half().float()[:, None] for p, m in layers.items()}
    want = dict(converter_for(arch).to_hf(fp16_scales, mem.cfg))  # (fused, for Phi-3's qkv_proj / gate_up_proj)
    tensors = load_file(out / "model.safetensors")
    weights = {}
    for name in [k for k in tensors if k.endswith(".qweight")]:
        hf = name.removesuffix(".qweight")
        qw, qz, sc = tensors[f"{hf}.qweight"], tensors[f"{hf}.qzeros"], tensors[f"{hf}.scales"]
        n_out, n_in = want[f"{hf}.weight"].shape
        groups, per = (1, 4) if bits == 8 else (n_in // 32, 8)
        assert qw.dtype == qz.dtype == torch.int32 and sc.dtype == torch.float16
        assert tuple(qz.shape) == (groups, n_out // per) and tuple(sc.shape) == (groups, n_out)
        if fmt == "gptq":
            assert tuple(qw.shape) == (n_in // per, n_out)
            assert torch.equal(tensors[f"{hf}.g_idx"], torch.arange(n_in, dtype=torch.int32) // (n_in // groups))
            weights[hf] = ref_gptq_dequant(qw, qz, sc, tensors[f"{hf}.g_idx"], bits=bits).T
        else:
            assert tuple(qw.shape) == (n_in, n_out // 8)
            weights[hf] = ref_awq_dequant(qw, qz, sc, 32).T
        assert torch.equal(weights[hf], want[f"{hf}.weight"]), hf
    assert len(weights) == len(want) >= 4 * mem.cfg.n_layers
    ids = torch.randint(0, mem.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    theirs = _logits(_reference_model(out, weights), ids)
    ours = load_hf(out, dtype="float32")
    assert all(isinstance(m, Int4Linear if bits == 4 else Int8Linear) for m in quantized_linears(ours).values())
    assert torch.allclose(_logits(ours, ids), theirs, atol=1e-4, rtol=1e-4)
    ref = _logits(mem, ids)  # the file holds fp16 scales and embeddings: fp16 rounding apart
    assert (theirs - ref).abs().max() < 1e-2 * ref.abs().max()


# --------------------------------------------------------------------------------------------------- reading


def _pack_like_other_tools(src, out, fmt: str, v1: bool = True, legacy: bool = False):
    """Quantize a transformers model's linears as GPTQ tools (act-order groups in a random column order, symmetric
    zero point 8, a zero bias on every layer) or AutoAWQ (asymmetric) do, pack them with the reference loops above,
    write the checkpoint with AutoGPTQ/AutoAWQ's config keys; returns the dequantized (out, in) weights."""
    hf = make_tiny_hf_model("LlamaForCausalLM", src)
    state = {k: v.half() for k, v in hf.state_dict().items() if "rotary" not in k}
    weights, gs = {}, 32
    gen = torch.Generator().manual_seed(1)
    for i in range(hf.config.num_hidden_layers):
        for name in LINEARS:
            m = f"model.layers.{i}.{name}"
            w = state.pop(f"{m}.weight").float()  # (out, in)
            n_out, n_in = w.shape
            perm = torch.randperm(n_in, generator=gen) if fmt == "gptq" else torch.arange(n_in)
            g_idx = torch.empty(n_in, dtype=torch.int32)
            g_idx[perm] = torch.arange(n_in, dtype=torch.int32) // gs
            cols = w[:, perm].view(n_out, n_in // gs, gs)
            if fmt == "gptq":
                scale = (cols.abs().amax(-1) / 7).clamp(min=1e-6).half()  # (out, G)
                zero = torch.full_like(scale, 8, dtype=torch.int64)
            else:
                lo, hi = cols.amin(-1).clamp(max=0), cols.amax(-1).clamp(min=0)
                scale = ((hi - lo) / 15).clamp(min=1e-6).half()
                zero = (-lo / scale.float()).round().clamp(0, 15).long()
            s_col, z_col = scale.float()[:, g_idx.long()], zero[:, g_idx.long()]  # per input column
            q = (w / s_col).round().add(z_col).clamp(0, 15).long()  # (out, in)
            weights[m] = (q - z_col).float() * s_col
            if fmt == "gptq":
                state[f"{m}.qweight"] = torch.from_numpy(ref_pack_rows(q.T.numpy()))
                state[f"{m}.qzeros"] = torch.from_numpy(ref_pack_columns((zero.T - (1 if v1 else 0)).numpy()))
                state[f"{m}.g_idx"] = g_idx
                state[f"{m}.bias"] = torch.zeros(n_out, dtype=torch.float16)
            else:
                order = (0, 2, 4, 6, 1, 3, 5, 7)
                state[f"{m}.qweight"] = torch.from_numpy(ref_pack_columns(q.T.numpy(), order))
                state[f"{m}.qzeros"] = torch.from_numpy(ref_pack_columns(zero.T.numpy(), order))
            state[f"{m}.scales"] = scale.T.contiguous()
    out.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["torch_dtype"] = "float16"
    cfg["quantization_config"] = (
        {"quant_method": "gptq", "bits": 4, "group_size": gs, "desc_act": True, "sym": True,
         **({} if v1 else {"checkpoint_format": "gptq_v2"})} if fmt == "gptq" else
        {"quant_method": "awq", "w_bit": 4, "q_group_size": gs, "zero_point": True, "version": "GEMM"})
    if legacy:  # older AutoGPTQ / AutoAWQ: the quantization settings in a file of their own
        name = "quantize_config.json" if fmt == "gptq" else "quant_config.json"
        (out / name).write_text(json.dumps({k: v for k, v in cfg.pop("quantization_config").items()
                                            if k != "quant_method"}))
    (out / "config.json").write_text(json.dumps(cfg))
    return weights


@pytest.mark.parametrize("fmt,v1,legacy", [("gptq", True, False), ("gptq", False, False), ("awq", True, False),
                                           ("gptq", True, True), ("awq", True, True)])
def test_reads_checkpoints_packed_by_other_tools(tmp_path, fmt, v1, legacy):
    """act-order GPTQ (v1 and v2 zero points), AWQ's GEMM order, and the older layout keeping the settings in
    quantize_config.json / quant_config.json: lmforge's logits equal a transformers model of the unpacked weights."""
    weights = _pack_like_other_tools(tmp_path / "src", tmp_path / "ext", fmt, v1, legacy)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    theirs = _logits(_reference_model(tmp_path / "ext", weights), ids)
    ours = load_hf(tmp_path / "ext", dtype="float32")
    kinds = {type(m) for m in quantized_linears(ours).values()}
    assert kinds == ({Int4ActOrderLinear} if fmt == "gptq" else {Int4Linear})
    assert torch.allclose(_logits(ours, ids), theirs, atol=1e-4, rtol=1e-4)
    if fmt == "gptq":  # act-order groups survive a round trip through lmforge's own GPTQ writer
        save_format(ours, tmp_path / "again", "gptq")
        assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["desc_act"]
        again = load_file(tmp_path / "again" / "model.safetensors")
        g = "model.layers.1.mlp.down_proj.g_idx"
        assert torch.equal(again[g], load_file(tmp_path / "ext" / "model.safetensors")[g])
        assert torch.allclose(_logits(load_hf(tmp_path / "again", dtype="float32"), ids), theirs, atol=1e-4, rtol=1e-4)


def test_bad_format_inputs_are_one_line(tmp_path, capsys):
    src = tmp_path / "src"
    make_tiny_hf_model("LlamaForCausalLM", src)
    capsys.readouterr()
    assert main(["quantize", str(src), "--method", "nf4", "--format", "gptq", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "format gptq stores weight-only integer weights" in err and "nf4" in err
    _pack_like_other_tools(tmp_path / "s2", tmp_path / "ext", "awq")
    cfg = json.loads((tmp_path / "ext" / "config.json").read_text())
    for key, value, message in [("version", "gemv", "version='gemv' is not supported"),
                                ("w_bit", 8, "bits=8 is not supported: lmforge reads 4-bit AWQ")]:
        bad = {**cfg, "quantization_config": {**cfg["quantization_config"], key: value}}
        (tmp_path / "ext" / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=message):
            load_hf(tmp_path / "ext")


def test_act_order_layers_pack_only_with_one_column_order():
    """The engine packs q/k/v (gate/up) into one layer: act-order layers sharing their column order pack into one
    that computes what the three did; different orders do not pack."""
    torch.manual_seed(0)
    perm, layers = torch.randperm(64), []
    for n_out in (32, 16, 16):
        plain = Int4Linear.from_linear(torch.nn.Linear(64, n_out), 32)
        layer = Int4ActOrderLinear(64, n_out, True, 32)
        layer.load_state_dict({**plain.state_dict(), "perm": perm})
        layers.append(layer)
    x = torch.randn(3, 64)
    want = torch.cat([m(x) for m in layers], -1)
    packed = Int4ActOrderLinear.pack(layers)
    assert packed is not None and torch.equal(packed(x), want)
    layers[1].perm = torch.randperm(64)
    assert Int4ActOrderLinear.pack(layers) is None
