"""Parity with transformers for every registered architecture, both directions (fp32, atol 1e-4)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge.errors import CheckpointError
from lmforge.models import REGISTRY, config_from_hf, load_hf, save_hf
from lmforge.testing import CUSTOM_CODE_ARCHS, PADDING_DEPENDENT_REFERENCE, TINY_HF_CONFIGS, make_tiny_hf_model

ATOL = 1e-4


def test_every_registered_architecture_has_a_parity_fixture():
    # custom-code checkpoints (ChatGLM) are compared with a reference forward in tests/test_glm.py instead
    assert set(REGISTRY) <= set(TINY_HF_CONFIGS) | CUSTOM_CODE_ARCHS


def _batch(vocab=128):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding in row 0
    return tokens, mask


@torch.no_grad()
def test_hf_to_lmforge_logits_match(tiny_hf):
    ref_model, path = tiny_hf
    model = load_hf(path, progress=False)
    tokens, mask = _batch()
    torch.testing.assert_close(model(tokens), ref_model(tokens).logits, atol=ATOL, rtol=0)
    real = mask.bool()
    got = model(tokens, attention_mask=mask)[real]
    # as HF generate does for left padding: positions count real tokens only (BLOOM derives them from the mask)
    extra = {} if model.cfg.pos == "alibi" else {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    want = ref_model(tokens, attention_mask=mask, **extra).logits[real]
    if model.cfg.arch in PADDING_DEPENDENT_REFERENCE or path.name in PADDING_DEPENDENT_REFERENCE:
        # the reference's padded forward depends on the padding; each row alone is the ground truth
        want = torch.cat([ref_model(row[m][None]).logits[0] for row, m in zip(tokens, real)])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@torch.no_grad()
def test_lmforge_to_hf_logits_match(tiny_hf, tmp_path):
    ref_model, path = tiny_hf
    model = load_hf(path, progress=False)
    out = save_hf(model, tmp_path / "saved", max_shard_size=30_000)  # force several shards
    assert (out / "model.safetensors.index.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == model.cfg.arch
    tokens, _ = _batch()
    torch.testing.assert_close(back(tokens).logits, model(tokens), atol=ATOL, rtol=0)
    # and lmforge reads its own sharded output back to the same config
    assert load_hf(out, progress=False).cfg == model.cfg


@torch.no_grad()
def test_kv_cache_decoding_equals_full_recompute(tiny_hf):
    _, path = tiny_hf
    model = load_hf(path, progress=False)
    tokens, mask = _batch()
    full = model(tokens, attention_mask=mask)
    cache = model.new_cache(batch_size=2, max_len=16)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, -1)
    steps = [model(tokens[:, :7], positions[:, :7], cache=cache, slots=torch.arange(7))]
    for t in range(7, 12):
        steps.append(model(tokens[:, t:t + 1], positions[:, t:t + 1], cache=cache, slots=torch.tensor([t])))
    incremental = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(incremental[real], full[real], atol=ATOL, rtol=0)


def test_config_from_hf_reads_transformers_v4_and_v5_rope_keys():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=16)
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    v4 = config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": scaling})
    v5 = config_from_hf({**base, "rope_parameters": {**scaling, "rope_theta": 500000.0}})
    assert v4 == v5
    assert v4.rope_theta == 500000.0 and v4.rope_scaling.factor == 32.0


def test_unknown_architecture_is_one_line_listing_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    with pytest.raises(CheckpointError) as e:
        load_hf(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "T5ForConditionalGeneration" in msg
    assert all(arch in msg for arch in REGISTRY)


def test_shape_mismatch_and_unsupported_rope_scaling_are_one_line(tmp_path):
    make_tiny_hf_model("LlamaForCausalLM", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 256}))
    with pytest.raises(CheckpointError, match=r"has shape \(\d+, \d+\), config.json implies \(\d+, \d+\)"):
        load_hf(tmp_path, progress=False)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "ntk-by-magic", "factor": 4}}))
    with pytest.raises(CheckpointError, match=r"rope_scaling.rope_type='ntk-by-magic' is not supported; supported: .*yarn"):
        load_hf(tmp_path, progress=False)


def test_missing_directory_and_bin_only_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 10,
                                                      "hidden_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 16}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_hf(tmp_path)


@pytest.mark.parametrize("windows", [dict(max_window_layers=1), dict(layer_types=["sliding_attention", "full_attention"])],
                         ids=["max_window_layers", "layer_types"])
@torch.no_grad()
def test_qwen2_per_layer_sliding_windows_both_directions(tmp_path, windows):
    """Qwen2 long-context configs window only some layers (use_sliding_window + max_window_layers / layer_types)."""
    torch.manual_seed(0)
    ref = make_tiny_hf_model("Qwen2ForCausalLM", tmp_path / "q", use_sliding_window=True, sliding_window=4, **windows)
    model = load_hf(tmp_path / "q", progress=False)
    expected_layer = 1 if "max_window_layers" in windows else 0
    assert model.cfg.sliding_window == 4 and model.cfg.sliding_window_layers == (expected_layer,)
    tokens, mask = _batch()
    torch.testing.assert_close(model(tokens), ref(tokens).logits, atol=ATOL, rtol=0)
    cache = model.new_cache(batch_size=2, max_len=12)
    steps = [model(tokens[:, :3], cache=cache, slots=torch.arange(3))]
    steps += [model(tokens[:, t:t + 1], cache=cache, slots=torch.tensor([t])) for t in range(3, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), model(tokens), atol=ATOL, rtol=0)
    back = AutoModelForCausalLM.from_pretrained(save_hf(model, tmp_path / "out")).eval()
    torch.testing.assert_close(back(tokens).logits, model(tokens), atol=ATOL, rtol=0)
    assert load_hf(tmp_path / "out", progress=False).cfg == model.cfg
