"""Progress for long work: every step says what it does, and how long it took."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from tqdm import tqdm


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def step(title: str, timings: dict[str, float] | None = None):
    """Print the step's title, then its time; record the time in `timings` under the title."""
    say(f"▶ {title} …")
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    if timings is not None:
        timings[title] = round(elapsed, 2)
    say(f"  ✓ {title} ({elapsed:.1f} s)")


def byte_bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


def count_bar(items, desc: str, unit: str) -> tqdm:
    return tqdm(items, desc=desc, unit=f" {unit}", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
