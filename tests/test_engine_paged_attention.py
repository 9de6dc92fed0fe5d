"""The Triton paged decode-attention kernel: equal to dense attention over each row's context (GQA, sliding
window, split contexts, padding rows), and engine greedy parity when the model hands attention to the cache.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1) when triton is installed; with CUDA it runs
compiled (the `gpu` test)."""
from __future__ import annotations

import math
import random

import pytest
import torch

triton = pytest.importorskip("triton")

from lmforge.infer import LLM, EngineConfig, SamplingParams, generate  # noqa: E402
from lmforge.infer.kernels import paged_attention as paged_attention_module  # noqa: E402
from lmforge.infer.kernels.paged_attention import kernel_available, paged_decode_attention  # noqa: E402
from lmforge.infer.engine.paged_cache import model_calls_cache_attend  # noqa: E402
from lmforge.models import load_hf  # noqa: E402
from lmforge.models import transformer as transformer_module  # noqa: E402
from lmforge.models.positions import apply_rope  # noqa: E402
from lmforge.testing import make_tiny_checkpoint  # noqa: E402


if not kernel_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")):  # interpreter: conftest.py
    pytest.skip("needs CUDA, or Triton's CPU interpreter chosen before triton was imported", allow_module_level=True)

@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _reference(q, k_pool, v_pool, tables, lens, block_size, window, scale=None, softcap=None):
    B, H, _, D = q.shape
    G = H // k_pool.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        pos = torch.arange(n)
        slots = tables[b, pos // block_size].cpu() * block_size + pos % block_size
        keep = pos > n - 1 - window if window else torch.ones(n, dtype=torch.bool)
        k = k_pool[slots.to(k_pool.device)][keep].repeat_interleave(G, dim=1).float()  # (n', H, D)
        v = v_pool[slots.to(v_pool.device)][keep].repeat_interleave(G, dim=1).float()
        att = torch.einsum("hd,nhd->hn", q[b, :, 0].float(), k) * (scale or 1 / math.sqrt(D))
        if softcap:
            att = torch.tanh(att / softcap) * softcap
        out[b, :, 0] = torch.einsum("hn,nhd->hd", att.softmax(-1), v).to(q.dtype)
    return out


@pytest.mark.parametrize("block_size,head_dim,window,splits", [(4, 32, None, 1), (16, 24, None, 3), (8, 32, 7, 2)])
def test_kernel_equals_dense_attention(device, block_size, head_dim, window, splits):
    torch.manual_seed(0)
    B, H, Hkv, slots = 5, 8, 2, 1024
    dtype = torch.float32
    k_pool = torch.randn(slots, Hkv, head_dim, device=device, dtype=dtype)
    v_pool = torch.randn_like(k_pool)
    lens = torch.tensor([0, 1, 17, 64, 130], device=device)
    width = math.ceil(130 / block_size)
    perm = torch.randperm(slots // block_size - 1)[:B * width] + 1  # scattered, distinct blocks; 0 stays unused
    tables = perm.view(B, width).to(device)
    q = torch.randn(B, H, 1, head_dim, device=device, dtype=dtype)
    got = paged_decode_attention(q, k_pool, v_pool, tables, lens, block_size, 130, window, splits)
    want = _reference(q, k_pool, v_pool, tables, lens, block_size, window)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert got[0].abs().max() == 0  # a padding row gives zeros, not NaN


@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_scale_and_softcap_equal_dense_attention(device, splits):
    """Gemma 2's attention in the kernel: query_pre_attn_scalar's scale and tanh soft-capped scores (a cap that
    clips: without it the output differs)."""
    torch.manual_seed(0)
    B, H, Hkv, D, block_size, slots = 3, 4, 2, 32, 8, 512
    k_pool = torch.randn(slots, Hkv, D, device=device)
    v_pool = torch.randn_like(k_pool)
    lens = torch.tensor([5, 40, 70], device=device)
    tables = (torch.randperm(slots // block_size - 1)[:B * 9] + 1).view(B, 9).to(device)
    q = 3 * torch.randn(B, H, 1, D, device=device)
    got = paged_decode_attention(q, k_pool, v_pool, tables, lens, block_size, 72, 16, splits, scale=0.2, softcap=2.0)
    want = _reference(q, k_pool, v_pool, tables, lens, block_size, 16, scale=0.2, softcap=2.0)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    uncapped = _reference(q, k_pool, v_pool, tables, lens, block_size, 16, scale=0.2)
    assert (uncapped - want).abs().max() > 1e-2


def _hooked_attention_forward(self, x, rope, mask, cache, slots):
    """Attention.forward with the proposed hook (docs/serving.md): a cache with `attend` does the attention."""
    B, T, _ = x.shape
    hd = self.cfg.dim_per_head
    q = self.q_proj(x).view(B, T, -1, hd).transpose(1, 2)
    k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)
    v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
    if rope is not None:
        q = apply_rope(q, *rope, interleaved=self.cfg.rope_interleaved)
        k = apply_rope(k, *rope, interleaved=self.cfg.rope_interleaved)
    if cache is not None and hasattr(cache, "attend"):
        y = cache.attend(self.layer, q, k, v, mask)
    else:
        if cache is not None:
            k, v = cache.update(self.layer, slots, k, v)
        y = transformer_module.attend(q, k, v, mask)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def test_engine_greedy_parity_through_the_kernel(device, monkeypatch, tmp_path):
    torch.set_num_threads(1)
    model = load_hf(make_tiny_checkpoint(tmp_path / "tiny"), progress=False, device=device)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(1, 40))] for _ in range(6)]
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    want = [r.token_ids for r in generate(model, prompts, params)]
    if not model_calls_cache_attend(model):  # the hook is not wired into the model yet
        monkeypatch.setattr(transformer_module.Attention, "forward", _hooked_attention_forward)
    assert model_calls_cache_attend(model)
    if device.type == "cpu":  # Triton's interpreter runs programs one after another: one split per row, not the
        # GPU's 3 (at <= 50 keys, under one 64-key chunk, the other two were empty; splits: the tests above)
        monkeypatch.setattr(paged_attention_module, "choose_splits", lambda *args, **kwargs: 1)
    llm = LLM(model, config=EngineConfig(block_size=4, num_blocks=256, attention="kernel", decode_steps=4,
                                         max_model_len=128))
    assert llm.engine.runner.paged_kernel
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == want, [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w]
    llm.engine.runner.enable_static_decode()  # bucketed batches with padding rows, as CUDA graphs replay them
    assert [o.token_ids for o in llm.generate(prompts, params)] == want


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["Gemma2ForCausalLM", "Gemma3ForCausalLM", "SmolLM3ForCausalLM", "Phi3ForCausalLM"])
def test_new_block_variants_greedy_parity_through_the_kernel(device, arch, tmp_path):
    """The kernel decodes the 2024-25 families exactly as generate(): Gemma 2's scale, soft-cap and per-layer windows,
    Gemma 3's two RoPE tables (each layer hands the kernel its own), SmolLM3's NoPE layers (no rotation, the shared
    table elsewhere), Phi-3's longrope (per-row frequencies and attention factor in the batch's table); eagerly and
    through the static (CUDA-graph) decode buffers."""
    from lmforge.testing import make_tiny_hf_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    make_tiny_hf_model(arch, tmp_path / arch)
    model = load_hf(tmp_path / arch, progress=False, device=device)
    prompts = [[5, 9, 17, 33, 2, 70, 11, 12, 13], [40, 41, 42]]
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    want = [r.token_ids for r in generate(model, prompts, params)]
    llm = LLM(model, config=EngineConfig(block_size=4, num_blocks=64, attention="kernel", decode_steps=2,
                                         max_model_len=32))
    runner = llm.engine.runner
    assert runner.paged_kernel and (runner.rope is None) == (arch == "Gemma3ForCausalLM")
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    runner.enable_static_decode()
    assert [o.token_ids for o in llm.generate(prompts, params)] == want


@pytest.mark.gpu
@pytest.mark.parametrize("batch,splits", [(1, None), (96, None), (7, 5)])
def test_kernel_bf16_on_gpu_matches_dense(batch, splits):
    torch.manual_seed(1)
    dev, block_size, Hkv, H, D = torch.device("cuda"), 16, 8, 32, 64
    lens = torch.randint(0, 2000, (batch,), device=dev)
    width = 125
    k_pool = torch.randn(batch * width * block_size + block_size, Hkv, D, device=dev, dtype=torch.bfloat16)
    v_pool = torch.randn_like(k_pool)
    tables = (torch.randperm(batch * width, device=dev) + 1).view(batch, width)
    q = torch.randn(batch, H, 1, D, device=dev, dtype=torch.bfloat16)
    got = paged_decode_attention(q, k_pool, v_pool, tables, lens, block_size, 2000, None, splits)
    want = _reference(q, k_pool, v_pool, tables, lens, block_size, None)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
