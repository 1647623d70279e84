"""Choosing the next token from logits: greedy, or temperature with top-k / top-p, a repetition penalty, a seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# DeepSeek's recommendation for the R1 family: below 0.5 it repeats itself, above 0.7 it rambles.
R1_DEFAULTS = {"temperature": 0.6, "top_p": 0.95}


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the answer
    seed: int | None = None
    max_tokens: int = 512

    def __post_init__(self):
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be 0 (off) or positive")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError("repetition_penalty must be in (0, 10]")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Per-sequence state: its random generator and the tokens seen, for the repetition penalty."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.seen = set(prompt_ids) if params.repetition_penalty != 1.0 else set()

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if self.seen:
            idx = np.fromiter(self.seen, np.int64)
            picked = logits[idx]
            logits = logits.copy()
            logits[idx] = np.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.greedy:
            token = int(np.argmax(logits))
        else:
            token = self._sample(logits.astype(np.float64) / p.temperature)
        if p.repetition_penalty != 1.0:
            self.seen.add(token)
        return token

    def _sample(self, scaled: np.ndarray) -> int:
        p = self.params
        k = min(p.top_k or scaled.size, scaled.size)
        candidates = np.argpartition(-scaled, k - 1)[:k] if k < scaled.size else np.arange(scaled.size)
        order = candidates[np.argsort(-scaled[candidates])]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1  # the smallest set reaching top_p
            probs = probs[:keep] / probs[:keep].sum()
            order = order[:keep]
        return int(order[self.rng.choice(len(order), p=probs)])
