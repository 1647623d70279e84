"""The promotion rule: does the candidate beat the serving model by the design's margins, with evidence rather
than noise?

Three figures, each compared between the variants with a one-sided test at level `alpha`:
- accuracy on the evaluation set, paired by item (both variants answer the same items): the gain is
  (items only the candidate passes − items only the live model passes) / items, and it is real when the exact
  McNemar test on those discordant items says so;
- P99 latency of served answers: the ratio candidate / live, with a bootstrap interval (2,000 resamples, a fixed
  seed, so a decision can be recomputed from the stored samples), once each variant has 100 answers (the P99 of
  fewer is their maximum: no evidence either way);
- error rate of served answers (engine errors, timeouts, filter-blocked and empty answers): errors are rare events,
  so the conditional binomial test for a ratio of two Poisson rates, exact at any count. When the live model made
  no errors at all there is nothing to halve: the condition is then that the candidate made none either.

Promotion needs all three, each past its threshold and significant, over at least `min_samples` served answers of
each variant. Shadow also waits for the evaluation set to be scored for both variants (at idle moments: in A/B it
would compete with the answers whose latency is being compared). A threshold of 0 or below asks only that the
candidate be no worse than it (a branch that replaces its model for another reason, a licence or a vendor, sets 0),
so no significance is asked of that figure. Rollback needs one figure significantly worse. Shadow traffic moves on
to A/B once the candidate has `shadow_min_samples` shadow answers and an error rate not significantly worse than the
live model's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from appliance.release.settings import ReleaseConfig

WAIT, ADVANCE, PROMOTE, ROLLBACK = "wait", "advance", "promote", "rollback"
MIN_LATENCIES = 100  # below this the P99 is the sample's maximum, and a bootstrap of it no evidence either way


@dataclass(frozen=True)
class VariantFigures:
    answers: int = 0
    errors: int = 0
    latencies: tuple[float, ...] = field(default=(), repr=False)
    eval_passed: dict[str, bool] = field(default_factory=dict, repr=False)  # item id -> passed

    @property
    def error_rate(self) -> float:
        return self.errors / self.answers if self.answers else 0.0

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies, q)) if self.latencies else None

    @property
    def accuracy(self) -> float | None:
        return sum(self.eval_passed.values()) / len(self.eval_passed) if self.eval_passed else None

    def summary(self) -> dict:
        return {"answers": self.answers, "errors": self.errors, "error_rate": round(self.error_rate, 4),
                "p50_s": _round(self.percentile(50)), "p99_s": _round(self.percentile(99)),
                "accuracy": _round(self.accuracy), "eval_items": len(self.eval_passed)}


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None  # the candidate's change: accuracy gain, P99 drop, error-rate drop (fractions)
    threshold: float
    met: bool  # past the threshold, and significant
    worse: bool  # significantly worse than the live model
    p: float | None  # the test's p-value for the improvement
    note: str = ""


@dataclass(frozen=True)
class Decision:
    action: str  # wait, advance (shadow -> A/B), promote, rollback
    reason: str
    checks: tuple[Check, ...] = ()
    live: dict = field(default_factory=dict)
    candidate: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"action": self.action, "reason": self.reason, "live": self.live, "candidate": self.candidate,
                "checks": [asdict(c) for c in self.checks]}


def _met(value: float, threshold: float, p: float | None, alpha: float) -> bool:
    return value >= threshold and (threshold <= 0 or (p is not None and p <= alpha))


def binomial_tail(k: int, n: int, p: float, upper: bool) -> float:
    """P(X >= k) (upper) or P(X <= k) for X ~ Binomial(n, p), exactly."""
    terms = range(k, n + 1) if upper else range(0, k + 1)
    return min(1.0, sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in terms))


def accuracy_check(live: VariantFigures, candidate: VariantFigures, rule: ReleaseConfig) -> Check:
    items = sorted(set(live.eval_passed) & set(candidate.eval_passed))
    if not items:
        return Check("accuracy", None, rule.min_accuracy_gain, False, False, None, "no evaluation of both yet")
    only_candidate = sum(candidate.eval_passed[i] and not live.eval_passed[i] for i in items)
    only_live = sum(live.eval_passed[i] and not candidate.eval_passed[i] for i in items)
    gain, discordant = (only_candidate - only_live) / len(items), only_candidate + only_live
    better_p = binomial_tail(only_candidate, discordant, 0.5, upper=True) if discordant else 1.0
    worse_p = binomial_tail(only_candidate, discordant, 0.5, upper=False) if discordant else 1.0
    return Check("accuracy", gain, rule.min_accuracy_gain, _met(gain, rule.min_accuracy_gain, better_p, rule.alpha),
                 gain < 0 and worse_p <= rule.alpha, better_p, f"{len(items)} items, {only_candidate} only the "
                 f"candidate passed, {only_live} only the live model")


def p99_check(live: VariantFigures, candidate: VariantFigures, rule: ReleaseConfig) -> Check:
    if not live.latencies or not candidate.latencies:
        return Check("p99_latency", None, rule.min_p99_drop, False, False, None, "no answers of both yet")
    drop = 1 - candidate.percentile(99) / max(live.percentile(99), 1e-9)
    note = f"P99 {live.percentile(99):.2f} s live, {candidate.percentile(99):.2f} s candidate"
    if min(len(live.latencies), len(candidate.latencies)) < MIN_LATENCIES:  # a "no worse" threshold needs none
        return Check("p99_latency", drop, rule.min_p99_drop, rule.min_p99_drop <= 0 and drop >= rule.min_p99_drop,
                     False, None, f"{note}; fewer than {MIN_LATENCIES} answers of each variant: no evidence yet")
    rng = np.random.default_rng(0)
    a, b = np.asarray(live.latencies), np.asarray(candidate.latencies)
    draws = 2000
    ratios = (np.percentile(rng.choice(b, (draws, b.size)), 99, axis=1)
              / np.maximum(np.percentile(rng.choice(a, (draws, a.size)), 99, axis=1), 1e-9))
    target = 1 - rule.min_p99_drop
    better_p = float(np.mean(ratios > target))  # the share of resamples where the drop falls short
    worse_p = float(np.mean(ratios <= 1.0))
    return Check("p99_latency", drop, rule.min_p99_drop, _met(drop, rule.min_p99_drop, better_p, rule.alpha),
                 drop < 0 and worse_p <= rule.alpha, better_p, note)


def error_check(live: VariantFigures, candidate: VariantFigures, rule: ReleaseConfig) -> Check:
    if not live.answers or not candidate.answers:
        return Check("error_rate", None, rule.min_error_drop, False, False, None, "no served answers of both yet")
    x1, n1, x2, n2 = live.errors, live.answers, candidate.errors, candidate.answers
    worse_p = binomial_tail(x2, x1 + x2, n2 / (n1 + n2), upper=True) if x2 else 1.0
    worse = x2 / n2 > x1 / n1 and worse_p <= rule.alpha
    if x1 == 0:
        return Check("error_rate", 0.0 if x2 == 0 else None, rule.min_error_drop, x2 == 0, worse, None,
                     "the live model made no errors: the candidate must make none" if x2 == 0 else
                     f"the live model made no errors, the candidate {x2}")
    ratio = 1 - rule.min_error_drop  # H0: the candidate's rate is above this share of the live rate
    better_p = binomial_tail(x2, x1 + x2, ratio * n2 / (n1 + ratio * n2), upper=False)
    drop = 1 - (x2 / n2) / (x1 / n1)
    return Check("error_rate", drop, rule.min_error_drop, _met(drop, rule.min_error_drop, better_p, rule.alpha),
                 worse, better_p, f"{x1}/{n1} live, {x2}/{n2} candidate")


def decide(phase: str, live: VariantFigures, candidate: VariantFigures, shadow: VariantFigures,
           shadow_live: VariantFigures, rule: ReleaseConfig) -> Decision:
    """What to do now. In shadow: `shadow` holds the candidate's shadow answers and `shadow_live` the live
    answers they shadowed; in A/B: `live` and `candidate` hold the served answers of each variant."""
    if phase == "shadow":
        errors = error_check(shadow_live, shadow, rule)
        figures = {"live": shadow_live.summary(), "candidate": shadow.summary()}
        if errors.worse:
            return Decision(ROLLBACK, f"shadow answers fail more often ({errors.note})", (errors,), **figures)
        if shadow.answers < rule.shadow_min_samples:
            return Decision(WAIT, f"{shadow.answers} of {rule.shadow_min_samples} shadow answers so far", (errors,),
                            **figures)
        if not (shadow.eval_passed and shadow_live.eval_passed):
            return Decision(WAIT, "the evaluation set is being scored for both variants", (errors,), **figures)
        return Decision(ADVANCE, f"{shadow.answers} shadow answers, errors not worse ({errors.note}): A/B",
                        (errors,), **figures)
    checks = (accuracy_check(live, candidate, rule), p99_check(live, candidate, rule),
              error_check(live, candidate, rule))
    figures = {"live": live.summary(), "candidate": candidate.summary()}
    if worse := [c for c in checks if c.worse]:
        return Decision(ROLLBACK, "significantly worse: " + "; ".join(f"{c.name} ({c.note})" for c in worse),
                        checks, **figures)
    if min(live.answers, candidate.answers) < rule.min_samples:
        return Decision(WAIT, f"{live.answers} live and {candidate.answers} candidate answers of the "
                        f"{rule.min_samples} each that a decision needs", checks, **figures)
    if all(c.met for c in checks):
        return Decision(PROMOTE, "all three conditions hold", checks, **figures)
    return Decision(WAIT, "not yet: " + ", ".join(c.name for c in checks if not c.met), checks, **figures)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
