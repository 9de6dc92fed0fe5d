"""The training-speed levers against their plain PyTorch forms, forward and backward: fused linear + cross-entropy,
the fused LoRA linear (a custom op, eager and under torch.compile), AdamW inside backward, and partial activation checkpointing.
CUDA variants of the same checks run on a GPU (skipped on CPU)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models import ModelConfig, Transformer
from lmforge.peft.lora import LoRALinear, fused_lora_linear
from lmforge.train.loss import causal_lm_loss_sum, fused_chunk_rows, linear_cross_entropy_sum
from lmforge.train.optimizers import AdamWInBackward

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _ce_reference(hidden, weight, labels):
    logits = (hidden @ weight.T).float().reshape(-1, weight.shape[0])
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("fixed_shapes", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_cross_entropy_matches_plain_forward_and_backward(device, fixed_shapes):
    torch.manual_seed(0)
    hidden = torch.randn(3, 50, 16, device=device, requires_grad=True)
    weight = (0.3 * torch.randn(200, 16, device=device)).requires_grad_()
    labels = torch.randint(0, 200, (3, 50), device=device)
    labels[0, :7] = -100  # prompt tokens: no loss, no gradient
    labels[2, 20:23] = -100  # ... also inside a row (fixed_shapes: they stay in the chunks, weighted 0)
    ref = _ce_reference(hidden, weight, labels)
    gh, gw = torch.autograd.grad(0.25 * ref, (hidden, weight))
    out = causal_lm_loss_sum(None, hidden, labels, head_weight=weight, chunk_tokens=32,  # chunks of 32 rows
                             fixed_shapes=fixed_shapes)
    fh, fw = torch.autograd.grad(0.25 * out, (hidden, weight))
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(fh, gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fw, gw, rtol=1e-4, atol=1e-6)
    assert fh[0, :7].abs().max() == 0 and fh[2, 20:23].abs().max() == 0  # ignored rows get no gradient


def test_fused_cross_entropy_in_bf16_autocast_is_close_and_keeps_fp32_grads():
    torch.manual_seed(0)
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = (0.2 * torch.randn(500, 32)).requires_grad_()
    targets = torch.randint(0, 500, (64,))
    ref = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy_sum(hidden, weight, targets, chunk_rows=16)
    out.backward()
    assert out.dtype == torch.float32 and out.item() == pytest.approx(ref.item(), rel=2e-2)
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    gh, gw = torch.autograd.grad(ref, (hidden, weight))
    assert F.cosine_similarity(hidden.grad.flatten(), gh.flatten(), dim=0) > 0.99
    assert F.cosine_similarity(weight.grad.flatten(), gw.flatten(), dim=0) > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_cross_entropy_trained_head_in_bf16_accumulates_in_fp32():
    """CUDA bf16: the head gradient accumulates chunk by chunk in fp32 (GEMM epilogue), as close to the fp32
    reference as one bf16 product of the whole batch would be."""
    torch.manual_seed(0)
    hidden = torch.randn(700, 64, device="cuda", requires_grad=True)
    weight = (0.2 * torch.randn(3000, 64, device="cuda")).requires_grad_()
    targets = torch.randint(0, 3000, (700,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = linear_cross_entropy_sum(hidden, weight, targets, chunk_rows=100)
    out.backward()
    ref = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    gw = torch.autograd.grad(ref, weight)[0]
    assert weight.grad.dtype == torch.float32
    err = (weight.grad - gw).norm() / gw.norm()
    assert err < 2e-2, err


def test_fused_cross_entropy_frozen_head_and_no_grad():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(30, 8)  # frozen head (LoRA): only the hidden gradient is computed
    targets = torch.randint(0, 30, (10,))
    out = linear_cross_entropy_sum(hidden, weight, targets)
    out.backward()
    torch.testing.assert_close(hidden.grad, torch.autograd.grad(F.cross_entropy(hidden @ weight.T, targets,
                                                                                reduction="sum"), hidden)[0])
    with torch.no_grad():
        assert linear_cross_entropy_sum(hidden, weight, targets).item() == pytest.approx(out.item())
    again = linear_cross_entropy_sum(hidden, weight, targets)
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        again.backward()


def test_fused_chunk_rows_bounds_logit_memory():
    assert fused_chunk_rows(128256, 8192) == 523  # ~256 MiB of fp32 logits at a Llama-3 vocabulary
    assert fused_chunk_rows(128256, 8192, head_trains=True) == 1046  # longer chunks amortize the fp32 grad update
    assert fused_chunk_rows(32000, 100) == 100  # never more rows than there are
    assert fused_chunk_rows(10**7, 5000) == 128  # at least 128 rows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [False, True])
def test_fused_lora_matches_plain_forward_and_backward(device, bias):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 40, bias=bias, device=device), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)
    grad = torch.randn(3, 5, 40, device=device)

    def plain(inp):
        a, b = layer.lora_A.weight, layer.lora_B.weight
        return layer.base_layer(inp) + F.linear(F.linear(inp, a), b) * layer.scaling

    params = (x, layer.lora_A.weight, layer.lora_B.weight)
    y, ref = layer(x), plain(x)
    torch.testing.assert_close(y, ref)
    for got, want in zip(torch.autograd.grad(y, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_lora_in_autocast_trains_fp32_adapters():
    layer = LoRALinear(nn.Linear(16, 16).bfloat16(), r=2, alpha=4)
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().pow(2).sum().backward()
    assert y.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0
    # a frozen input (first layer over a frozen embedding) gets no gradient computed
    out = fused_lora_linear(x.detach(), layer.base_layer.weight, None, layer.lora_A.weight, layer.lora_B.weight, 2.0)
    assert out.requires_grad and out.grad_fn is not None


def _tiny_lora_model(device, seed=0):
    from lmforge.peft.methods import build_method

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    model = Transformer(cfg).to(device)
    method = build_method("lora", r=4, alpha=8, target_modules="all-linear")
    method.apply(model)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            nn.init.normal_(layer.lora_B.weight, std=0.1)
    return model.train()


def _lora_grads(model, tokens):
    hidden = model.hidden_states(tokens)
    labels = torch.roll(tokens, -1, 1)
    loss = causal_lm_loss_sum(model.logits, hidden, labels, head_weight=model.head_weight())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_checkpointed_blocks_train_lora_like_eager(device):
    """torch.compile traces the fused LoRA function into each block (with activation checkpointing around it):
    the same loss and the same adapter gradients as the eager, unchecked model."""
    tokens = torch.randint(0, 97, (2, 24), device=device)
    eager = _tiny_lora_model(device)
    loss, grads = _lora_grads(eager, tokens)
    compiled = _tiny_lora_model(device)
    compiled.checkpoint_every, compiled.checkpoint_limit = 1, 2
    for block in compiled.layers:
        block.compile(backend="inductor" if device == "cuda" else "aot_eager")
    loss_c, grads_c = _lora_grads(compiled, tokens)
    assert set(grads) == set(grads_c) and len(grads) == 4 * 7 * 2  # every lora_A / lora_B gets a gradient
    torch.testing.assert_close(loss_c, loss, rtol=1e-4, atol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-3, atol=1e-4)


def test_checkpoint_limit_recomputes_only_the_lowest_blocks():
    model = Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=6, n_heads=2, d_ff=32, max_seq_len=16))
    model.checkpoint_every = 1
    assert [model.checkpointed(i) for i in range(6)] == [True] * 6
    model.checkpoint_limit = 2
    assert [model.checkpointed(i) for i in range(6)] == [True, True, False, False, False, False]
    model.checkpoint_every = 2
    assert [model.checkpointed(i) for i in range(6)] == [True, False, True, False, False, False]
    model.checkpoint_every = 0
    assert not any(model.checkpointed(i) for i in range(6))


def test_head_weight_only_for_plain_heads():
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16)
    tied = Transformer(cfg.model_copy(update={"tie_embeddings": True}))
    assert tied.head_weight() is tied.embed.weight
    untied = Transformer(cfg.model_copy(update={"tie_embeddings": False}))
    assert untied.head_weight() is untied.lm_head.weight
    untied.lm_head = LoRALinear(untied.lm_head, r=2, alpha=4)  # a wrapped head takes the checkpointed loss
    assert untied.head_weight() is None


def test_adamw_in_backward_equals_adamw_and_frees_gradients():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    fused = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    fused.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt = AdamWInBackward([{"params": list(fused.parameters()), "weight_decay": 0.1}], lr=1e-2)
    for step in range(4):
        x = torch.randn(5, 8)
        ref(x).pow(2).mean().backward()
        opt_ref.step()
        opt_ref.zero_grad()
        fused(x).pow(2).mean().backward()  # updates happen here
        assert all(p.grad is None for p in fused.parameters())
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (0.5 ** step)  # a schedule reaches the per-parameter steps
        for group in opt_ref.param_groups:
            group["lr"] = 1e-2 * (0.5 ** step)
    for a, b in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b)
    # checkpoint round trip: a fresh optimizer loaded from the state continues identically
    state = copy.deepcopy(opt.state_dict())  # as if read back from disk (state_dict shares the live tensors)
    assert len(state["state"]) == 4 and "exp_avg" in state["state"][0]
    clone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    clone.load_state_dict(fused.state_dict())
    opt2 = AdamWInBackward([{"params": list(clone.parameters()), "weight_decay": 0.1}], lr=1e-2)
    opt2.load_state_dict(state)
    x = torch.randn(5, 8)
    fused(x).pow(2).mean().backward()
    clone(x).pow(2).mean().backward()
    for a, b in zip(fused.parameters(), clone.parameters()):
        torch.testing.assert_close(a, b)


def _tiny_trainer(optimizer: str, grad_clip, checkpoint_blocks=None):
    from lmforge.data import DataConfig
    from lmforge.peft.methods import build_method
    from lmforge.train import Trainer, TrainConfig
    from lmforge.train.config import ModelSection, OptimSection, TrainSection

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                      tie_embeddings=True)
    model = Transformer(cfg)
    method = build_method("full")
    method.apply(model)
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(12):
        t = torch.randint(0, 61, (16,), generator=g).tolist()
        rows.append({"tokens": t, "labels": t[1:] + [-100], "positions": list(range(16))})
    tcfg = TrainConfig(model=ModelSection(tokenizer="x"), data=DataConfig(path="x"),
                       optim=OptimSection(name=optimizer, lr=1e-2, weight_decay=0.1),
                       train=TrainSection(precision="fp32", micro_batch_size=4, max_steps=3, grad_clip=grad_clip,
                                          activation_checkpointing=checkpoint_blocks is not None,
                                          checkpoint_blocks=checkpoint_blocks, progress=False, tensorboard=False,
                                          output_dir="/tmp/lmforge_unused"))
    return Trainer(model, method, rows, None, tcfg, pad_id=0, device=torch.device("cpu"))


def test_trainer_adamw_backward_and_partial_checkpointing_train_like_adamw():
    """Through the real trainer (tied embeddings: the fused loss's head gradient meets the embedding's): AdamW inside
    backward with 1 of 3 blocks recomputed gives the same losses and weights as plain AdamW without checkpointing."""
    ref, fused = _tiny_trainer("adamw", None), _tiny_trainer("adamw_backward", None, checkpoint_blocks=1)
    losses = [(ref.train_step()["loss"], fused.train_step()["loss"]) for _ in range(3)]
    for a, b in losses:
        assert a == pytest.approx(b, rel=1e-5)
    assert abs(losses[-1][0] - losses[0][0]) > 1e-3  # the weights did move
    for (name, a), b in zip(ref.model.named_parameters(), fused.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_adamw_backward_says_it_cannot_clip():
    with pytest.warns(UserWarning, match="grad_clip=1.0 is not applied"):
        _tiny_trainer("adamw_backward", 1.0)


def test_triton_chunk_ce_matches_the_reference_in_place():
    """The CUDA chunk step (Triton; the interpreter on CPU) against `_chunk_ce`: loss, weighted loss, gradient
    written over the logits; a vocabulary that is not a multiple of the kernel's block."""
    from lmforge.infer.kernels.paged_attention import kernel_available
    from lmforge.train import ce_kernel
    from lmforge.train.loss import _chunk_ce

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not kernel_available(device):
        pytest.skip("needs triton (CUDA, or its CPU interpreter)")
    torch.manual_seed(0)
    V = ce_kernel.BLOCK + 300
    logits = (3 * torch.randn(5, V, device=device)).to(torch.bfloat16)
    targets = torch.tensor([0, V - 1, 17, ce_kernel.BLOCK, 5], device=device)
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], device=device)
    for with_grad, w in ((True, None), (True, weights), (False, None)):
        want_loss, want_grad = _chunk_ce(logits.clone(), targets, with_grad, w)
        buf = logits.clone()
        loss, grad = ce_kernel.chunk_ce_inplace(buf, targets, with_grad, w)
        assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
        if with_grad:
            assert grad.data_ptr() == buf.data_ptr() and grad.dtype == torch.bfloat16  # in place
            torch.testing.assert_close(grad.float(), want_grad.float(), atol=1e-2 / 128, rtol=1e-2)
        else:
            assert grad is None and torch.equal(buf, logits)  # the logits are left alone
