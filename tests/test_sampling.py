"""Sampling: greedy, seeded temperature sampling, top-k/top-p limits, repetition penalty, and refused values."""

import numpy as np
import pytest

from appliance.model.sampling import Sampler, SamplingParams

LOGITS = np.log(np.array([0.05, 0.5, 0.3, 0.1, 0.05], np.float32))


def test_greedy_takes_the_top_token():
    assert Sampler(SamplingParams(), []).__call__(LOGITS) == 1


def test_a_seed_makes_sampling_repeatable():
    def draws():
        sampler = Sampler(SamplingParams(temperature=1.0, seed=7), [])
        return [sampler(LOGITS) for _ in range(50)]

    assert draws() == draws()
    assert len(set(draws())) > 1


def test_top_k_one_and_tiny_top_p_are_greedy():
    assert {Sampler(SamplingParams(temperature=1.0, top_k=1, seed=s), [])(LOGITS) for s in range(20)} == {1}
    assert {Sampler(SamplingParams(temperature=1.0, top_p=0.01, seed=s), [])(LOGITS) for s in range(20)} == {1}


def test_top_k_limits_the_candidates():
    got = {Sampler(SamplingParams(temperature=2.0, top_k=2, seed=s), [])(LOGITS) for s in range(200)}
    assert got == {1, 2}


def test_sampling_follows_the_distribution():
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1), [])
    counts = np.bincount([sampler(LOGITS) for _ in range(4000)], minlength=5) / 4000
    np.testing.assert_allclose(counts, np.exp(LOGITS), atol=0.03)


def test_repetition_penalty_steers_away_from_seen_tokens():
    assert Sampler(SamplingParams(repetition_penalty=5.0), [1])(LOGITS) == 2
    sampler = Sampler(SamplingParams(repetition_penalty=5.0), [])
    assert [sampler(LOGITS) for _ in range(2)] == [1, 2]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_tokens=0),
                                 dict(repetition_penalty=0)])
def test_bad_values_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
