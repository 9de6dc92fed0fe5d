"""Training-time quantization: QAT (fake quant + STE, then conversion) and BitNet b1.58 trained with the Trainer on
the quickstart task, then packed ternary inference."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lmforge.data import DataConfig, build_datasets
from lmforge.models import ModelConfig, Transformer
from lmforge.peft.methods import build_method
from lmforge.quant import (BitLinear, FakeQuantLinear, Int4Linear, Int8Linear, PackedBitLinear, QATMethod,
                           bitnet_linear_factory, convert_qat, load_quantized, quantize_model)
from lmforge.quant.bitnet import pack_ternary, unpack_ternary
from lmforge.quickstart import QuickstartConfig, make_data, make_tokenizer
from lmforge.tokenizer import Tokenizer
from lmforge.train import Trainer, TrainConfig
from lmforge.train.config import ModelSection, OptimSection, ScheduleSection, TrainSection


@pytest.fixture(scope="module")
def quickstart_data(tmp_path_factory):
    """The quickstart's generated pretraining text ("copy: a b c => a b c") and its BPE tokenizer."""
    root = tmp_path_factory.mktemp("qs")
    files = make_data(root / "data", QuickstartConfig())
    tok_dir = make_tokenizer(root / "tok", files)
    tok = Tokenizer.from_dir(tok_dir)
    data_cfg = DataConfig(path=str(files["pretrain"]), format="text", text_mode="lines", max_seq_len=64,
                          packing=True, val_split=0.05)
    train, val, _ = build_datasets(data_cfg, tok)
    return tok, tok_dir, data_cfg, train, val


def _trainer(model, method, data, out, steps, lr):
    tok, tok_dir, data_cfg, train, val = data
    cfg = TrainConfig(stage="pretrain", model=ModelSection(tokenizer=str(tok_dir)), data=data_cfg,
                      optim=OptimSection(lr=lr), schedule=ScheduleSection(warmup_steps=5),
                      train=TrainSection(output_dir=str(out), max_steps=steps, micro_batch_size=4, device="cpu",
                                         progress=False, tensorboard=False, precision="fp32", eval_max_batches=4))
    return Trainer(model, method, train, val, cfg, pad_id=tok.pad_id, device=torch.device("cpu"))


def _small_cfg(tok) -> ModelConfig:
    return ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64)


# ------------------------------------------------------------------------------------------------------- BitNet


def test_ternary_packing_roundtrip():
    t = torch.randint(-1, 2, (5, 12)).float()
    packed = pack_ternary(t)
    assert packed.shape == (5, 3) and packed.dtype == torch.uint8
    assert torch.equal(unpack_ternary(packed).float(), t)


def test_bitnet_trains_on_quickstart_task_and_packs_for_inference(quickstart_data, tmp_path):
    tok = quickstart_data[0]
    torch.manual_seed(0)
    model = Transformer(_small_cfg(tok), linear=bitnet_linear_factory())
    assert isinstance(model.layers[0].attn.q_proj, BitLinear) and type(model.lm_head) is nn.Linear
    method = build_method("full")
    method.apply(model)
    trainer = _trainer(model, method, quickstart_data, tmp_path / "bitnet", steps=30, lr=1e-2)
    before = trainer.evaluate()["eval_loss"]
    losses = [trainer.train_step()["loss"] for _ in range(30)]
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.6 * before, (before, after)  # ~5.8 -> ~2.9 measured
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])
    # the trained latent weights really are used through ternary rounding: every effective weight is 0 or +-scale
    lin = model.layers[0].mlp.up_proj
    scale = lin.weight.abs().mean()
    eff = (lin.weight / scale).round().clamp(-1, 1)
    assert set(eff.unique().tolist()) <= {-1.0, 0.0, 1.0}

    model.eval()
    tokens = torch.tensor([tok.encode("copy: a b c => a b c")])
    with torch.no_grad():
        ref = model(tokens)
        packed = quantize_model(model, "bitnet")
        got = packed(tokens)
    layer = packed.layers[0].mlp.up_proj
    assert isinstance(layer, PackedBitLinear) and layer.nbytes == 128 * 64 // 4 + 4  # 2 bits per weight
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


# ---------------------------------------------------------------------------------------------------------- QAT


@pytest.fixture(scope="module")
def plain_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64)
    return Transformer(cfg).eval()


def test_qat_int4_converts_to_bit_identical_real_model(plain_model):
    model = copy.deepcopy(plain_model)
    QATMethod(bits=4, group_size=32).apply(model)
    assert isinstance(model.layers[0].attn.q_proj, FakeQuantLinear) and type(model.lm_head) is nn.Linear
    tokens = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        fake = model(tokens)
        convert_qat(model)
        real = model(tokens)
    assert isinstance(model.layers[1].mlp.down_proj, Int4Linear)
    assert torch.equal(real, fake)
    with torch.no_grad():  # and the fake quant really rounded: outputs differ from the fp model
        assert not torch.allclose(real, plain_model(tokens), atol=1e-4)


def test_qat_w8a8_converts_to_equal_outputs(plain_model):
    model = copy.deepcopy(plain_model)
    QATMethod(bits=8, act_bits=8).apply(model)
    tokens = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        fake = model(tokens)
        convert_qat(model)
        real = model(tokens)
    layer = model.layers[0].attn.o_proj
    assert isinstance(layer, Int8Linear) and layer.act_bits == 8
    assert torch.allclose(real, fake, rtol=1e-5, atol=1e-5)  # same codes; scaling after vs before the matmul
    assert torch.equal(real.argmax(-1), fake.argmax(-1))


def test_qat_method_trains_through_fake_quant_and_saves_a_real_checkpoint(quickstart_data, tmp_path):
    tok = quickstart_data[0]
    torch.manual_seed(0)
    model = Transformer(_small_cfg(tok))
    method = build_method("full")  # pretrain a few steps in full precision...
    method.apply(model)
    _trainer(model, method, quickstart_data, tmp_path / "fp", steps=15, lr=1e-2).fit()
    qat = QATMethod(bits=4, group_size=32)  # ...then fine-tune quantization-aware
    qat.apply(model)
    trainer = _trainer(model, qat, quickstart_data, tmp_path / "qat", steps=10, lr=3e-3)
    before = trainer.evaluate()["eval_loss"]
    w0 = model.layers[0].attn.q_proj.weight.detach().clone()
    for _ in range(10):
        trainer.train_step()
    assert not torch.equal(w0, model.layers[0].attn.q_proj.weight)  # gradients reach the latent weights (STE)
    assert trainer.evaluate()["eval_loss"] < before

    out = qat.save(model, tmp_path / "artifact")
    back = load_quantized(out)
    assert isinstance(back.layers[0].attn.q_proj, Int4Linear)
    tokens = torch.tensor([tok.encode("copy: x y => x y")])
    model.eval()
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))
