"""[release]: a gray release's shares, its rule's thresholds and its candidate's limits. The release owns its section;
appliance/config.py reads it with the others, so it imports nothing but the standard library."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReleaseConfig:
    """Gray release of a candidate model (appliance/release/): shares, the promotion rule, the candidate's limits."""

    shadow_share: float = 0.05  # of conversations also answered by the candidate, never sent
    ab_share: float = 0.10  # of users who get the candidate's answers in A/B
    auto: bool = True  # act on the rule; False: only propose (pages and audit log), a person decides
    evaluate_every_s: float = 300.0
    min_samples: int = 200  # served answers of each variant before a promotion
    shadow_min_samples: int = 50  # shadow answers before A/B
    min_accuracy_gain: float = 0.02  # on the evaluation set, as a fraction of its items
    min_p99_drop: float = 0.15
    min_error_drop: float = 0.5
    alpha: float = 0.05  # each one-sided test's level (appliance/release/rule.py)
    candidate_max_concurrent: int = 1  # the candidate's questions in flight; shadow work beyond it is dropped
    idle_wait_s: float = 30.0  # a shadow question waits this long for an idle box, then is dropped
    candidate_port: int = 8082  # where the candidate's own `r1box model` listens (an artifact's, on loopback)
    candidate_nice: int = 10  # its CPU priority below the serving model's
    eval_items: int = 0  # items of the evaluation set a release scores each variant on; 0: all
    eval_max_tokens: int = 256
    eval_sets: tuple[str, ...] = ()  # the branch's own items (JSONL), beside the shipped set
    eval_profile: str = ""  # the branch's own fact sheet; then only eval_sets are scored (the shipped items are
    # about the shipped fictional branch)

    def __post_init__(self):
        if not (0 <= self.shadow_share <= 1 and 0 <= self.ab_share <= 1):
            raise ValueError("shadow_share and ab_share must be between 0 and 1")
        if not 0 < self.alpha < 0.5:
            raise ValueError("alpha must be between 0 and 0.5")
        if min(self.min_samples, self.shadow_min_samples, self.candidate_max_concurrent, self.eval_max_tokens) < 1 \
                or self.evaluate_every_s <= 0 or self.idle_wait_s < 0 or self.eval_items < 0:
            raise ValueError("min_samples, shadow_min_samples, candidate_max_concurrent and eval_max_tokens ≥ 1, "
                             "evaluate_every_s > 0, idle_wait_s and eval_items ≥ 0")
        if not 0 <= self.candidate_nice <= 19:
            raise ValueError("candidate_nice must be between 0 and 19")
        if not (-1 <= self.min_accuracy_gain <= 1 and self.min_p99_drop < 1 and self.min_error_drop <= 1):
            raise ValueError("min_accuracy_gain between -1 and 1, min_p99_drop below 1, min_error_drop at most 1 "
                             "(fractions: 0.02 is 2 %)")
