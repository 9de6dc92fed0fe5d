"""Quantized checkpoints load everywhere: `load_hf` (hence generate, chat, serve, eval, export and `LLM`) reads what
`lmforge quantize` writes for every method, installs the device's fused kernels, and serves LoRA adapters on top."""
from __future__ import annotations

import copy
import io
import json

import httpx
import pytest
import torch

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.infer import LLM, EngineConfig, SamplingParams, generate
from lmforge.models import load_hf
from lmforge.quant import (Int4Linear, Int8Linear, PackedBitLinear, QuantLinear, apply_qat, quantize_model,
                           prepare_fast_path, quantized_linears, save_quantized)
from lmforge.serve import ServeConfig
from lmforge.testing import make_tiny_checkpoint
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

GREEDY = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
METHODS = {"int8": {}, "llm_int8": {"llm_int8": True}, "int4": {}, "nf4": {}, "bitnet": {}, "gptq": {}, "awq": {}}
ENGINE_METHODS = {**METHODS, "gptq_act_order": {"act_order": True}}  # act-order loads as Int4ActOrderLinear


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qload") / "tiny")


def _quantized(ckpt, method: str, out):
    """(in-memory quantized model, its saved directory) as `lmforge quantize` writes it."""
    from lmforge.checkpoint import save_tokenizer_files

    model = load_hf(ckpt, progress=False)
    opts = dict(ENGINE_METHODS[method])
    method = {"llm_int8": "int8", "gptq_act_order": "gptq"}.get(method, method)
    if method in ("gptq", "awq"):
        opts["calib"] = torch.randint(0, model.cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, method, group_size=32, **opts)
    save_quantized(model, out)
    save_tokenizer_files(ckpt, out)
    return model, out


@pytest.fixture(scope="module")
def q4(ckpt, tmp_path_factory):
    return _quantized(ckpt, "int4", tmp_path_factory.mktemp("q4") / "q4")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_load_hf_reads_every_method_with_the_fast_path(ckpt, tmp_path, method):
    """load_hf rebuilds the quantized layers; a prefill (reference path) gives the in-memory model's logits exactly,
    and one-row decodes run the device's fused kernel (where one exists) within its verification tolerance."""
    model, path = _quantized(ckpt, method, tmp_path / method)
    loaded = load_hf(path, device="cpu")
    want, got = quantized_linears(model), quantized_linears(loaded)
    assert got and {p: type(m) for p, m in got.items()} == {p: type(m) for p, m in want.items()}
    ids = torch.randint(0, model.cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = model(ids), loaded(ids)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
        one = loaded(ids[:, :1])
        assert (one - ref[:, :1]).abs().max() <= 3e-2 * ref[:, :1].abs().max() + 1e-3
    for layer in got.values():
        probe = type(layer)(layer.in_features, layer.out_features, layer.bias is not None, **layer.options())
        if isinstance(layer, (Int4Linear, Int8Linear)) and probe.prepare_fast_path(torch.float32) is not None:
            assert layer._fast is not None, "load_hf left a kernel that exists here unused"


def test_load_hf_casts_to_the_requested_compute_dtype(q4):
    loaded = load_hf(q4[1], dtype="bfloat16")
    layer = next(iter(quantized_linears(loaded).values()))
    assert loaded.embed.weight.dtype == torch.bfloat16 and layer.scale.dtype == torch.bfloat16
    assert layer.qweight.dtype == torch.uint8  # codes are never cast
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        assert torch.isfinite(loaded(ids)).all()


def eval_perplexity(path, tmp_path, repeats: int) -> float:
    """`lmforge eval PATH` on a perplexity task over a repeated sentence: the perplexity it reports."""
    (tmp_path / "ppl.txt").write_text("the quick brown fox jumps over the lazy dog. " * repeats)
    (tmp_path / "ppl.yaml").write_text(f"name: ppl\ntype: perplexity\ntext_file: {tmp_path / 'ppl.txt'}\n"
                                       "window: 32\nstride: 16\n")
    assert main(["eval", str(path), str(tmp_path / "ppl.yaml"), "--device", "cpu", "--output", str(tmp_path / "ev")]) == 0
    return json.loads((tmp_path / "ev" / "results.json").read_text())["results"][0]["metrics"]["perplexity"]


def test_every_verb_runs_on_a_quantized_checkpoint(q4, tmp_path, capsys, monkeypatch, serve):
    model, path = q4
    prompt_args = ["--prompt", "Hello world", "--max-new-tokens", "5", "temperature=0", "--ignore-eos", "--stream", "false",
                   "--device", "cpu"]
    assert main(["generate", str(path), *prompt_args]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    tok = Tokenizer.from_dir(path)
    want = generate(load_hf(path), [tok.encode("Hello world")], GREEDY.model_copy(update={"max_new_tokens": 5}),
                    tokenizer=tok)
    assert text == want[0].text and len(want[0].token_ids) == 5
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/exit\n"))
    assert main(["chat", str(path), "--max-new-tokens", "4", "temperature=0", "--device", "cpu"]) == 0
    assert "assistant>" in capsys.readouterr().out
    assert 1.0 < eval_perplexity(path, tmp_path, repeats=8) < 10 * model.cfg.vocab_size
    url, _ = serve(ServeConfig(model=str(path), device="cpu", engine=dict(block_size=4, num_blocks=256)))
    r = httpx.post(f"{url}/v1/completions", json={"model": "q4", "prompt": "Hello world", "max_tokens": 5,
                                                  "temperature": 0, "ignore_eos": True, "return_token_ids": True},
                   timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want[0].token_ids
    assert main(["export", str(path), "--out", str(tmp_path / "full")]) == 0
    full = load_hf(tmp_path / "full")
    assert not quantized_linears(full)  # written in full precision: the dequantized weights
    ids = torch.arange(1, 21)[None]
    with torch.no_grad():
        assert torch.allclose(full(ids), model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"int4"}))  # int4: every verb, above
def test_generate_and_eval_verbs_run_on_every_method(ckpt, tmp_path, capsys, method):
    """`lmforge generate` and `lmforge eval` on what `lmforge quantize` writes for each method: the CLI's greedy text
    is the in-memory quantized model's, and a perplexity task scores."""
    model, path = _quantized(ckpt, method, tmp_path / method)
    assert main(["generate", str(path), "--prompt", "Hello world", "--max-new-tokens", "4", "temperature=0",
                 "--ignore-eos", "--stream", "false", "--device", "cpu", "--dtype", "float32"]) == 0
    tok = Tokenizer.from_dir(path)
    want = generate(model, [tok.encode("Hello world")], GREEDY.model_copy(update={"max_new_tokens": 4}), tokenizer=tok)
    assert capsys.readouterr().out.rstrip("\n") == want[0].text
    assert 1.0 < eval_perplexity(path, tmp_path, repeats=4) < 10 * model.cfg.vocab_size


@pytest.mark.parametrize("method", sorted(ENGINE_METHODS))
def test_engine_serves_every_method(ckpt, tmp_path, method):
    """`LLM(...)`, the engine `lmforge serve` runs, on what `lmforge quantize` writes for each method: the layers stay
    quantized and a batch of two prompts gets the in-memory quantized model's greedy tokens."""
    model, path = _quantized(ckpt, method, tmp_path / method)
    prompts = [[5, 9, 13, 2, 7], [3, 4, 8, 100, 31, 22, 17]]
    want = [r.token_ids for r in generate(model, prompts, GREEDY)]
    llm = LLM(str(path), config=EngineConfig(block_size=4, num_blocks=128), device="cpu", dtype="float32")
    served = llm.engine.model
    assert all(type(served.get_submodule(p)) is type(m) for p, m in quantized_linears(model).items())
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == want


@pytest.mark.parametrize("method,opts,kind", [("qat", ["qat.group_size=32"], Int4Linear),
                                              ("bitnet", [], PackedBitLinear)])
def test_quantization_aware_training_writes_a_checkpoint_every_verb_loads(ckpt, tmp_path, capsys, method, opts, kind):
    """`lmforge train method=qat|bitnet` ends in a quantized checkpoint (INT4 / 2-bit codes): `lmforge generate`
    prints the reference path's greedy text, and the engine generates the same tokens."""
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}))
    assert main(["train", f"method={method}", *opts, f"model.path={ckpt}", f"data.path={data}", "train.max_steps=2",
                 f"train.output_dir={tmp_path / 'run'}", "train.device=cpu", "train.progress=false",
                 "train.tensorboard=false"]) == 0
    final = tmp_path / "run" / "final"
    model, tok = load_hf(final), Tokenizer.from_dir(final)
    assert {type(m) for m in quantized_linears(model).values()} == {kind}
    capsys.readouterr()
    assert main(["generate", str(final), "--prompt", "Hello world", "--max-new-tokens", "4", "temperature=0",
                 "--ignore-eos", "--stream", "false", "--device", "cpu", "--dtype", "float32"]) == 0
    want = generate(model, [tok.encode("Hello world")], GREEDY.model_copy(update={"max_new_tokens": 4}), tokenizer=tok)
    assert capsys.readouterr().out.rstrip("\n") == want[0].text
    llm = LLM(str(final), config=EngineConfig(block_size=4, num_blocks=64), device="cpu", dtype="float32")
    assert llm.generate([tok.encode("Hello world")], GREEDY.model_copy(update={"max_new_tokens": 4}))[0].token_ids == \
        want[0].token_ids


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_lora_adapters_on_a_quantized_base_in_the_engine(q4, tmp_path, device):
    """The engine's per-row adapters over quantized linears give what the adapter applied to the quantized model
    (LoRALinear around each QuantLinear) generates alone; on CUDA with the device's kernels installed by load_hf."""
    from lmforge.peft.lora import LoraConfig, apply_lora, lora_layers
    from lmforge.peft.peft_format import load_peft_adapter, save_peft_adapter

    _, path = q4
    m = load_hf(path)
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    apply_lora(m, cfg)
    torch.manual_seed(0)
    for layer in lora_layers(m).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    adapter = save_peft_adapter(m, cfg, tmp_path / "ad")
    prompts = [[5, 9, 13, 2, 7], [3, 4, 8, 100, 31, 22, 17]]
    base = load_hf(path, device=device)
    plain = [r.token_ids for r in generate(base, prompts, GREEDY)]
    load_peft_adapter(base, adapter)
    want = [r.token_ids for r in generate(base, prompts, GREEDY)]
    assert want != plain
    llm = LLM(str(path), config=EngineConfig(block_size=4, num_blocks=128), adapters={"ad": str(adapter)},
              device=device, dtype="float32")
    assert all(isinstance(m, QuantLinear) for m in quantized_linears(llm.engine.model).values())
    out = llm.generate(prompts + prompts, GREEDY, adapter=["ad", "ad", None, None])
    assert [o.token_ids for o in out] == want + plain


def test_group_size_that_does_not_divide_is_one_line_naming_layer_and_fix(ckpt, tmp_path, capsys):
    assert main(["quantize", str(ckpt), "--method", "int4", "--group-size", "48", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "layers.0.attn.q_proj" in err and "group_size=32" in err, err
    assert not (tmp_path / "q").exists()
    model = load_hf(ckpt)  # QAT's default group 128 on d_model 64 (was a raw ValueError traceback)
    with pytest.raises(ConfigError, match=r"'layers\.0\.attn\.q_proj' has 64: use group_size=64"):
        apply_qat(model)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}))
    train = ["train", f"model.path={ckpt}", f"data.path={data}", "train.max_steps=1",
             f"train.output_dir={tmp_path / 'run'}", "train.device=cpu", "train.progress=false", "train.tensorboard=false"]
    assert main([*train, "method=qat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'layers.0.attn.q_proj' has 64: use qat.group_size=64" in err, err
    assert main([*train, "method=qlora", "qlora.block_size=63"]) == 2  # NF4 packs two codes per byte (was a traceback)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "config key 'qlora.block_size': Input should be a multiple of 2 (got 63)" in err, err


@pytest.mark.parametrize("arch,head", [("LlamaForCausalLM", "int8"), ("Qwen2ForCausalLM", "int4")])
def test_quantize_lm_head_writes_a_checkpoint_every_verb_loads(ckpt, tmp_path, capsys, arch, head):
    """`lmforge quantize --lm-head int8|int4` quantizes the output head too (a tied head is untied: the embedding
    stays full precision); generate reads the result and gives the in-memory model's greedy text; the head's
    logits stay near the full-precision head's. Formats that keep lm_head refuse it in one line."""
    src = ckpt if arch == "LlamaForCausalLM" else make_tiny_checkpoint(tmp_path / "tied", arch)
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--method", "int4", "--group-size", "32", "--lm-head", head,
                 "--out", str(out)]) == 0
    base = load_hf(src, progress=False)
    assert base.cfg.tie_embeddings == (arch != "LlamaForCausalLM")
    model = copy.deepcopy(base)
    quantize_model(model, "int4", group_size=32, lm_head=head)
    prepare_fast_path(model, torch.float32)  # the kernels load_hf installs for this device (the same per shape)
    loaded = load_hf(out, progress=False)
    kind = {"int8": Int8Linear, "int4": Int4Linear}[head]
    assert isinstance(loaded.lm_head, kind) and type(loaded.embed) is torch.nn.Embedding
    assert not loaded.cfg.tie_embeddings and loaded.quantization_config["lm_head"] == head
    assert torch.equal(loaded.embed.weight, base.embed.weight)  # the lookup stays full precision
    ids = torch.randint(0, base.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, full = loaded(ids), model(ids), base.logits(model.hidden_states(ids))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    rel = float((got - full).abs().max() / full.abs().max())  # quantized, near the full-precision head
    assert 0 < rel < {"int8": 0.02, "int4": 0.2}[head], rel
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "Hello world", "--max-new-tokens", "4", "temperature=0",
                 "--ignore-eos", "--stream", "false", "--device", "cpu", "--dtype", "float32"]) == 0
    tok = Tokenizer.from_dir(out)
    text = generate(model, [tok.encode("Hello world")], GREEDY.model_copy(update={"max_new_tokens": 4}), tokenizer=tok)
    assert capsys.readouterr().out.rstrip("\n") == text[0].text
    assert main(["quantize", str(src), "--method", "int4", "--format", "gptq", "--group-size", "32", "--lm-head",
                 head, "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "lm_head" in err and "set lm_head=keep" in err, err


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["lmforge", "gptq", "awq"])
def test_quantized_checkpoints_load_on_cuda_with_its_kernels(q4, tmp_path, fmt):
    """On CUDA, load_hf installs on every INT4 layer of each format the kernel that verifies there; logits (prefill
    and one-row decode, bf16) stay close to the CPU model's."""
    from lmforge.quant.formats import save_format

    model, _ = q4
    save_format(model, tmp_path / fmt, fmt)
    loaded = load_hf(tmp_path / fmt, device="cuda", dtype="bfloat16")
    layers = quantized_linears(loaded)
    assert layers
    for layer in layers.values():  # the loader installed whatever kernel verifies here: Triton's need no conversion
        name = copy.deepcopy(layer).prepare_fast_path(torch.bfloat16)
        assert name is not None
        assert (layer._fast is None) == name.startswith("triton"), name
        assert layer.layout == ("kn" if name.startswith("triton") else "nk")  # re-laid K-major for the kernels
    ids = torch.randint(0, model.cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
        for got in (loaded(ids.cuda()), loaded(ids[:, :1].cuda())):
            want = ref[:, : got.shape[1]]
            assert (got.float().cpu() - want).abs().max() <= 5e-2 * want.abs().max()


def test_lora_trains_through_a_loaded_quantized_checkpoint_at_decode_sized_batches(q4):
    """load_hf installs the fused kernels (no backward); a LoRA on the loaded model still gets the gradients it gets
    on the in-memory quantized model (reference path), also for batches of <= 16 rows."""
    from lmforge.peft.lora import LoraConfig, apply_lora, lora_layers

    model, path = q4
    grads = []
    for m in (load_hf(path), copy.deepcopy(model)):
        torch.manual_seed(0)
        apply_lora(m, LoraConfig(r=4, target_modules="all-linear"))
        for layer in lora_layers(m).values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        m(torch.tensor([[5, 9, 13, 2]])).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad]))
    err = (grads[0] - grads[1]).norm() / grads[1].norm()  # the first block's frozen input may take the kernel
    assert grads[1].abs().sum() > 0 and err < 1e-2, err


@pytest.mark.parametrize("stage,method,want", [
    ("sft", "full", "method full cannot train a quantized checkpoint ('layers.0.attn.q_proj' and 13 more hold "
                    "frozen int4 codes): use method=lora or qlora"),
    ("dpo", "full", "method full cannot train a quantized checkpoint"),
    ("sft", "qat", "QAT targets 'all-linear' match no full-precision linear layer (already quantized"),
    ("sft", "bitnet", "BitNet targets 'all-linear' match no full-precision linear layer (already quantized")])
def test_training_a_quantized_checkpoint_refuses_what_it_cannot_train_or_save(q4, tmp_path, capsys, stage, method,
                                                                             want):
    """Full fine-tuning (and QAT) of a quantized checkpoint would train only embeddings and norms, then write a final
    checkpoint without the quantized weights that no verb loads: one line before training, pointing at LoRA."""
    row = ({"prompt": "hi", "chosen": "yo", "rejected": "no"} if stage == "dpo" else
           {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(row) + "\n")
    args = ["train", f"stage={stage}", f"method={method}", f"model.path={q4[1]}", f"data.path={data}",
            "train.max_steps=1", f"train.output_dir={tmp_path / 'run'}", "train.device=cpu", "train.progress=false",
            "train.tensorboard=false"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert want in err, err
    assert not (tmp_path / "run" / "final").exists()


def test_tokenizer_resize_keeps_a_quantized_checkpoint_quantized(q4, tmp_path, capsys):
    """`lmforge tokenizer resize` on a quantized checkpoint wrote the embeddings and norms only (save_hf), a checkpoint
    no verb loaded; now the linears stay quantized and the old ids compute what they did."""
    model, path = q4
    bigger = make_tiny_checkpoint(tmp_path / "tok600", vocab_size=600)
    assert main(["tokenizer", "resize", str(path), str(bigger), "--out", str(tmp_path / "r")]) == 0
    resized = load_hf(tmp_path / "r")
    assert resized.cfg.vocab_size == 600 and quantized_linears(resized).keys() == quantized_linears(model).keys()
    ids = torch.arange(1, 21)[None]
    with torch.no_grad():
        torch.testing.assert_close(resized(ids)[..., :512], model(ids), atol=1e-5, rtol=1e-5)
