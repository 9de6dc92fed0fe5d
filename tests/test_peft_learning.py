"""Every method learns: on a tiny base pretrained on the quickstart "copy" text, 80 steps (batch 8) of each
method on the quickstart instruction task (reverse a sequence of letters) lower the held-out loss, through the one
Trainer. The base is shared (module scope) so each method costs only its own steps."""
from __future__ import annotations

import pytest
import torch

from lmforge.data import DataConfig, build_datasets
from lmforge.models import ModelConfig, Transformer
from lmforge.peft import build_method
from lmforge.quickstart import QuickstartConfig, make_data, make_tokenizer
from lmforge.tokenizer import Tokenizer
from lmforge.train import Trainer, TrainConfig
from lmforge.train.config import ModelSection, OptimSection, ScheduleSection, TrainSection

SEQ = 48


def _config(path, fmt, steps, lr, optim="adamw", batch=8, **data) -> TrainConfig:
    return TrainConfig(
        model=ModelSection(tokenizer="unused"), data=DataConfig(path=str(path), format=fmt, max_seq_len=SEQ, **data),
        optim=OptimSection(name=optim, lr=lr), schedule=ScheduleSection(kind="constant", warmup_steps=5),
        train=TrainSection(max_steps=steps, micro_batch_size=batch, device="cpu", precision="fp32", progress=False,
                           tensorboard=False, eval_max_batches=2, seed=0))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """(base state dict, model config, tokenizer, sft train rows, sft held-out rows)."""
    out = tmp_path_factory.mktemp("peft_task")
    files = make_data(out / "data", QuickstartConfig(eval_prompts=20))
    tok = Tokenizer.from_dir(make_tokenizer(out / "tok", files))
    mcfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                       max_seq_len=SEQ, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    model = Transformer(mcfg)
    full = build_method("full")
    full.apply(model)
    cfg = _config(files["pretrain"], "text", 80, 5e-3, text_mode="lines", packing=True, val_split=0.02)
    train, val, _ = build_datasets(cfg.data, tok)
    trainer = Trainer(model, full, train, val, cfg, pad_id=tok.pad_id, device=torch.device("cpu"))
    for _ in range(80):
        trainer.train_step()
    assert trainer.evaluate()["eval_loss"] < 3.0  # learned (half the tokens are random letters: ~2.3 is the floor)
    sft = _config(files["sft"], "openai", 1, 1e-3, val_split=0.05)
    sft_train, sft_val, _ = build_datasets(sft.data, tok)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, mcfg, tok, sft_train, sft_val, files


# method, options, optimizer, lr, least relative drop of the held-out loss. The chat-format tokens of the task were
# never seen in pretraining (their embeddings are random), which weight-updating methods fix and prompt methods can only
# steer around: those get a smaller (still large) bar.
STEPS = 80
CASES = [
    ("lora", dict(r=8, alpha=16, target_modules="all-linear"), "adamw", 3e-3, 0.4),
    ("dora", dict(r=8, alpha=16, target_modules="all-linear"), "adamw", 3e-3, 0.4),
    ("prilora", dict(r_start=4, r_end=12, alpha=16, prune_every=30, prune_ratio=0.25), "adamw", 3e-3, 0.4),
    ("adalora", dict(init_r=8, target_r=4, alpha=16, total_step=STEPS, tinit=10, tfinal=20,
                     target_modules="all-linear"), "adamw", 5e-3, 0.4),
    ("qlora", dict(r=8, alpha=16, compute_dtype="float32"), "adamw", 3e-3, 0.4),
    # IA3 only rescales activations (5k parameters): 4.69 -> 2.88 (-39%) on one machine, -40% or more on another
    ("ia3", dict(target_modules="all-linear", feedforward_modules=["down_proj"]), "adamw", 3e-2, 0.3),
    ("bitfit", dict(), "adamw", 3e-2, 0.4),
    ("adapter", dict(bottleneck=16), "adamw", 3e-3, 0.4),
    ("prefix", dict(num_virtual_tokens=8, prefix_projection=True, encoder_hidden_size=64), "adamw", 3e-3, 0.15),
    ("ptuning_v2", dict(num_virtual_tokens=8), "adamw", 2e-2, 0.15),
    ("prompt_tuning", dict(num_virtual_tokens=8), "adamw", 1e-1, 0.15),
    ("ptuning", dict(num_virtual_tokens=8, encoder="mlp", encoder_hidden_size=64), "adamw", 3e-2, 0.15),
    ("full", dict(), "lomo", 3e-2, 0.4),
    ("full", dict(), "adalomo", 1e-2, 0.4),
    ("full", dict(), "badam", 5e-3, 0.4),
    ("full", dict(), "galore", 3e-3, 0.4),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,options,optim,lr,drop", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_method_lowers_held_out_loss(task, name, options, optim, lr, drop):
    import lmforge.train.optimizers  # noqa: F401  (registers lomo, adalomo, badam, galore)

    state, mcfg, tok, train, val, _ = task
    torch.manual_seed(0)
    model = Transformer(mcfg)
    model.load_state_dict(state)
    method = build_method(name, **options)
    method.apply(model)
    cfg = _config("unused", "openai", STEPS, lr, optim=optim)
    if optim == "badam":
        cfg.optim.badam.switch_every = 10
    if optim == "galore":  # rank 16 < every block matrix's shorter side (32..64): all of them are projected
        cfg.optim.galore = cfg.optim.galore.model_copy(update=dict(rank=16, update_proj_gap=50, scale=1.0))
    trainer = Trainer(model, method, train, val, cfg, pad_id=tok.pad_id, device=torch.device("cpu"))
    if optim == "galore":
        assert len(trainer.optimizer.projected) == 7 * mcfg.n_layers
    before = trainer.evaluate()["eval_loss"]
    for _ in range(STEPS):
        trainer.train_step()
    after = trainer.evaluate()["eval_loss"]
    print(f"{name}/{optim}: held-out loss {before:.3f} -> {after:.3f}")
    assert after < (1 - drop) * before, (before, after)
    if optim == "galore":  # Adam's moments live in the rank-16 subspace: (16, n) or (m, 16) per block matrix
        projected = [trainer.optimizer.state[p] for g in trainer.optimizer.param_groups if g["galore"]
                     for p in g["params"]]
        assert projected and all(16 in s["adam"]["exp_avg"].shape and s["proj"].shape[1] == 16 for s in projected)
