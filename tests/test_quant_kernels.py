"""Quantized matmul kernels (`lmforge.quant.qkernel`): the reference math and the Triton kernels against
dequantize-then-`F.linear`, the ops' autograd and fake registrations, and the fallback when a kernel fails.

Off CUDA the Triton kernels run in triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py); the
interpreter's `tl.dot` mishandles bfloat16 (it multiplies the raw 16-bit patterns), so the GEMM is checked in float16
here and in bfloat16 only on CUDA (where every kernel variant also checks itself before first use)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.infer.kernels.paged_attention import kernel_available
from lmforge.quant import Int4Linear, Int8Linear, NF4Linear, qkernel, quantize_nf4
from lmforge.quant.nf4 import NF4_LEVELS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not kernel_available(DEVICE), reason="needs triton (CUDA, or its CPU interpreter)")


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """Off CUDA the layers never route to the interpreter; these tests ask for it (and start from no verdicts)."""
    monkeypatch.setattr(qkernel, "cpu_interpreter", True)
    monkeypatch.setattr(qkernel, "_status", {})


def _layers(K: int = 256, N: int = 72, seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=True)
    return {"int8": Int8Linear.from_linear(lin), "int4 g32": Int4Linear.from_linear(lin, group_size=32),
            "int4 g128": Int4Linear.from_linear(lin, group_size=128), "nf4": NF4Linear.from_linear(lin),
            "nf4 fp32 absmax": NF4Linear.from_linear(lin, double_quant=False)}


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    err = (got.float() - want.float()).abs().max().item()
    assert torch.isfinite(got).all() and err <= rel * want.float().abs().max().item() + 1e-3, err


# ------------------------------------------------------------------------------------------------ reference math


def test_reference_paths_equal_dequantize_then_linear():
    """Each layer's forward (CPU: the reference) against F.linear on its dequantized weight: fp32 bit for bit where
    the math is the same, NF4's level-pair table within a bf16 rounding of the weight."""
    x = torch.randn(5, 256)
    for name, layer in _layers().items():
        want = F.linear(x, layer.weight.float(), layer.bias)
        got = layer(x)
        assert got.shape == (5, 72) and got.dtype == torch.float32
        assert (got - want).abs().max().item() < 1e-4, name
        _close(layer(x.bfloat16()), want, 2e-2)
    t = quantize_nf4(torch.randn(40, 192))  # the table dequantization itself: exact in fp32, rows spanning blocks
    assert torch.equal(qkernel.nf4_dequantize(t.codes, t.absmax, t.absmax_scale, t.absmax_mean, (40, 192), 64, 256,
                                              torch.float32), t.dequantize(torch.float32))
    odd = quantize_nf4(torch.randn(7, 100), block_size=64)  # 700 weights: the last block is padded
    assert torch.equal(qkernel.nf4_dequantize(odd.codes, odd.absmax, odd.absmax_scale, odd.absmax_mean, (7, 100),
                                              64, 256, torch.float32), odd.dequantize(torch.float32))


def test_ops_match_reference_and_give_input_gradients():
    """The custom ops (CPU implementation) compute the reference, and backward gives dx = dy @ W (QLoRA's path)."""
    for name, layer in _layers(K=128, N=48).items():
        x = torch.randn(3, 128, requires_grad=True)
        w = layer.weight.float().detach()
        if isinstance(layer, NF4Linear):
            y = qkernel.nf4_linear(x, layer.codes, layer.absmax, layer.absmax_scale, layer.absmax_mean, 48, 64, 256)
        elif isinstance(layer, Int4Linear):
            y = qkernel.int4_linear(x, layer.qweight, layer.scale, layer.zero, layer.group_size)
        else:
            y = qkernel.int8_linear(x, layer.qweight, layer.scale)
        assert (y - F.linear(x, w)).abs().max().item() < 1e-4, name
        dy = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, dy)
        assert (gx - dy @ w).abs().max().item() < 1e-4, name


def test_opcheck_int4_op():
    """torch.library's own consistency checks (schema, fake kernel, autograd registration) for one op."""
    layer = Int4Linear.from_linear(nn.Linear(64, 16), group_size=32)
    x = torch.randn(2, 64, requires_grad=True)
    torch.library.opcheck(qkernel.int4_linear, (x, layer.qweight, layer.scale, layer.zero, 32),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ------------------------------------------------------------------------------------------------ Triton kernels


@needs_triton
@pytest.mark.parametrize("rows", [1, 20])  # GEMV (decode; its check runs 3 rows), GEMM (batched)
def test_triton_kernels_match_dequantize_then_linear(rows, kernels_on_cpu):
    """Every format's kernel on the layers' own buffers: N = 72 (not a multiple of any row block), K = 320 (INT4
    g32: 10 groups, not a multiple of the GEMV's groups per step), and K = 256 for group/block 64 and 128."""
    dtype = torch.bfloat16 if rows <= qkernel.GEMV_MAX_ROWS or DEVICE.type == "cuda" else torch.float16
    cases = {**{f"{k} K256": v for k, v in _layers(K=256).items()}, "int4 g32 K320": Int4Linear.from_linear(nn.Linear(320, 72), group_size=32)}
    for name, layer in cases.items():
        layer = layer.to(DEVICE)
        x = torch.randn(rows, layer.in_features, device=DEVICE).to(dtype)
        want = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        y = layer(x)
        assert y.dtype == dtype and y.shape == (rows, 72)
        _close(y, want, 2e-2)
    status = qkernel.kernel_status()
    path = "gemv" if rows <= qkernel.GEMV_MAX_ROWS else "gemm"
    assert status and all(v is True for v in status.values()), status  # every variant verified and used
    assert {k.split("/")[0] for k in status} == {"int8", "int4", "nf4"} and all(f"/{path}/" in k for k in status)


@needs_triton
@pytest.mark.parametrize("variant", [(1, 0), (0, 1), (1, 1)], ids=["magic", "late", "magic+late"])
def test_gemv_inner_loop_variants_match_the_reference(variant):
    """The 4-bit GEMV's inner-loop variants (nibbles to float by the 2^23 trick; one reduction at the end) give the
    default variant's result: INT4 (zero points, 10 groups of 32 over 2 steps of 8) and NF4 (double-quantized)."""
    torch.manual_seed(0)
    x = torch.randn(2, 320, device=DEVICE).to(torch.bfloat16)
    for group, nf4 in ((32, False), (64, True)):
        K = 320 if not nf4 else 256
        lin = nn.Linear(K, 24, bias=False)
        q = (NF4Linear.from_linear(lin) if nf4 else Int4Linear.from_linear(lin, group_size=group)).to(DEVICE)
        xs = x[:, :K].contiguous()
        parts = (q.codes, q.absmax, None, q.absmax_scale, q.absmax_mean) if nf4 else \
            (q.qweight, q.scale, q.zero, None, None)
        run = lambda tiles: qkernel._launch_q4(xs, *parts, 24, group, nf4, 256, "gemv", tiles)  # noqa: E731
        base, other = run((4, 8 * group, 4, 0, 0)), run((4, 8 * group, 4, *variant))
        _close(other, F.linear(xs.float(), q.weight.float()), 2e-2)
        assert (other.float() - base.float()).abs().max().item() <= 2e-2 * base.float().abs().max().item()
    q8 = Int8Linear.from_linear(nn.Linear(320, 24, bias=False)).to(DEVICE)  # INT8: codes offset into 0..255
    for magic in {variant[0], 2 * variant[0]}:  # magic=2: bytes shifted to bits 8-15, no subtract per weight
        got = qkernel._launch_int8(x, q8.qweight, q8.scale, "gemv", (4, 128, 4, magic))
        _close(got, F.linear(x.float(), q8.weight.float()), 2e-2)


@needs_triton
def test_layer_kernels_force_tiles_or_switch_the_kernels_off(kernels_on_cpu):
    """A layer's `QuantKernels` (what the engine sets from engine.kernels.quant / quant_gemv_tiles): forced GEMV
    tiles run (and verify) under their own name with the reference's result; `enabled=False` runs the reference."""
    from lmforge.infer.kernels.options import KernelOptions
    from lmforge.quant import QuantKernels, set_kernels

    layer = _layers(K=128, N=24)["int4 g32"].to(DEVICE)
    x = torch.randn(1, 128, device=DEVICE, dtype=torch.bfloat16)
    want = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    set_kernels(layer, KernelOptions(quant_gemv_tiles=(2, 64, 2)).quant_kernels())
    _close(layer(x), want, 2e-2)
    assert list(qkernel.kernel_status()) == [f"int4/32/gemv/2x64x2/bfloat16/{DEVICE.type}"]
    set_kernels(layer, QuantKernels(enabled=False))
    qkernel._status.clear()
    _close(layer(x), want, 2e-2)
    assert not qkernel.kernel_status()  # no kernel tried
    layer.to_layout("kn")  # the K-major tiles' full form: ..., atomic, magic, flat
    set_kernels(layer, KernelOptions(quant_gemv_tiles=(32, 32, 1, 2, 0, 0, 1)).quant_kernels())
    _close(layer(x), want, 2e-2)
    assert [k.removesuffix("/pdl") for k in qkernel.kernel_status()] == [  # PDL on Hopper (the engine's default)
        f"int4kn/32/gemv/32x32x1x2x0x0x1/bfloat16/{DEVICE.type}"]


@needs_triton
def test_one_kernel_split_k_leaves_its_workspace_zeroed_for_the_next_call(kernels_on_cpu):
    """atomic=2: the split that finishes a column block last writes the output and zeroes the persistent fp32 sums
    and counters behind it, so repeated calls (and another layer of the same shape) agree with the reference and
    with each other; the workspace is one per (device, shape)."""
    torch.manual_seed(0)
    layers = [Int4Linear.from_linear(nn.Linear(256, 40, bias=False), group_size=32).to(DEVICE) for _ in range(2)]
    x = torch.randn(2, 256, device=DEVICE).to(torch.bfloat16)
    tiles = (16, 32, 1, 2, 2, 2)  # 3 column blocks x 4 K splits per row
    qkernel._workspaces.clear()
    outs = []
    for layer in layers:
        layer.to_layout("kn")
    for layer in layers + layers:
        got = qkernel._launch_q4kn(x, layer.qweight, layer.scale, layer.zero, 40, 32, False, "gemv", tiles)
        _close(got, F.linear(x.float(), layer.weight.float()), 2e-2)
        outs.append(got)
    assert (outs[0].float() - outs[2].float()).abs().max().item() <= 2e-2 * outs[0].float().abs().max().item()
    (sums, counters), = qkernel._workspaces.values()
    assert sums.shape == (2, 40) and counters.shape == (2, 3)
    assert not sums.any() and not counters.any()


@pytest.mark.parametrize("tiles", [(256, 32, 2, 1, 1, 3, 0), (0, 32, 2), (256, 32, 2, -1), (256, 32, 2, 1, 3)])
def test_forced_tiles_outside_what_the_kernels_read_are_refused(tiles):
    """A switch the kernels would read as another value (magic 3 acting as 1) or a size of 0 is a config error."""
    import pydantic

    from lmforge.infer.kernels.options import KernelOptions

    with pytest.raises(pydantic.ValidationError, match="quant_gemv_tiles"):
        KernelOptions(quant_gemv_tiles=tiles)
    assert KernelOptions(quant_gemv_tiles=(256, 32, 2, 0, 1, 2, 0)).quant_gemv_tiles[5] == 2


@needs_triton
def test_failing_kernel_falls_back_to_reference_once(kernels_on_cpu, monkeypatch, caplog):
    layer = _layers(K=128, N=24)["int4 g32"].to(DEVICE)
    x = torch.randn(1, 128, device=DEVICE, dtype=torch.bfloat16)
    want = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    _close(layer(x), want, 2e-2)  # verified, then run
    key = next(iter(qkernel._status))

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(qkernel, "_launch_q4", broken)
    with caplog.at_level("WARNING", logger="lmforge.quant"):
        _close(layer(x), want, 2e-2)
        _close(layer(x), want, 2e-2)
    assert "launch failed" in qkernel._status[key]
    assert sum("failed" in r.message for r in caplog.records) == 1  # logged once, then the reference quietly

    monkeypatch.setattr(qkernel, "_status", {})  # a kernel that never builds is off after its check
    _close(layer(x), want, 2e-2)
    assert "RuntimeError" in qkernel._status[key]


@needs_triton
def test_wrong_kernel_is_caught_by_its_check(kernels_on_cpu, monkeypatch):
    """A kernel that runs but computes the wrong thing never serves a layer."""
    real = qkernel._launch_int8
    monkeypatch.setattr(qkernel, "_launch_int8", lambda *args: real(*args) * 1.5)
    layer = _layers(K=128, N=24)["int8"].to(DEVICE)
    x = torch.randn(1, 128, device=DEVICE, dtype=torch.bfloat16)
    _close(layer(x), F.linear(x.float(), layer.weight.float(), layer.bias.float()), 2e-2)
    assert "disagrees" in next(iter(qkernel._status.values()))


# ------------------------------------------------------------------------------------------------ engine packing


@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_engine_packs_quantized_projections_into_one_layer(layout):
    """pack_for_decode stacks q/k/v and gate/up of an INT4 model into one quantized layer each (one kernel launch),
    the originals viewing its buffers: same logits, same state_dict, and the engine's greedy tokens equal
    generate()'s. NF4 (blocks laid out across rows) keeps separate layers."""
    from lmforge.infer import SamplingParams, generate
    from lmforge.infer.kernels.decode_fusion import pack_for_decode
    from lmforge.infer import LLM, EngineConfig
    from lmforge.models import ModelConfig, Transformer
    from lmforge.quant import quantize_model

    def tiny() -> Transformer:
        torch.manual_seed(0)
        return Transformer(ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                                       max_seq_len=64)).eval()

    model = quantize_model(tiny(), "int4", group_size=32)
    for m in model.modules():  # "kn": as prepare_fast_path re-lays them on CUDA (packed along the outputs)
        if isinstance(m, Int4Linear):
            m.to_layout(layout)
    ids = torch.tensor([[5, 17, 300, 42, 9, 77]])
    with torch.no_grad():
        want = model(ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = ids[0].tolist()
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    ref_tokens = generate(model, [prompt], params)[0].token_ids
    done = pack_for_decode(model)
    n = len(model.layers)
    assert done["packed_qkv"] == n and done["packed_gate_up"] == n
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    assert attn.k_proj.qweight.untyped_storage().data_ptr() == attn.qkv.layer.qweight.untyped_storage().data_ptr()
    assert mlp.gate_up_down.layer.out_features == mlp.gate_proj.out_features + mlp.up_proj.out_features
    assert attn.qkv.layer.layout == layout
    with torch.no_grad():
        assert torch.allclose(model(ids), want, atol=1e-5, rtol=1e-5)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    llm = LLM(model, config=EngineConfig(num_blocks=32, max_model_len=64))
    assert llm.generate([prompt], params)[0].token_ids == ref_tokens

    if layout == "nk":
        nf4 = quantize_model(tiny(), "nf4")
        assert pack_for_decode(nf4)["packed_qkv"] == 0


@needs_triton
@pytest.mark.parametrize("method", ["int4", "int8"])
def test_fused_decode_blocks_fold_norms_gating_and_residuals_into_quantized_gemvs(method, kernels_on_cpu,
                                                                                   monkeypatch):
    """On a quantized model (INT4 K-major as on CUDA, INT8) packing installs a FusedDecodeBlock on every block: its
    one-row forward runs the quantized GEMVs with the RMSNorm (qkv, gate/up), the residual add (o, down) and the
    SwiGLU gating (down) folded in, each fused variant verified against torch ops before first use, and gives the
    blocks' own forward; prefill rows still take the blocks' forward. The fused forms have no backward."""
    from lmforge.infer.kernels.decode_fusion import FusedDecodeBlock, pack_for_decode
    from lmforge.infer.kernels.options import KernelOptions
    from lmforge.models import ModelConfig, Transformer
    from lmforge.quant import quantize_model, set_kernels

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                                    max_seq_len=64, qkv_bias=True)).to(DEVICE, torch.bfloat16).eval()
    quantize_model(model, method, group_size=32)
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.to_layout("kn")
    if method == "int8":  # few, large programs: what the interpreter runs fastest
        set_kernels(model, KernelOptions(quant_gemv_tiles=(64, 1024, 4, 1)).quant_kernels())
    ids = torch.tensor([[5, 17, 30, 42]], device=DEVICE)
    calls = []
    call = FusedDecodeBlock.decode_row
    monkeypatch.setattr(FusedDecodeBlock, "decode_row", lambda self, *a: calls.append(1) or call(self, *a))
    with torch.inference_mode():
        done = pack_for_decode(model, KernelOptions(cpu_interpreter=True))
        assert done["fused_blocks"] == 2 and "unfused_blocks" not in done
        fused = [model(ids[:, i:i + 1]).float() for i in range(2)]  # one row each (no cache: the same positions)
        assert len(calls) == 4
        model(ids)  # four rows: the blocks' own forward
        assert len(calls) == 4
        installed = list(model.layers)
        for i, b in enumerate(installed):
            model.layers[i] = b.block
        want = [model(ids[:, i:i + 1]).float() for i in range(2)]
    for got, ref in zip(fused, want):
        _close(got, ref, 3e-2)
        assert got.argmax(-1).eq(ref.argmax(-1)).float().mean() >= 0.5
    fmt = "int4kn" if method == "int4" else "int8"
    verified = {part for k, v in qkernel.kernel_status().items() if v is True and k.startswith(fmt)
                for part in k.split("/") if set(part.split("+")) <= {"norm", "silu", "bias", "res"}}
    assert {"norm+bias", "res", "silu+res"} <= verified, qkernel.kernel_status()
    layer = installed[0].mlp.down_proj
    x = torch.randn(1, 256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="no backward"):
        layer.fused(x, silu=True, residual=torch.zeros(1, 64, device=DEVICE, dtype=torch.bfloat16)).sum().backward()


@needs_triton
def test_fused_gemv_variants_equal_the_separate_ops():
    """Every GEMV inner loop with the decode fusions in the kernel (K-major INT4: one-kernel split-K, whole K with
    plain / in-place / shifted-pair nibbles, flat tiles; NF4 pair table; INT8 plain / in place / shifted bytes) and
    the split-K forms whose sums meet outside the kernel (fusions by torch ops) against the separate ops: RMSNorm or
    SwiGLU gating, matmul, bias, residual."""
    g = torch.Generator(DEVICE).manual_seed(0)
    K, N = 256, 40
    x0 = torch.randn(2, K, generator=g, device=DEVICE).to(torch.bfloat16)
    (xn, norm), (xs, silu) = (qkernel._probe_fuse(f, x0, N, g) for f in ("norm+bias", "silu+res"))
    torch.manual_seed(0)
    i4 = Int4Linear.from_linear(nn.Linear(K, N, bias=False), group_size=32).to(DEVICE)
    n4 = NF4Linear.from_linear(nn.Linear(K, N, bias=False)).to(DEVICE)
    q8 = Int8Linear.from_linear(nn.Linear(K, N, bias=False)).to(DEVICE)
    weights = {id(m): m.weight.float() for m in (i4, n4, q8)}
    i4.to_layout("kn")
    n4.to_layout("kn")
    for i, tiles in enumerate([(16, 32, 1, 2, 2, 2), (16, 32, 1, 0, 0, 0), (16, 32, 1, 0, 0, 1), (16, 32, 1, 0, 0, 2),
                               (16, 32, 1, 0, 0, 0, 1), (16, 32, 1, 2, 1, 2), (16, 32, 1, 2, 2, 1)]):
        x, fuse = (xn, norm) if i % 2 else (xs, silu)  # each fusion over every other loop
        for layer, got in ((i4, qkernel._launch_q4kn(x, i4.qweight, i4.scale, i4.zero, N, 32, False, "gemv", tiles,
                                                     fuse=fuse)),
                           (n4, qkernel._launch_q4kn(x, n4.codes, n4.absmax, None, N, 64, True, "gemv", tiles,
                                                     n4.absmax_scale, n4.absmax_mean, 256, fuse))):
            _close(got, qkernel._unfused(lambda a: F.linear(a.float(), weights[id(layer)]), x, fuse), 2e-2)
    for magic, (x, fuse) in zip((0, 1, 2), ((xn, norm), (xs, silu), (xn, norm))):
        got = qkernel._launch_int8(x, q8.qweight, q8.scale, "gemv", (4, 128, 4, magic), fuse)
        _close(got, qkernel._unfused(lambda a: F.linear(a.float(), weights[id(q8)]), x, fuse), 2e-2)


@needs_triton
def test_k_major_nf4_layers_pack_and_fuse_with_a_mean_per_dq_block(kernels_on_cpu):
    """K-major NF4 q/k/v pack into one layer (codes and absmax side by side, the originals viewing them; each layer's
    double-quantization mean once per dq block): its fused GEMV (RMSNorm folded in, bias added) equals the three
    layers' outputs side by side, and a model of such layers gets fused decode blocks. Row-layout NF4 and block
    counts that are not whole dq blocks do not pack."""
    from lmforge.infer.kernels.decode_fusion import pack_for_decode
    from lmforge.models import ModelConfig, Transformer
    from lmforge.quant import quantize_model

    torch.manual_seed(0)
    layers = [NF4Linear.from_linear(nn.Linear(128, n), dq_block_size=128).to(DEVICE) for n in (256, 128, 128)]
    assert NF4Linear.pack(layers) is None  # the row layout
    for m in layers:
        m.to_layout("kn")
    x = torch.randn(1, 128, device=DEVICE).to(torch.bfloat16)
    norm = (torch.rand(128, device=DEVICE).to(torch.bfloat16) + 0.5, 1e-5, 0.0)
    want = torch.cat([m.fused(x, norm=norm) for m in layers], -1)
    packed = NF4Linear.pack(layers)
    assert packed.absmax_mean.shape == (8,) and len(set(packed.absmax_mean.tolist())) == 3  # 4 + 2 + 2 dq blocks
    assert layers[1].codes.untyped_storage().data_ptr() == packed.codes.untyped_storage().data_ptr()
    _close(packed.fused(x, norm=norm), want, 2e-2)
    _close(packed(x), torch.cat([m(x) for m in layers], -1), 2e-2)
    assert any("dq-means" in k and "norm+bias" in k and v is True for k, v in qkernel.kernel_status().items())
    odd = [NF4Linear.from_linear(nn.Linear(128, n)).to(DEVICE) for n in (64, 64)]  # 128 blocks: half a dq block
    for m in odd:
        m.to_layout("kn")
    assert NF4Linear.pack(odd) is None
    model = Transformer(ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256,
                                    max_seq_len=64)).to(DEVICE, torch.bfloat16).eval()
    quantize_model(model, "nf4")
    for m in model.modules():
        if isinstance(m, NF4Linear):
            m.to_layout("kn")
    done = pack_for_decode(model)
    assert done["packed_qkv"] == done["packed_gate_up"] == done["fused_blocks"] == 2


# ------------------------------------------------------------------------------------------------ K-major INT4


@pytest.mark.parametrize("name", ["int4 g32", "nf4", "nf4 fp32 absmax"])
def test_k_major_layout_is_lossless_and_checkpoints_keep_the_row_layout(name):
    """`to_layout("kn")` re-lays a layer's buffers in place (codes int32 (K / 8, N); INT4's scale/zero and NF4's
    absmax (groups, N)) and back bit for bit; `weight` and `state_dict()` do not change, forward stays within
    rounding, and loading a checkpoint into a K-major layer reads the row layout. The int32 words are GPTQ's
    order: input column 8i + j in bits 4j..4j+3."""
    layer = _layers(K=256, N=72)[name]
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 256)
    want, w = layer(x), layer.weight
    layer.to_layout("kn")
    words = layer.qweight if name.startswith("int4") else layer.codes
    assert words.dtype == torch.int32 and words.shape == (32, 72)
    if name.startswith("int4"):
        assert layer.scale.shape == (8, 72)
        assert torch.equal(((words[1, 5] >> 12) & 15).to(torch.uint8), layer.codes()[5, 8 + 3])
    else:
        assert layer.absmax.shape == (4, 72)
    assert torch.equal(layer.weight, w)
    _close(layer(x), want, 1e-5)
    after = layer.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    layer.load_state_dict(state)
    assert layer.layout == "nk" and all(torch.equal(t, state[k]) for k, t in layer.state_dict().items())
    layer.to_layout("kn")
    layer.to_layout("nk")
    assert all(torch.equal(t, state[k]) for k, t in layer.state_dict().items())


def test_k_major_ops_match_reference_and_give_input_gradients():
    layers = _layers(K=128, N=48)
    for name in ("int4 g32", "nf4"):
        layer = layers[name]
        w = layer.weight.float()
        layer.to_layout("kn")
        x = torch.randn(3, 128, requires_grad=True)
        args = (x, layer.qweight, layer.scale, layer.zero, 32) if name == "int4 g32" else \
            (x, layer.codes, layer.absmax, layer.absmax_scale, layer.absmax_mean, 64, 256)
        op = qkernel.int4kn_linear if name == "int4 g32" else qkernel.nf4kn_linear
        y = op(*args)
        assert (y - F.linear(x, w)).abs().max().item() < 1e-4, name
        dy = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, dy)
        assert (gx - dy @ w).abs().max().item() < 1e-4, name
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@needs_triton
@pytest.mark.parametrize("rows,tiles", [(1, None), (3, (64, 32, 1, 1)), (3, (64, 32, 1, 2, 1)),
                                       (2, (32, 64, 2, 0, 0, 1)), (1, (32, 32, 1, 2, 0, 0, 1)),
                                       (2, (64, 32, 2, 0, 0, 1, 1)), (3, (64, 32, 1, 1, 1, 2)),
                                       (2, (32, 64, 2, 0, 0, 2)), (3, (64, 32, 1, 1, 2, 2)), (20, None), (300, None)],
                         ids=["gemv-default", "gemv-split-k", "gemv-split-k-atomic", "gemv-whole-k-magic-pairs",
                              "gemv-flat", "gemv-flat-magic", "gemv-shifted-pairs-atomic", "gemv-whole-k-shifted-pairs",
                              "gemv-one-kernel-split-k", "gemm", "dequant"])
def test_k_major_kernels_match_dequantize_then_linear(rows, tiles, kernels_on_cpu):
    """The K-major GEMV (its default tiles; K split over programs whose partial sums one more kernel adds, or that
    add atomically into fp32; all of K in one program, INT4 by the exponent trick and NF4 by the level-pair table;
    two-dimensional "flat" tiles; INT4's shifted nibble pairs, magic=2, whose NF4 byte permutes fall back to the pair
    table off CUDA; atomic=2: one kernel, the last split of each column block writing the output), the GEMM (NF4's
    batched rows: one dequantizing pass, then a matmul) and the long inputs' dequantizing pass on a layer's K-major
    buffers: N = 72; INT4 K = 320 (10 groups of 32) and K = 256 in groups of 128; NF4 K = 320 (blocks of 64,
    double-quantized absmax spanning rows, and fp32 absmax)."""
    from lmforge.quant import QuantKernels, set_kernels

    dtype = torch.bfloat16 if rows <= qkernel.GEMV_MAX_ROWS or DEVICE.type == "cuda" else torch.float16
    cases = [Int4Linear.from_linear(nn.Linear(K, 72), group_size=group) for K, group in ((320, 32), (256, 128))]
    cases += [NF4Linear.from_linear(nn.Linear(320, 72), double_quant=dq) for dq in (True, False)]
    for layer in cases:
        K = layer.in_features
        layer = layer.to(DEVICE)
        want = layer.weight.float()
        layer.to_layout("kn")
        set_kernels(layer, QuantKernels(gemv_tiles=tiles))
        x = torch.randn(rows, K, device=DEVICE).to(dtype)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (rows, 72)
        _close(y, F.linear(x.float(), want, layer.bias.float()), 2e-2)
    status = qkernel.kernel_status()
    assert len(status) == 4 and all(v is True for v in status.values()), status
    assert {k.split("/")[0] for k in status} == {"int4kn", "nf4kn"}
    for k in status:
        fmt = k.split("/")[0]
        path = "gemv" if rows <= qkernel.GEMV_MAX_ROWS else "gemm" if rows <= qkernel.GEMM_MAX_ROWS and \
            fmt not in qkernel.DEQUANT_GEMM else "dequant"
        assert f"/{path}/" in k, (k, path)


@needs_triton
def test_k_major_gemm_split_over_k_matches_the_reference():
    """The GEMM with K split over programs (what narrow layers get at batched decode), partial sums added by the
    reduction kernel: INT4 (K = 320, groups of 32 in 5 splits; nibbles by conversion and by the exponent trick, code
    words loaded per row or once, and each word straight to 16-bit weights, magic=2) and double-quantized NF4
    (K = 256, 2 splits; the level table, and magic=2's words to 16-bit weights)."""
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
    x = torch.randn(20, 320, device=DEVICE).to(dtype)
    q = Int4Linear.from_linear(nn.Linear(320, 72, bias=False), group_size=32).to(DEVICE)
    want = F.linear(x.float(), q.weight.float())
    q.to_layout("kn")
    for magic, words in ((0, 0), (1, 0), (1, 1)):  # words: each code word loaded once, unpacked by a reshape
        got = qkernel._launch_q4kn(x, q.qweight, q.scale, q.zero, 72, 32, False, "gemm",
                                   (16, 32, 32, 4, 5, magic, words))
        _close(got, want, 2e-2)
    # magic=2: each word to its 8 weights in the input's dtype (scales in that dtype too), joined into the tile in
    # input-column order; the same weights as the fp32 path rounds, so the same sums as magic=1 on the same layer
    h = Int4Linear.from_linear(nn.Linear(320, 72, bias=False).to(dtype), group_size=32).to(DEVICE)
    h.to_layout("kn")
    assert h.scale.dtype == dtype and qkernel._gemm_magic(2, False, 1, h.scale, x) == 2
    one, two = (qkernel._launch_q4kn(x, h.qweight, h.scale, h.zero, 72, 32, False, "gemm", (16, 32, 32, 4, 5, m, 1))
                for m in (1, 2))
    _close(two, F.linear(x.float(), h.weight.float()), 2e-2)
    assert torch.equal(one, two)
    n = NF4Linear.from_linear(nn.Linear(256, 72, bias=False)).to(DEVICE)
    want = F.linear(x[:, :256].float(), n.weight.float())
    n.to_layout("kn")
    got = qkernel._launch_q4kn(x[:, :256].contiguous(), n.codes, n.absmax, None, 72, 64, True, "gemm",
                               (16, 64, 64, 4, 2), n.absmax_scale, n.absmax_mean, 256)
    _close(got, want, 2e-2)
    one, two = (qkernel._launch_q4kn(x[:, :256].contiguous(), n.codes, n.absmax, None, 72, 64, True, "gemm",
                                     (16, 64, 64, 4, 2, m, 1), n.absmax_scale, n.absmax_mean, 256) for m in (1, 2))
    _close(two, want, 2e-2)  # NF4 magic=2: the level pairs by byte permutes on CUDA, the level table elsewhere
    assert qkernel._gemm_magic(2, True, 1, n.absmax, x) == 2 and (DEVICE.type == "cuda" or torch.equal(one, two))


@needs_triton
def test_int8_gemm_split_over_k_matches_the_reference():
    """INT8's GEMM with K split over programs (down-projection-like shapes at batched decode): forced 3 splits of
    K = 384, and by shape."""
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
    q = Int8Linear.from_linear(nn.Linear(384, 40, bias=False)).to(DEVICE)
    x = torch.randn(20, 384, device=DEVICE).to(dtype)
    want = F.linear(x.float(), q.weight.float())
    for tiles in ((16, 32, 3), (16, 32)):
        _close(qkernel._launch_int8(x, q.qweight, q.scale, "gemm", tiles), want, 2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_half2_dequantization_is_exact_where_the_fp32_path_rounds(dtype):
    """The INT4 GEMM's magic=2 words (inline PTX on CUDA), replayed step by step: a nibble masked under the exponent
    of m (bf16 128, fp16 1024) reads m + q exactly, adding -(m + z) leaves q - z exactly, and the one rounded multiply
    by the scale gives ((q - z) * s) rounded from fp32, for every code, zero point and nibble position."""
    m, bits = (128.0, 0x4300) if dtype == torch.bfloat16 else (1024.0, 0x6400)
    q = torch.arange(16, dtype=torch.int32)
    lane = (q | bits).to(torch.int16).view(dtype)  # one half of `lop3 (t & 0x000F000F) | magic`
    assert torch.equal(lane.float(), q.float() + m)
    z = torch.arange(16, dtype=torch.float32)[:, None]
    diff = lane[None, :] + (-(z + m)).to(dtype)  # 16-bit add, rounded once: exact
    assert torch.equal(diff.float(), q.float()[None, :] - z)
    s = (torch.rand(64, generator=torch.Generator().manual_seed(0)) * 0.05 + 1e-3).to(dtype)
    got = diff[None] * s[:, None, None]  # 16-bit multiply, rounded once
    assert torch.equal(got, (diff.float()[None] * s.float()[:, None, None]).to(dtype))
    asm = qkernel._kernels()._q4_half2_asm(dtype == torch.bfloat16)
    assert [f"shr.u32 t, $8, {4 * j};" in asm for j in range(4)] == [True] * 4 and asm.count("lop3.b32") == 4
    assert asm.count("fma.rn.") == 8 and all(f"mov.b32 {{${j}, ${j + 4}}}, v{j};" in asm for j in range(4))


def _prmt(a: int, b: int, c: int) -> int:
    """PTX prmt.b32 (default mode): byte k of the result is byte c[4k + 2 : 4k] of the 8 bytes {b, a}."""
    src = a | (b << 32)
    return sum(((src >> (8 * ((c >> (4 * k)) & 7))) & 0xFF) << (8 * k) for k in range(4))


def test_nf4_byte_permute_tables_decode_every_code_word_to_the_bf16_levels():
    """The NF4 GEMV's register lookup (magic=2, inline PTX on CUDA), replayed instruction by instruction on its
    tables: every code in every nibble position of a word decodes to bf16(NF4_LEVELS[code]) as fp32 bits; the GEMM's
    level pairs (the permutes before the shifts) are the bf16 / fp16 levels of the word's nibbles 2i, 2i + 1."""
    from lmforge.quant.qkernel_triton import nf4_prmt_tables

    (h0, h1, h2, h3), (l0, l1, l2, l3) = nf4_prmt_tables()
    want = NF4_LEVELS.to(torch.bfloat16).float().view(torch.int32).tolist()
    for dtype in (torch.bfloat16, torch.float16):
        (a0, a1, a2, a3), (b0, b1, b2, b3) = nf4_prmt_tables(dtype)
        bits = [b & 0xFFFF for b in NF4_LEVELS.to(dtype).view(torch.int16).tolist()]
        for half in (0x3210, 0x7654, 0xBA98, 0xFEDC, 0x9F1E):
            s7, sb = half & 0x7777, ((half >> 1) & 0x4444) | 0x3210
            hb = _prmt(_prmt(a0, a1, s7), _prmt(a2, a3, s7), sb)
            lb = _prmt(_prmt(b0, b1, s7), _prmt(b2, b3, s7), sb)
            pairs = [_prmt(lb, hb, sel) for sel in (0x5140, 0x7362)]
            codes = [(half >> (4 * j)) & 15 for j in range(4)]
            assert pairs == [bits[codes[0]] | bits[codes[1]] << 16, bits[codes[2]] | bits[codes[3]] << 16]
    g = torch.Generator().manual_seed(0)
    words = [sum(c << (4 * j) for j, c in enumerate(torch.randint(0, 16, (8,), generator=g).tolist()))
             for _ in range(64)] + [int("76543210", 16), int("fedcba98", 16)]
    for w in words:
        got = []
        for half in (w & 0xFFFF, w >> 16):
            s7, sb = half & 0x7777, ((half >> 1) & 0x4444) | 0x3210
            hb = _prmt(_prmt(h0, h1, s7), _prmt(h2, h3, s7), sb)
            lb = _prmt(_prmt(l0, l1, s7), _prmt(l2, l3, s7), sb)
            for sel in (0x5140, 0x7362):
                p = _prmt(lb, hb, sel)
                got += [(p << 16) & 0xFFFFFFFF, p & 0xFFFF0000]
        codes = [(w >> (4 * j)) & 15 for j in range(8)]
        assert [v & 0xFFFFFFFF for v in (want[c] for c in codes)] == got, hex(w)
    kt = qkernel._kernels()  # the kernel hands the PTX these tables (as int32) and spells the same steps
    assert [kt.NF4_H0, kt.NF4_H1, kt.NF4_H2, kt.NF4_H3, kt.NF4_L0, kt.NF4_L1, kt.NF4_L2, kt.NF4_L3] == \
        [t - (1 << 32) if t >= 1 << 31 else t for t in (h0, h1, h2, h3, l0, l1, l2, l3)]
    assert kt.NF4_PRMT_ASM.value.count("prmt.b32") == 16
    assert all(a.value.count("prmt.b32") == 16 and a.value.count("fma.rn.") == 4
               for a in (kt.NF4_BF16X2_ASM, kt.NF4_F16X2_ASM))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nf4_byte_permute_gemv_matches_the_reference_on_cuda():
    """The K-major NF4 GEMV with magic=2 (levels by byte permutes, inline PTX) against dequantize-then-matmul."""
    x = torch.randn(1, 320, device="cuda", dtype=torch.bfloat16)
    for dq in (True, False):
        n = NF4Linear.from_linear(nn.Linear(320, 72, bias=False), double_quant=dq).cuda()
        want = F.linear(x.float(), n.weight.float())
        n.to_layout("kn")
        for tiles in ((64, 64, 2, 1, 1, 2), (32, 64, 2, 0, 0, 2)):
            got = qkernel._launch_q4kn(x, n.codes, n.absmax, None, 72, 64, True, "gemv", tiles, n.absmax_scale,
                                       n.absmax_mean, 256)
            _close(got, want, 2e-2)


def test_in_register_variants_compile_for_an_h100_without_int_to_float_conversions():
    """bench/qkernel_sass.py builds the GEMVs for sm_90 here (Triton's bundled ptxas, no GPU; a subprocess, since the
    tests run Triton as its interpreter) and counts machine instructions per weight: the in-place unpacking (INT4 and
    INT8 magic=1), INT4's shifted nibble pairs (magic=2) and NF4's byte permutes (magic=2, inline PTX) assemble; the
    INT4 / INT8 ones issue no int-to-float conversion where the plain loops issue one per weight, and INT4's pairs
    drop magic=1's float subtract per weight. The INT4 GEMM's K loop (--gemm) with code words to 16-bit pairs
    (magic=2) issues no conversion and under 0.6x the plain loop's instructions, with its tensor-core tiles."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    if not (pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("Triton's CUDA tools are not bundled here")
    root = pathlib.Path(__file__).parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(root / "bench" / "qkernel_sass.py")], env=env, capture_output=True,
                         text=True, timeout=600, check=True).stdout
    rows = {(r["format"], tuple(r["tiles"])): r for r in map(json.loads, out.splitlines())}
    plain, magic = rows["int4kn", (256, 32, 2, 1, 1, 0, 0)], rows["int4kn", (256, 32, 2, 1, 1, 1, 0)]
    assert plain["conversions_per_weight"] >= 1 > 0.1 >= magic["conversions_per_weight"]
    assert magic["instructions_per_weight"] < plain["instructions_per_weight"]
    pairs = rows["int4kn", (256, 32, 2, 1, 1, 2, 0)]  # magic=2: no float subtract per weight, fewer instructions
    assert pairs["conversions_per_weight"] < 0.1 and pairs["top"].get("FADD", 0) < 0.5 < magic["top"]["FADD"]
    assert pairs["instructions_per_weight"] < magic["instructions_per_weight"]
    assert rows["int8", (8, 1024, 4, 0)]["conversions_per_weight"] >= 0.9 > 0.1 > \
        max(rows["int8", (8, 1024, 4, m)]["conversions_per_weight"] for m in (1, 2))
    prmt = rows["nf4kn", (256, 32, 2, 1, 1, 2, 0)]
    assert prmt["top"].get("PRMT", 0) >= 2 and prmt["spill_stack"] == 0  # 16 permutes per code word of 8 weights
    out = subprocess.run([sys.executable, str(root / "bench" / "qkernel_sass.py"), "--gemm"], env=env,
                         capture_output=True, text=True, timeout=600, check=True).stdout
    gemm = {tuple(r["tiles"]): r for r in map(json.loads, out.splitlines())}  # the INT4 GEMM's K loop at 64 rows
    plain, pairs = gemm[64, 128, 128, 4, 2, 0], gemm[64, 128, 128, 4, 2, 2]
    assert plain["conversions_per_weight"] >= 1 > 0.1 > pairs["conversions_per_weight"]
    assert pairs["instructions_per_weight"] < 0.6 * plain["instructions_per_weight"]
    assert all(r["mma"] > 0 for r in gemm.values())  # still tensor-core tiles
