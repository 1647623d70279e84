"""Reuse of the KV of earlier conversations: a dialog's next turn starts with the same system prompt and earlier
turns, so their keys and values are copied back instead of computed again.

Entries are token sequences with their KV blocks ([kv_heads, length, head_dim] per layer and kind), kept in
least-recently-used order within a byte budget. A lookup finds the entry sharing the longest token prefix with a new
prompt; copying even a few hundred tokens' KV costs far less than prefilling them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class _Entry:
    tokens: np.ndarray
    blocks: list[np.ndarray]
    nbytes: int


class PrefixCache:
    def __init__(self, budget_bytes: int, min_tokens: int = 16):
        self.budget, self.min_tokens = budget_bytes, min_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_key = 0
        self.nbytes = 0
        self.hits = self.misses = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int]) -> tuple[int, list[np.ndarray] | None]:
        """The longest reusable prefix: (length, blocks cut to it), or (0, None). At least one prompt token is
        always left to prefill, because the next token's logits come from it."""
        want = np.asarray(prompt, np.int64)
        best_len, best_key = 0, None
        for key, entry in self._entries.items():
            n = min(entry.tokens.size, want.size - 1)
            same = entry.tokens[:n] == want[:n]
            common = n if same.all() else int(np.argmin(same))
            if common > best_len:
                best_len, best_key = common, key
        if best_key is None or best_len < self.min_tokens:
            self.misses += 1
            return 0, None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best_len
        return best_len, [b[:, :best_len] for b in self._entries[best_key].blocks]

    def store(self, tokens: list[int], blocks: list[np.ndarray]) -> None:
        """Keep a finished sequence's KV; entries it extends are dropped, being prefixes of it."""
        assert blocks and blocks[0].shape[1] == len(tokens)
        if len(tokens) < self.min_tokens:
            return
        new = np.asarray(tokens, np.int64)
        size = sum(b.nbytes for b in blocks)
        if size > self.budget:
            return
        for key in [k for k, e in self._entries.items()
                    if e.tokens.size <= new.size and np.array_equal(e.tokens, new[:e.tokens.size])]:
            self._drop(key)
        while self.nbytes + size > self.budget:
            self._drop(next(iter(self._entries)))
        self._entries[self._next_key] = _Entry(new, blocks, size)
        self._next_key += 1
        self.nbytes += size

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
