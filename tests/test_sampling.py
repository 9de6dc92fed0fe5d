"""Logits pipeline against hand-computed distributions."""
from __future__ import annotations

import math

import pytest
import torch

from lmforge.infer import SamplingParams, apply_repetition_penalty, sample, top_k_filter, top_p_filter


def _probs_from(p):
    return torch.tensor([p]).log()  # logits whose softmax is p


def test_top_k_keeps_k_largest_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0]])
    assert top_k_filter(logits, 2).isfinite().tolist() == [[False, True, False, True, False]]
    assert top_k_filter(logits, 3).isfinite().tolist() == [[False, True, True, True, False]]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_smallest_set_reaching_p():
    logits = _probs_from([0.5, 0.2, 0.15, 0.1, 0.05])
    # 0.5 < 0.6 → need 0.2 as well (0.7 >= 0.6); the rest go
    assert top_p_filter(logits, 0.6).isfinite().tolist() == [[True, True, False, False, False]]
    # exactly reaching p stops there: 0.5 + 0.2 = 0.7
    assert top_p_filter(logits, 0.7).isfinite().tolist() == [[True, True, False, False, False]]
    assert top_p_filter(logits, 0.71).isfinite().tolist() == [[True, True, True, False, False]]
    # always at least one token, even for tiny p
    assert top_p_filter(logits, 1e-6).isfinite().sum() == 1
    # renormalized distribution after top-p 0.8: {0.5, 0.2, 0.15} / 0.85
    kept = top_p_filter(logits, 0.8).softmax(-1)[0, :3]
    torch.testing.assert_close(kept, torch.tensor([0.5, 0.2, 0.15]) / 0.85)


def test_top_p_works_on_unsorted_rows_independently():
    logits = torch.cat([_probs_from([0.1, 0.6, 0.3]), _probs_from([0.35, 0.25, 0.4])])
    assert top_p_filter(logits, 0.65).isfinite().tolist() == [[False, True, True], [True, False, True]]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_order_is_temperature_then_top_k_then_top_p():
    # temperature 0.5 squares the odds: p ∝ [0.4², 0.3², 0.2², 0.1²] = [.16, .09, .04, .01] / .30
    logits = _probs_from([0.4, 0.3, 0.2, 0.1])
    params = SamplingParams(temperature=0.5, top_k=3, top_p=0.8, seed=0)
    # after top-k 3: [.16, .09, .04]/.29 = [.552, .310, .138]; top-p 0.8 keeps the first two
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, params, generator=g) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / draws.numel()
    assert freq[2] == 0 and freq[3] == 0
    assert math.isclose(freq[0].item(), 16 / 25, abs_tol=0.03)


def test_greedy_and_seeded_sampling_are_deterministic():
    logits = torch.randn(3, 50)
    assert torch.equal(sample(logits, SamplingParams(temperature=0)), logits.argmax(-1))
    a = sample(logits, SamplingParams(), generator=torch.Generator().manual_seed(7))
    b = sample(logits, SamplingParams(), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_bad_params_name_the_field():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
