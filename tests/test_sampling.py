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
    with pytest.raises(ValueError, match="repetition_penalty"):  # inf/NaN are refused, not sampled around
        SamplingParams(repetition_penalty=float("inf"))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-40), SamplingParams(temperature=1e-30, top_p=0.5, top_k=3),
    SamplingParams(temperature=1e-4, repetition_penalty=1e-300), SamplingParams(repetition_penalty=1e300)])
def test_sampling_is_nan_safe_for_any_accepted_parameter(params):
    """Extreme but valid values (a temperature under the floor is greedy; penalties that overflow) draw a token of
    the vocabulary instead of feeding inf/NaN to multinomial."""
    logits = torch.tensor([[3.0, -1.0, 2.5, -4.0], [-2.0, -3.0, -1.5, -0.5]])
    seen = torch.tensor([[True, True, False, False], [True, True, True, True]])
    for g in (None, torch.Generator().manual_seed(0)):
        tokens = sample(logits, params, seen, generator=g)
        assert tokens.shape == (2,) and ((tokens >= 0) & (tokens < 4)).all()
    if params.temperature < 1e-5:
        assert params.greedy and torch.equal(sample(logits, params), logits.argmax(-1))


def test_batch_sampler_and_json_constraint_are_nan_safe():
    from lmforge.infer.sampling.batch import BatchSampler
    from lmforge.infer.sampling.json_constraint import JsonObjectConstraint

    class Row:
        def __init__(self, **kw):
            self.params, self.token_ids, self.num_prompt, self.generator = SamplingParams(**kw), [0, 1], 1, None

    rows = [Row(temperature=1e-40), Row(temperature=1e-3, repetition_penalty=1e-300), Row(temperature=1.0)]
    texts = ["{", "}", '"', "a", ":", "1", " ", "x"]
    constraint = JsonObjectConstraint(texts, 8)
    sampler = BatchSampler(rows, len(texts), torch.device("cpu"), {0: constraint.pick, 1: constraint.pick})
    assert sampler.greedy.tolist() == [True, False, False]
    logits = torch.randn(3, len(texts))
    logits[:, 0] = -5.0  # '{' is the only allowed start: the constraint must search for it
    tokens = sampler(logits).tokens.tolist()
    assert tokens[:2] == [0, 0] and 0 <= tokens[2] < len(texts)
    # a probability row full of inf / NaN (what a 1e-40 temperature made of it) still picks an allowed token
    for bad in (torch.full((len(texts),), float("nan")), torch.tensor([float("inf")] * len(texts))):
        assert constraint.pick(bad, False, None, 3) == 0
