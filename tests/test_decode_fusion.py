"""Fast decode paths (`lmforge.infer.kernels.decode_fusion`, `lmforge.infer.kernels.gemv`): packed q/k/v and gate/up matmuls compute
what the separate projections did, with no second copy of the weights; the Triton GEMV equals `F.linear`; LoRA
adapters added after packing still apply. The GEMV kernel runs in Triton's CPU interpreter here (compiled on CUDA:
the `gpu` test)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F


from lmforge.infer import SamplingParams, generate  # noqa: E402
from lmforge.infer.kernels import gemv  # noqa: E402
from lmforge.infer.kernels.decode_fusion import (  # noqa: E402
    DecodeLinear, FusedDecodeBlock, PackedQKV, pack_for_decode, unpack_for_decode)
from lmforge.models.transformer import GatedProjections, QKVProjection, TiedHead  # noqa: E402
from lmforge.infer.kernels.options import KernelOptions  # noqa: E402
from lmforge.infer import LLM, EngineConfig  # noqa: E402
from lmforge.models import load_hf  # noqa: E402
from lmforge.testing import make_tiny_checkpoint  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)


def _kernel_runs() -> bool:
    return gemv.gemv_available(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


needs_kernel = pytest.mark.skipif(not _kernel_runs(), reason="needs triton (CUDA, or its CPU interpreter)")


# off CUDA the kernels never take CPU rows unless asked to (by the interpreter): these tests ask for it
KERNELS = KernelOptions(cpu_interpreter=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("fusion") / "tiny")


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(2, 20))] for _ in range(n)]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,bias", [(37, 96, True), (64, 128, False), (5, 1024, True)])
def test_gemv_kernel_equals_linear(dtype, N, K, bias):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(N * K)
    w = torch.randn(N, K, generator=g).to(device, dtype)
    b = torch.randn(N, generator=g).to(device, dtype) if bias else None
    for x in (torch.randn(K, generator=g), torch.randn(1, 1, K, generator=g)):  # a vector and a (B=1, T=1) row
        x = x.to(device, dtype)
        assert gemv.use_gemv(x, w, KERNELS)
        got = gemv.linear(x, w, b, KERNELS)
        want = F.linear(x.float(), w.float(), None if b is None else b.float())
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=2e-2 * K ** 0.5 / 8, rtol=1e-2)


@needs_kernel
def test_gemv_silu_mul_equals_swiglu_down_projection():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    K, N = 96, 40
    gate_up = torch.randn(1, 1, 2 * K, generator=g).to(device, torch.bfloat16)
    w = torch.randn(N, K, generator=g).to(device, torch.bfloat16)
    gate, up = gate_up.split(K, -1)
    want = F.linear((F.silu(gate) * up).float(), w.float())
    got = gemv.gemv_silu_mul(gate_up, w)
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=2e-2)


@needs_kernel
def test_bf16_decode_step_through_the_kernels_matches_unpacked(ckpt):
    """A one-token forward of a packed bf16 model (packed q/k/v GEMV, GEMV + SiLU-mul down projection, GEMV LM
    head) against the same model with plain nn.Linear / F.linear."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_hf(ckpt, progress=False, dtype=torch.bfloat16, device=device)
    tokens = torch.tensor([[7]], device=device)
    with torch.inference_mode():
        want = model(tokens).float()
        pack_for_decode(model, KERNELS)
        got = model(tokens).float()
        unpack_for_decode(model, keep_gemv=False)
        assert type(model.layers[0].attn.o_proj) is torch.nn.Linear and type(model.tied_head) is TiedHead
        again = model(tokens).float()
    torch.testing.assert_close(again, want)
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_gemv_routing_leaves_everything_else_to_linear():
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    assert not gemv.use_gemv(torch.randn(2, 16, dtype=torch.bfloat16), w, KERNELS)  # two rows: a GEMM
    assert not gemv.use_gemv(torch.randn(1, 16), w, KERNELS)  # dtype mismatch
    assert not gemv.use_gemv(torch.randn(1, 8, dtype=torch.bfloat16), w.t(), KERNELS)  # not contiguous
    assert not gemv.use_gemv(torch.randn(1, 16), torch.randn(8, 16), KERNELS)  # fp32 weights stay on F.linear
    x = torch.randn(3, 16)
    torch.testing.assert_close(gemv.linear(x, w.float(), options=KERNELS), F.linear(x, w.float()))


def test_packing_keeps_logits_state_dict_and_memory(ckpt, tmp_path):
    model = load_hf(ckpt, progress=False)
    tokens = torch.tensor([_prompts(1, seed=3)[0]])
    before = model(tokens)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    storage = sum(p.untyped_storage().nbytes() for p in {p.untyped_storage().data_ptr(): p
                                                         for p in model.parameters()}.values())
    done = pack_for_decode(model, KERNELS)
    n = model.cfg.n_layers
    assert done["packed_qkv"] == n and done["packed_gate_up"] == n and done["gemv_linears"] >= 2 * n
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    assert type(attn.o_proj) is DecodeLinear and isinstance(attn.o_proj, torch.nn.Linear)
    assert attn.q_proj.weight.data_ptr() == attn.qkv.weight.data_ptr()  # the originals view the pack
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.qkv.weight.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_up_down.weight.untyped_storage().data_ptr()
    after_storage = sum(p.untyped_storage().nbytes() for p in {p.untyped_storage().data_ptr(): p
                                                               for p in model.parameters()}.values())
    assert after_storage == storage  # no second copy of any weight
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(tokens), before, atol=1e-5, rtol=1e-5)
    from lmforge.models.hf import save_hf

    save_hf(model, tmp_path / "saved")  # the sliced parameters save as ordinary tensors
    torch.testing.assert_close(load_hf(tmp_path / "saved", progress=False)(tokens), before, atol=1e-5, rtol=1e-5)
    unpack_for_decode(model)
    assert type(attn.qkv) is QKVProjection and type(mlp.gate_up_down) is GatedProjections
    torch.testing.assert_close(model(tokens), before, atol=1e-5, rtol=1e-5)


def test_engine_output_unchanged_and_adapter_added_after_packing_applies(ckpt, tmp_path):
    from lmforge.peft.lora import LoraConfig, apply_lora, lora_layers
    from lmforge.peft.peft_format import load_peft_adapter, save_peft_adapter

    m = load_hf(ckpt, progress=False)
    cfg = LoraConfig(r=4, alpha=8, target_modules=["k_proj", "up_proj"])
    apply_lora(m, cfg)
    torch.manual_seed(0)
    for layer in lora_layers(m).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    adapter = str(save_peft_adapter(m, cfg, tmp_path / "ad"))
    prompts = _prompts(5)
    base = load_hf(ckpt, progress=False)
    want = [r.token_ids for r in generate(base, prompts, GREEDY)]
    load_peft_adapter(base, adapter)
    want_lora = [r.token_ids for r in generate(base, prompts, GREEDY)]
    assert want_lora != want

    served = load_hf(ckpt, progress=False)
    llm = LLM(served, config=EngineConfig(block_size=4, num_blocks=128, decode_steps=3))
    assert isinstance(served.layers[0].attn.qkv, PackedQKV)  # fast_decode is on by default
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == want
    llm.engine.add_adapter("ad", adapter)
    assert type(served.layers[0].attn.qkv) is QKVProjection
    assert type(served.layers[0].mlp.gate_up_down) is GatedProjections
    out = llm.generate(prompts + prompts, GREEDY, adapter=["ad"] * 5 + [None] * 5)
    assert [o.token_ids for o in out] == want_lora + want


@pytest.mark.parametrize("attention", ["gather", "kernel"])
def test_compiled_static_decode_matches_generate(ckpt, attention):
    """engine.compile: the decode step (and its batch construction) under torch.compile, replayed from the static
    buffers as a CUDA graph would be; the kernel path runs the in-place `lmforge::paged_decode` op."""
    if attention == "kernel" and not _kernel_runs():
        pytest.skip("needs triton (CUDA, or its CPU interpreter)")
    model = load_hf(ckpt, progress=False, device="cuda" if torch.cuda.is_available() else "cpu")
    prompts = _prompts(4, seed=5)
    want = [r.token_ids for r in generate(model, prompts, GREEDY)]
    llm = LLM(model, config=EngineConfig(block_size=4, num_blocks=64, decode_steps=3, compile=True,
                                         attention=attention))
    llm.engine.runner.enable_static_decode()
    assert llm.engine.runner.paged_kernel == (attention == "kernel")
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == want
    assert llm.engine.runner.graphs


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_rotates_q_and_k_like_apply_rope(dtype):
    """`lmforge::paged_decode` with cos/sin (RoPE fused into the K/V write and the query load) = rotating q/k with
    `apply_rope` first: same output, same keys written to the pool."""
    from lmforge.infer.kernels.paged_attention import paged_decode
    from lmforge.models.positions import apply_rope, rope_cos_sin

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D, bs, L = 3, 8, 2, 32, 4, 2
    lens = torch.tensor([5, 1, 11])  # keys per row, the new one included
    tables = torch.tensor([[1, 2, 3], [4, 0, 0], [5, 6, 7]])
    slots = torch.tensor([tables[i, (n - 1) // bs] * bs + (n - 1) % bs for i, n in enumerate(lens.tolist())])
    pools = [torch.randn(L, 8 * bs, Hkv, D, generator=g).to(device, dtype) for _ in range(2)]
    q = torch.randn(B, H, 1, D, generator=g).to(device, dtype)
    k, v = (torch.randn(B, Hkv, 1, D, generator=g).to(device, dtype) for _ in range(2))
    positions = (lens - 1)[:, None].to(device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
    cos, sin = rope_cos_sin(positions, inv_freq, dtype)  # (B, 1, 1, D/2)
    args = (tables.to(device), lens.to(device), bs, 12, 0)
    want_pools = [p.clone() for p in pools]
    want = paged_decode(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, *want_pools, 1, slots.to(device), *args)
    got = paged_decode(q, k, v, *pools, 1, slots.to(device), *args, cos.reshape(B, -1), sin.reshape(B, -1))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(pools[0], want_pools[0], **tol)  # rotated keys written
    torch.testing.assert_close(pools[1], want_pools[1])  # values untouched by RoPE
    torch.testing.assert_close(got, want, **tol)



@needs_kernel
@pytest.mark.parametrize("window,splits", [(0, None), (50, None), (0, 2)])
def test_paged_decode_writes_kv_and_merges_splits_in_one_launch(window, splits, monkeypatch):
    """The decode op over a context split across programs (new K/V written by the program holding the last
    position, partials merged by the last program to arrive) = writing K/V by hand, then one-split attention;
    twice in a row, since the arrival counters must be zero again after each launch. Two splits of 128 keys put
    row 0's newest key in its split's second chunk (the chunk loop), one split per chunk in the first (the chunk
    loaded before the kernel waits, where the pool still holds an old key at that slot)."""
    from lmforge.infer.kernels import paged_attention
    from lmforge.infer.kernels.paged_attention import choose_splits, paged_decode, paged_decode_attention

    if splits:
        monkeypatch.setattr(paged_attention, "choose_splits", lambda *a, **k: splits)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, D, bs, L, C = 4, 8, 2, 32, 8, 2, 256
    lens = torch.tensor([200, 1, 0, 131])  # keys per row (new one included); 0 = a padding row
    tables = (torch.randperm(4 * C // bs, generator=g)[:B * C // bs] + 1).view(B, C // bs)
    slots = torch.tensor([tables[i, (n - 1) // bs] * bs + (n - 1) % bs if n else 0
                          for i, n in enumerate(lens.tolist())])
    assert choose_splits(B, Hkv, C) > 1
    pools = [torch.randn(L, 5 * C, Hkv, D, generator=g).to(device) for _ in range(2)]
    args = (tables.to(device), lens.to(device), bs, C, window)
    for _ in range(2):
        q = torch.randn(B, H, 1, D, generator=g).to(device)
        k, v = (torch.randn(B, Hkv, 1, D, generator=g).to(device) for _ in range(2))
        want_pools = [p.clone() for p in pools]
        live = lens > 0
        for pool, new in zip(want_pools, (k, v)):
            pool[1, slots[live].to(device)] = new[live.to(device), :, 0]
        want = paged_decode_attention(q, *(p[1] for p in want_pools), *args[:4], window or None, splits=1)
        got = paged_decode(q, k, v, *pools, 1, slots.to(device), *args)
        torch.testing.assert_close(pools[0], want_pools[0], atol=0, rtol=0)
        torch.testing.assert_close(pools[1], want_pools[1], atol=0, rtol=0)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert got[2].abs().max() == 0  # the padding row: zeros, and nothing written for it
        assert int(paged_attention._ARRIVALS[q.device].abs().sum()) == 0


@needs_kernel
@pytest.mark.parametrize("offset,bias", [(0.0, False), (1.0, True)])
@pytest.mark.parametrize("one_tile", [False, True])
def test_gemv_rmsnorm_and_residual_equal_the_separate_ops(offset, bias, one_tile, monkeypatch):
    """The fused RMSNorm prologue and residual epilogue round where the separate ops do: on the GPU bit-equal to the
    GEMV of the separately normalized input, and to adding the residual after the GEMV (Triton's CPU interpreter
    truncates its bf16 casts: an ulp or two there). `one_tile`: a K tile wider than K, so the norm's input is read
    once for the sum of squares and the product."""
    from lmforge.models.transformer import RMSNorm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    K, N = 160, 48  # K not a multiple of the interpreter's 64-wide tile
    bf16 = dict(device=device, dtype=torch.bfloat16)
    norm = RMSNorm(K, 1e-5, offset).to(**bf16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(K, generator=g))
    x = (3 * torch.randn(1, 1, K, generator=g)).to(**bf16)
    w = torch.randn(N, K, generator=g).to(**bf16)
    b = torch.randn(N, generator=g).to(**bf16) if bias else None
    res = torch.randn(1, 1, N, generator=g).to(**bf16)
    gate_up = torch.randn(1, 1, 2 * K, generator=g).to(**bf16)
    exact = dict(atol=0, rtol=0) if device == "cuda" else dict(atol=0.07, rtol=0.02)
    if one_tile:
        monkeypatch.setitem(gemv.config_overrides, gemv.config_kind(N, K, norm=True), (4, 256, 4, 1))
    with torch.no_grad():
        torch.testing.assert_close(gemv.gemv_rmsnorm(x, norm.weight, norm.eps, offset, w, b), gemv.gemv(norm(x), w, b),
                                   **exact)
        torch.testing.assert_close(gemv.gemv(x, w, b, res), gemv.gemv(x, w, b) + res, **exact)
        torch.testing.assert_close(gemv.gemv_silu_mul(gate_up, w, b, res), gemv.gemv_silu_mul(gate_up, w, b) + res,
                                   **exact)


@needs_kernel
def test_fused_decode_blocks_equal_the_unfused_packed_step(ckpt, monkeypatch):
    """Packing installs a FusedDecodeBlock on every block: a one-row forward through them equals the packed (unfused)
    forward (exactly on the GPU); a two-token forward never takes them; unpacking removes them."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_hf(ckpt, progress=False, dtype=torch.bfloat16, device=device)
    one, two = torch.tensor([[7]], device=device), torch.tensor([[7, 8]], device=device)
    calls = []
    call = FusedDecodeBlock.decode_row
    monkeypatch.setattr(FusedDecodeBlock, "decode_row", lambda self, *a: calls.append(1) or call(self, *a))
    with torch.inference_mode():
        want = model(one).float()
        assert pack_for_decode(model, KERNELS)["fused_blocks"] == model.cfg.n_layers
        fused = model(one).float()
        assert len(calls) == model.cfg.n_layers
        model(two)
        assert len(calls) == model.cfg.n_layers  # two rows: the blocks' own forward
        installed = list(model.layers)
        for i, b in enumerate(installed):
            model.layers[i] = b.block
        packed = model(one).float()
        for i, b in enumerate(installed):
            model.layers[i] = b
        unpack_for_decode(model)
        assert not any(isinstance(b, FusedDecodeBlock) for b in model.layers)
    exact = dict(atol=0, rtol=0) if device == "cuda" else dict(atol=0.03, rtol=0.02)  # CPU: interpreter truncation
    torch.testing.assert_close(fused, packed, **exact)
    torch.testing.assert_close(fused, want, atol=0.05, rtol=0.05)
    assert (fused.argmax(-1) == want.argmax(-1)).all()


@needs_kernel
@pytest.mark.parametrize("arch,fused", [("Qwen3ForCausalLM", 2), ("Gemma2ForCausalLM", 0), ("Olmo2ForCausalLM", 0)])
def test_fused_decode_blocks_only_where_they_compute_the_block(arch, fused, tmp_path, caplog):
    """Qwen3's qk-norm runs inside Attention.mix, which the fused block calls: fused, and equal to the block's own
    forward. Gemma 2's sandwich norms and OLMo 2's post-norms are not what the fused block computes: those blocks keep
    their own forward, and packing logs why."""
    import logging

    from lmforge.testing import make_tiny_hf_model

    torch.manual_seed(0)
    make_tiny_hf_model(arch, tmp_path / arch)
    model = load_hf(tmp_path / arch, progress=False)
    one = torch.tensor([[7]])
    with torch.inference_mode(), caplog.at_level(logging.INFO, logger="lmforge.infer.kernels.decode_fusion"):
        want = model(one)
        done = pack_for_decode(model, KERNELS)
        got = model(one)
    assert done["fused_blocks"] == fused
    assert sum(isinstance(b, FusedDecodeBlock) for b in model.layers) == fused
    if not fused:
        assert "norm_placement=" in next(iter(done["unfused_blocks"])) and "fused decode blocks off" in caplog.text
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs a Hopper-class GPU")
def test_programmatic_dependent_launch_changes_no_result(ckpt, monkeypatch):
    """The decode kernels launched with PDL (the default on Hopper) compute exactly what plain launches do, eagerly
    and replayed from a CUDA graph."""
    from lmforge.infer.engine import EngineConfig

    model = load_hf(ckpt, progress=False, dtype=torch.bfloat16, device="cuda")
    prompts = _prompts(3, seed=11)
    outs = {}
    for on in (False, True):
        llm = LLM(model, config=EngineConfig(block_size=4, num_blocks=64, decode_steps=4, max_num_seqs=1,
                                             kernels=KernelOptions(pdl=on)))
        outs[on] = [o.token_ids for o in llm.generate(prompts, GREEDY)]
        assert gemv.use_pdl(torch.device("cuda"), llm.engine.config.kernels.pdl) == on
        unpack_for_decode(model)
    assert outs[True] == outs[False]
