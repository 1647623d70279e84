"""The plain generate loop: token ids in, token ids out, one sequence. It knows nothing of text, HTTP or WeChat;
the engine runs many sequences at once, this is the loop to read first."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from appliance.model.decoder import Decoder


def generate(decoder: Decoder, prompt_ids: list[int], max_new_tokens: int, stop_ids: frozenset[int]) -> Iterator[int]:
    """Greedy decoding; yields each new token id, the stop token included."""
    assert prompt_ids, "a prompt needs at least one token"
    context = decoder.manifest.arch["context"]
    limit = min(max_new_tokens, context - len(prompt_ids))
    cache = decoder.new_cache(slots=1, max_length=len(prompt_ids) + max(limit, 1))
    # 1. prefill: the whole prompt into slot 0
    logits = decoder.prefill(cache, 0, prompt_ids)
    for _ in range(limit):
        # 2. pick the next token
        token = int(np.argmax(logits))
        yield token
        if token in stop_ids:
            return
        # 3. decode: one token appended in place to the slot's cache
        logits = decoder.decode(cache, 0, token)
