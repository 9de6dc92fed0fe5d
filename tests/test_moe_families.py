"""Today's open MoE families: DeepSeek-V3 (MLA + group-limited sigmoid router), GLM-4.5, Qwen3-MoE, gpt-oss (sinks,
clamped SwiGLU, MXFP4) and Llama 4 (chunked attention, NoPE, input-scaled experts).

The logit parity of each family (plain and left-padded batches, cached decode, save back to transformers) runs in
tests/test_hf_parity.py from `lmforge.testing.TINY_HF_CONFIGS`; here: routing decisions against transformers'
routers, the latent KV cache, the quantized-weight formats, the engine, LoRA training and the presets.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.infer import LLM, EngineConfig, SamplingParams, generate
from lmforge.models import load_hf, save_hf
from lmforge.models.dequant import fp8_block_dequant, mxfp4_dequant
from lmforge.models.moe import MoE
from lmforge.testing import make_tiny_hf_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

FAMILIES = ["DeepseekV3ForCausalLM", "Glm4MoeForCausalLM", "Qwen3MoeForCausalLM", "GptOssForCausalLM",
            "Llama4ForCausalLM"]
# Families whose checkpoints stack the experts in one tensor: a PEFT adapter can hold LoRA on attention only.
STACKED_EXPERTS = {"GptOssForCausalLM", "Llama4ForCausalLM"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> (transformers model, checkpoint dir), built once per module."""
    cache = {}

    def get(arch):
        if arch not in cache:
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(arch)
            cache[arch] = make_tiny_hf_model(arch, path), path
        return cache[arch]

    return get


# ------------------------------------------------------------------------------------------------ published configs

# config.json of published checkpoints, as on the Hub (DeepSeek-R1's, which has DeepSeek-V3's architecture and
# values; gpt-oss-20b's), read by the converters: they must give exactly the presets.
_DEEPSEEK_R1 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
_GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}


@pytest.mark.parametrize("name,hf", [("deepseek-v3", _DEEPSEEK_R1), ("gpt-oss-20b", _GPT_OSS_20B)])
def test_published_configs_read_as_their_presets(name, hf):
    from lmforge.models import config_from_hf, preset_config

    assert config_from_hf(hf) == preset_config(name)
    assert preset_config(name).softmax_scale == pytest.approx(
        (hf.get("qk_nope_head_dim", 0) + hf.get("qk_rope_head_dim", 0)) ** -0.5 * (0.1 * math.log(40) + 1) ** 2
        if name == "deepseek-v3" else 64 ** -0.5)


# ------------------------------------------------------------------------------------------------ routing


def _hf_routing(arch: str, layer, h: torch.Tensor):
    """(expert indices (N, k), weights (N, k)) of transformers' router for hidden states h (N, d)."""
    if arch in ("DeepseekV3ForCausalLM", "Glm4MoeForCausalLM", "Qwen3MoeForCausalLM"):
        _, weights, experts = layer.mlp.gate(h)
    elif arch == "GptOssForCausalLM":
        _, weights, experts = layer.mlp.router(h)
    else:  # Llama 4: sigmoid scores (N, E), 0 off the top-k
        scores, logits = layer.feed_forward.router(h)
        experts = logits.topk(layer.feed_forward.router.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
    return experts, weights


@pytest.mark.parametrize("arch", FAMILIES)
@torch.no_grad()
def test_router_picks_the_experts_transformers_picks(tiny, arch):
    ref, path = tiny(arch)
    model = load_hf(path, progress=False)
    hf_layers = ref.model.layers
    checked = 0
    for i, block in enumerate(model.layers):
        if not isinstance(block.mlp, MoE):
            continue
        h = block.mlp_norm(torch.randn(256, model.cfg.d_model, generator=torch.Generator().manual_seed(i)))
        want_experts, want_weights = _hf_routing(arch, hf_layers[i], h)
        got = block.mlp.router(h)
        order_want, order_got = want_experts.argsort(-1), got.experts.argsort(-1)
        assert torch.equal(got.experts.gather(1, order_got), want_experts.gather(1, order_want))
        torch.testing.assert_close(got.weights.gather(1, order_got), want_weights.float().gather(1, order_want),
                                   atol=1e-6, rtol=1e-5)
        assert len(got.experts.unique()) >= model.cfg.moe_experts // 2  # the test really routes to many experts
        checked += 1
    assert checked >= 1


@torch.no_grad()
def test_group_limited_routing_excludes_groups(tiny):
    """DeepSeek-V3's fixture: 8 experts in 4 groups, a token may use 2 groups. The chosen experts always lie in at
    most 2 groups, and for a good share of tokens that changes the choice (it differs from a plain top-k)."""
    _, path = tiny("DeepseekV3ForCausalLM")
    model = load_hf(path, progress=False)
    cfg = model.cfg
    assert (cfg.moe_groups, cfg.moe_topk_groups) == (4, 2)
    router = model.layers[1].mlp.router
    h = model.layers[1].mlp_norm(torch.randn(400, cfg.d_model, generator=torch.Generator().manual_seed(0)))
    experts = router(h).experts
    groups = experts // (cfg.moe_experts // cfg.moe_groups)
    assert all(len(set(g)) <= cfg.moe_topk_groups for g in groups.tolist())
    ungrouped = (torch.sigmoid(h @ router.weight.T) + router.score_bias).topk(cfg.moe_top_k).indices
    changed = (ungrouped.sort(-1).values != experts.sort(-1).values).any(-1).float().mean()
    assert changed > 0.1
    # the selection bias steers the choice but never the weights: weights are the raw sigmoid scores, normalized
    scores = torch.sigmoid(h @ router.weight.T).gather(1, experts)
    torch.testing.assert_close(router(h).weights, scores / scores.sum(-1, keepdim=True) * cfg.moe_routed_scale)


# ------------------------------------------------------------------------------------------------ MLA


@torch.no_grad()
def test_mla_cache_holds_the_latent_and_absorbed_decode_equals_expanded(tiny, monkeypatch):
    _, path = tiny("DeepseekV3ForCausalLM")
    model = load_hf(path, progress=False)
    cfg = model.cfg
    cache = model.new_cache(batch_size=2, max_len=16)
    assert cache.k.shape == (cfg.n_layers, 2, 1, 16, cfg.mla_kv_rank)  # the normed latent, not per-head keys
    assert cache.v.shape == (cfg.n_layers, 2, 1, 16, cfg.mla_rope_dim)  # the shared rotated key part
    per_head_kv = 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.mla_v_dim) // 2
    assert cfg.cache_values_per_token < per_head_kv / 4

    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))

    def decode(absorb: bool) -> torch.Tensor:
        monkeypatch.setattr(type(model.layers[0].attn), "_absorbs", lambda self, T: absorb)
        c = model.new_cache(batch_size=2, max_len=16)
        out = [model(tokens[:, :5], cache=c, slots=torch.arange(5))]
        out += [model(tokens[:, t:t + 1], cache=c, slots=torch.tensor([t])) for t in range(5, 12)]
        return torch.cat(out, 1)

    absorbed, expanded = decode(True), decode(False)
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=0)
    torch.testing.assert_close(expanded, model(tokens), atol=1e-5, rtol=0)


def test_mla_absorbs_only_when_it_is_cheaper_and_the_weight_is_plain(tiny):
    from lmforge.peft.lora import LoraConfig, apply_lora

    _, path = tiny("DeepseekV3ForCausalLM")
    model = load_hf(path, progress=False)
    attn = model.layers[0].attn
    assert attn._absorbs(1) and not attn._absorbs(64)  # r (nope + v) = 16 * 28 vs T (2r + rd) = T * 40
    apply_lora(model, LoraConfig(r=2, target_modules=["kv_b_proj"]))
    assert not attn._absorbs(1)  # a LoRA-wrapped kv_b_proj computes more than its weight: expand instead


# ------------------------------------------------------------------------------------------------ quantized formats


def _e2m1(code: int) -> float:
    """The E2M1 value of a 4-bit code, from the bit layout (sign, 2 exponent bits, 1 mantissa bit)."""
    sign, exp, man = code >> 3, (code >> 1) & 3, code & 1
    mag = man * 0.5 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1)
    return -mag if sign else mag


def _pack_mxfp4(codes: torch.Tensor) -> torch.Tensor:
    """(..., G, 32) codes -> (..., G, 16) bytes, even elements in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def test_mxfp4_dequant_of_a_hand_packed_tensor():
    # one row of two 32-value blocks: the 16 codes in order twice, scaled by 2^1 and 2^-2
    codes = torch.arange(16).repeat(4).view(1, 2, 32)
    scales = torch.tensor([[128, 125]], dtype=torch.uint8)  # E8M0: 2^(e - 127)
    got = mxfp4_dequant(_pack_mxfp4(codes), scales)
    want = torch.tensor([[_e2m1(c) * 2.0 ** (128 - 127) for c in range(16)] * 2
                         + [_e2m1(c) * 2.0 ** (125 - 127) for c in range(16)] * 2])
    assert got.shape == (1, 64)
    assert torch.equal(got, want)
    assert got[0, :8].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]
    byte = _pack_mxfp4(codes)[0, 0, 0].item()
    assert byte == 0 | (1 << 4)  # first byte: code 0 (low nibble, element 0), code 1 (high nibble, element 1)


def test_fp8_block_dequant_scales_each_tile():
    w = torch.randn(200, 130).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 2) + 0.5
    got = fp8_block_dequant(w, scale)
    assert torch.equal(got[:128, :128], w[:128, :128].float() * scale[0, 0])
    assert torch.equal(got[128:, 128:], w[128:, 128:].float() * scale[1, 1])
    assert torch.equal(got[:128, 128:], w[:128, 128:].float() * scale[0, 1])


@torch.no_grad()
def test_gpt_oss_mxfp4_checkpoint_loads_its_dequantized_experts(tiny, tmp_path):
    """A gpt-oss checkpoint whose experts are stored as MXFP4 blocks/scales (as released) loads to the model whose
    experts hold the dequantized values: logits match transformers holding those same values."""
    torch.manual_seed(1)
    ref = make_tiny_hf_model("GptOssForCausalLM", tmp_path / "plain")
    g = torch.Generator().manual_seed(2)
    quantized = {}
    for i, layer in enumerate(ref.model.layers):
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(layer.mlp.experts, name)  # (E, in, out)
            E, n_in, n_out = p.shape
            codes = torch.randint(0, 16, (E, n_out, n_in // 32, 32), generator=g)
            scales = torch.randint(122, 128, (E, n_out, n_in // 32), generator=g).to(torch.uint8)
            lut = torch.tensor([_e2m1(c) for c in range(16)])
            values = (lut[codes] * 2.0 ** (scales.float() - 127)[..., None]).flatten(-2)  # (E, out, in)
            p.copy_(values.transpose(1, 2))
            quantized[f"model.layers.{i}.mlp.experts.{name}_blocks"] = _pack_mxfp4(codes)
            quantized[f"model.layers.{i}.mlp.experts.{name}_scales"] = scales
    ref.save_pretrained(tmp_path / "mxfp4")
    file = tmp_path / "mxfp4" / "model.safetensors"
    tensors = {k: v for k, v in load_file(file).items() if not k.endswith(("gate_up_proj", "down_proj"))}
    save_file({**tensors, **quantized}, file, metadata={"format": "pt"})
    config = json.loads((tmp_path / "mxfp4" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "self_attn"]}
    (tmp_path / "mxfp4" / "config.json").write_text(json.dumps(config))

    model = load_hf(tmp_path / "mxfp4", progress=False)
    tokens = torch.randint(0, 128, (2, 10), generator=g)
    torch.testing.assert_close(model(tokens), ref(tokens).logits, atol=1e-4, rtol=0)
    # a blocks tensor without its scales is a one-line error, not a silent skip
    save_file({k: v for k, v in load_file(file).items() if k != "model.layers.1.mlp.experts.down_proj_scales"}, file)
    with pytest.raises(Exception, match="down_proj_blocks' without .*down_proj_scales'"):
        load_hf(tmp_path / "mxfp4", progress=False)


@torch.no_grad()
def test_fp8_checkpoint_with_mtp_layers_loads_dequantized_and_skips_the_mtp(tmp_path):
    """DeepSeek-V3 / Kimi-K2 ship e4m3 weights with 128x128-tile scales and a multi-token-prediction layer after the
    last one: the weights load dequantized (logits equal transformers holding the same values) and the MTP tensors
    are skipped."""
    import shutil

    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    make_tiny_hf_model("DeepseekV3ForCausalLM", tmp_path / "ckpt")
    shutil.copytree(tmp_path / "ckpt", tmp_path / "dequantized")
    file = tmp_path / "ckpt" / "model.safetensors"
    tensors, plain = load_file(file), {}
    for name, t in list(tensors.items()):
        if name.endswith("proj.weight") and ".layers." in name:
            fp8 = (t / t.abs().max() * 400).to(torch.float8_e4m3fn)  # one 128x128 tile covers these tiny weights
            scale = torch.tensor([[float(t.abs().max() / 400)]])
            tensors[name], tensors[name + "_scale_inv"] = fp8, scale
            t = fp8.float() * scale  # what the checkpoint now means
        plain[name] = t
    save_file(plain, tmp_path / "dequantized" / "model.safetensors", metadata={"format": "pt"})
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized").eval()
    n = ref.config.num_hidden_layers
    tensors[f"model.layers.{n}.eh_proj.weight"] = torch.randn(64, 128)  # an MTP module's tensors
    tensors[f"model.layers.{n}.mlp.experts.0.up_proj.weight"] = torch.randn(32, 64).to(torch.float8_e4m3fn)
    tensors[f"model.layers.{n}.mlp.experts.0.up_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, file, metadata={"format": "pt"})
    model = load_hf(tmp_path / "ckpt", progress=False)
    tokens = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(model(tokens), ref(tokens).logits, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ engine, training


@pytest.mark.parametrize("arch", FAMILIES)
def test_engine_greedy_equals_generate(tiny, arch):
    _, path = tiny(arch)
    model = load_hf(path, progress=False)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 120, (n,), generator=g).tolist() for n in (3, 17, 9, 30, 1, 22)]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    want = [r.token_ids for r in generate(model, prompts, params)]
    llm = LLM(model, None, config=EngineConfig(block_size=4, num_blocks=256, max_num_batched_tokens=32,
                                                max_model_len=64, decode_steps=3))
    assert [o.token_ids for o in llm.generate(prompts, params)] == want


@pytest.mark.parametrize("arch", ["DeepseekV3ForCausalLM", "GptOssForCausalLM", "Llama4ForCausalLM"])
def test_paged_kernel_refuses_what_it_cannot_compute_by_name(tiny, arch, caplog):
    """MLA (the pool holds latents), sinks and chunked attention are not in the paged decode kernel: asking for it is
    a one-line error naming the feature, and `kernel_unsupported` is what the runner logs when it falls back."""
    from lmforge.errors import ConfigError
    from lmforge.infer.engine.model_runner import kernel_unsupported

    _, path = tiny(arch)
    model = load_hf(path, progress=False)
    feature = {"DeepseekV3ForCausalLM": "multi-head latent attention", "GptOssForCausalLM": "attention sinks",
               "Llama4ForCausalLM": "chunked attention"}[arch]
    assert any(feature in reason for reason in kernel_unsupported(model.cfg))
    with pytest.raises(ConfigError, match=f"engine.attention=kernel needs .*no {feature}") as e:
        LLM(model, None, config=EngineConfig(block_size=4, num_blocks=64, max_model_len=64, attention="kernel"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch", FAMILIES)
def test_lora_training_through_the_cli_lowers_the_loss(arch, tmp_path):
    from lmforge.cli import main
    from lmforge.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", arch=arch, vocab_size=300)
    rows = [{"text": "the quick brown fox jumps over the lazy dog " * 3} for _ in range(16)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"

    def config(targets: str) -> str:
        (tmp_path / "train.yaml").write_text(
            f"model: {{path: {ckpt}}}\nmethod: lora\n{targets}"
            f"data: {{path: {tmp_path / 'data.jsonl'}, max_seq_len: 32}}\noptim: {{lr: 0.01}}\n"
            f"train: {{output_dir: {out}, max_steps: 8, micro_batch_size: 4, device: cpu, progress: false, "
            "tensorboard: false}\n")
        return str(tmp_path / "train.yaml")

    if arch in STACKED_EXPERTS:  # default targets include the stacked experts: refused before any step runs
        assert main(["train", config("")]) == 2
        assert not (out / "metrics.jsonl").exists()
    config("lora: {target_modules: [q_proj, k_proj, v_proj, o_proj]}\n" if arch in STACKED_EXPERTS else "")
    assert main(["train", str(tmp_path / "train.yaml")]) == 0
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.2


@pytest.mark.gpu
@pytest.mark.parametrize("arch", FAMILIES)
def test_gpu_engine_greedy_equals_generate(tiny, arch):
    """On CUDA: CUDA-graph decode steps (MoE dispatch without host syncs), the paged kernel where the family allows
    it (Qwen3-MoE, GLM-4.5) or the gathered view (MLA, sinks, chunks), against generate(); and a bf16 load keeps the
    sigmoid router in fp32."""
    from lmforge.models.moe import SigmoidRouter

    _, path = tiny(arch)
    model = load_hf(path, progress=False, device="cuda")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 120, (n,), generator=g).tolist() for n in (3, 17, 9, 30, 1, 22)]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    want = [r.token_ids for r in generate(model, prompts, params)]
    llm = LLM(model, None, config=EngineConfig(block_size=16, num_blocks=64, max_model_len=64, decode_steps=3))
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    assert llm.engine.runner.paged_kernel == (arch in ("Qwen3MoeForCausalLM", "Glm4MoeForCausalLM"))
    half = load_hf(path, progress=False, device="cuda", dtype=torch.bfloat16)
    routers = [m for m in half.modules() if isinstance(m, SigmoidRouter)]
    assert all(r.weight.dtype == torch.float32 for r in routers)
    assert torch.isfinite(half(torch.tensor([prompts[1]], device="cuda")).float()).all()
