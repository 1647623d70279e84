"""What every side of the bench is reduced to: one record per request (when it started, when each token arrived),
and the figures made from records: percentiles, a stream's decode rate, the aggregate decode of streams running
together, a process's peak resident memory. r1box's side (run.py) and llama.cpp's (llama.py) both use these, so
their figures are computed the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def record(start: float, stamps: list[float], tokens: list, **more) -> dict:
    """One request: `stamps` are the arrival times (time.perf_counter) of its tokens."""
    return {"ttft": stamps[0] - start, "itl": np.diff(stamps).tolist(), "tokens": tokens, "end": stamps[-1],
            "start": start, "stamps": stamps, **more}


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else float("nan")


def decode_rate(r: dict) -> float:
    """One stream's tokens/s after its first token."""
    return (len(r["stamps"]) - 1) / (r["end"] - r["start"] - r["ttft"])


def decode_throughput(results: list[dict]) -> float:
    """Aggregate tokens/s once every stream has its first token (prefill done), to the last token: the figure
    genai's batch run reports, so the sides compare like for like."""
    t0 = max(r["stamps"][0] for r in results)
    tokens = sum(1 for r in results for s in r["stamps"] if s > t0)
    return tokens / (max(r["end"] for r in results) - t0)


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's resident high-water mark (this one's by default). Not getrusage: a child forked from a big
    parent inherits its maximum."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")
