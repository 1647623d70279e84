"""The generate loop: token ids in, token ids out. It knows nothing of text, HTTP or WeChat."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from appliance.model import OnnxDecoder


def generate(decoder: OnnxDecoder, prompt_ids: list[int], max_new_tokens: int, stop_ids: frozenset[int],
             context: int | None = None) -> Iterator[int]:
    """Greedy decoding; yields each new token id, the stop token included."""
    assert prompt_ids, "a prompt needs at least one token"
    limit = max_new_tokens if context is None else min(max_new_tokens, context - len(prompt_ids))
    # 1. prefill: the whole prompt in one step, from an empty cache
    logits, past = decoder.forward(np.array([prompt_ids], np.int64), decoder.empty_past())
    for _ in range(limit):
        # 2. pick the next token from the last position's logits
        token = int(np.argmax(logits[0, -1]))
        yield token
        if token in stop_ids:
            return
        # 3. decode: one token, the present cache becomes the next past
        logits, past = decoder.forward(np.array([[token]], np.int64), past)
