"""The promotion rule on figures whose answer is known: real differences are promoted, noise is not, a worse
candidate is rolled back, and the tests' exact p-values match their textbook values."""

import math
import random

from appliance.release.settings import ReleaseConfig
from appliance.release.rule import (ADVANCE, PROMOTE, ROLLBACK, WAIT, VariantFigures, accuracy_check,
                                    binomial_tail, decide, error_check, p99_check)

RULE = ReleaseConfig(min_samples=200, shadow_min_samples=50)


def _variant(n: int, errors: int, mean_s: float, passed: dict | None = None, seed: int = 1) -> VariantFigures:
    rng = random.Random(seed)
    return VariantFigures(n, errors, tuple(rng.expovariate(1 / mean_s) for _ in range(n - errors)), passed or {})


def _eval(items: int, passed: int, offset: int = 0) -> dict:
    return {f"item-{i}": (i + offset) % items < passed for i in range(items)}


def test_exact_binomial_tails():
    assert math.isclose(binomial_tail(8, 10, 0.5, upper=True), 56 / 1024)
    assert math.isclose(binomial_tail(2, 10, 0.5, upper=False), 56 / 1024)
    assert binomial_tail(0, 0, 0.5, upper=True) == 1.0


def test_a_clearly_better_candidate_is_promoted():
    live = _variant(400, 40, 4.0, _eval(220, 120))
    candidate = _variant(400, 4, 2.0, _eval(220, 150), seed=2)
    decision = decide("ab", live, candidate, VariantFigures(), VariantFigures(), RULE)
    assert decision.action == PROMOTE, decision
    assert all(c.met and not c.worse for c in decision.checks)
    assert decision.candidate["accuracy"] > decision.live["accuracy"]


def test_noise_is_not_an_improvement():
    """The same model twice: figures differ by chance only, so nothing is met and nothing is worse."""
    live, candidate = _variant(300, 6, 3.0, _eval(220, 140)), _variant(300, 6, 3.0, _eval(220, 140), seed=9)
    decision = decide("ab", live, candidate, VariantFigures(), VariantFigures(), RULE)
    assert decision.action == WAIT and not any(c.met or c.worse for c in decision.checks), decision


def test_a_small_sample_waits_even_when_it_looks_better():
    live, candidate = _variant(50, 5, 4.0, _eval(220, 120)), _variant(50, 0, 2.0, _eval(220, 160), seed=3)
    decision = decide("ab", live, candidate, VariantFigures(), VariantFigures(), RULE)
    assert decision.action == WAIT and "200 each" in decision.reason


def test_a_worse_candidate_is_rolled_back_on_any_figure():
    live = _variant(300, 3, 3.0, _eval(220, 140))
    failing = _variant(300, 30, 3.0, _eval(220, 140), seed=4)
    assert decide("ab", live, failing, VariantFigures(), VariantFigures(), RULE).action == ROLLBACK
    slow = _variant(300, 3, 9.0, _eval(220, 140), seed=5)
    assert p99_check(live, slow, RULE).worse
    wrong = _variant(300, 3, 3.0, _eval(220, 90))
    assert accuracy_check(live, wrong, RULE).worse


def test_accuracy_is_paired_by_item():
    """Same total, different items: no gain, and the discordant items decide the test."""
    live, candidate = VariantFigures(eval_passed=_eval(100, 60)), VariantFigures(eval_passed=_eval(100, 60, 30))
    check = accuracy_check(live, candidate, RULE)
    assert check.value == 0 and not check.met and not check.worse and "30 only the candidate" in check.note


def test_error_rate_when_the_live_model_makes_none():
    none = VariantFigures(300, 0, (1.0,) * 300)
    assert error_check(none, none, RULE).met
    some = VariantFigures(300, 6, (1.0,) * 294)
    check = error_check(none, some, RULE)
    assert not check.met and check.worse


def test_shadow_moves_on_or_rolls_back():
    live = VariantFigures(60, 0, (2.0,) * 60, _eval(10, 5))
    assert decide("shadow", VariantFigures(), VariantFigures(), live, live, RULE).action == ADVANCE
    unscored = VariantFigures(60, 0, (2.0,) * 60)
    assert "being scored" in decide("shadow", VariantFigures(), VariantFigures(), unscored, unscored, RULE).reason
    few = VariantFigures(10, 0, (2.0,) * 10)
    assert decide("shadow", VariantFigures(), VariantFigures(), few, few, RULE).action == WAIT
    broken = VariantFigures(10, 10, ())
    assert decide("shadow", VariantFigures(), VariantFigures(), broken, few, RULE).action == ROLLBACK


def test_a_threshold_of_zero_asks_only_for_no_worse():
    rule = ReleaseConfig(min_samples=3, min_accuracy_gain=0.0, min_p99_drop=0.0, min_error_drop=0.0)
    same = VariantFigures(10, 0, (1.0, 1.1, 0.9, 1.0, 1.2) * 2, _eval(10, 5))
    assert decide("ab", same, same, VariantFigures(), VariantFigures(), rule).action == PROMOTE


def test_a_few_dozen_latencies_decide_nothing():
    """Fifty answers each: their P99 is their maximum, so a slower or faster candidate is no evidence yet; only
    a "no worse" threshold can be met, on the figure itself."""
    live, slow, fast = (VariantFigures(50, 0, (x,) * 50) for x in (1.0, 3.0, 0.5))
    assert not any(c.met or c.worse for c in (p99_check(live, slow, RULE), p99_check(live, fast, RULE)))
    no_worse = ReleaseConfig(min_p99_drop=0.0)
    assert p99_check(live, fast, no_worse).met and not p99_check(live, slow, no_worse).met
