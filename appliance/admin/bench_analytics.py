"""The dashboard's queries on a year of traffic: a generated database of 1,000,000 messages (written through the
real migrations, so the rollup triggers run as they do on a box), then each query timed over the whole year and
over the default 30 days. Prints a table, then one JSON document on the last line.

    python -m appliance.admin.bench_analytics [--db PATH] [--messages N]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from appliance.admin import analytics
from appliance.store.database import open_database

YEAR_START = 1735660800  # 2025-01-01 00:00 in UTC+8
OFFSET_S = 8 * 3600
COMMANDS = ["help", "reset", "think_on", "think_off"]


def generate(path: Path, messages: int, seed: int = 7) -> float:
    """Write `messages` inbound rows over 365 days from 5,000 users (a few very active), answered with a
    long-tailed latency, delivered passively, pushed or pulled; plus filter hits, commands and failed pushes."""
    rng = random.Random(seed)
    db = open_database(path)
    analytics.set_clock(db, OFFSET_S)
    started = time.perf_counter()
    batch = []
    for i in range(messages):
        at = YEAR_START + (i / messages) * 365 * 86400 + rng.random() * 60
        user = f"h{int(rng.paretovariate(1.2)) % 5000:05d}"
        latency = rng.lognormvariate(0.6, 0.8)
        delivery = "passive" if latency < 4.5 else rng.choice(("push", "pull"))
        batch.append(("wx-bench", f"m{i}", user, "text", "", int(at), at, "delivered", at + latency, delivery,
                      at + latency))
        if len(batch) == 20000:
            _insert(db, batch)
            batch = []
    _insert(db, batch)
    with db.conn:
        db["audit_log"].insert_all(({"operation": "filter_hit", "timestamp": YEAR_START + rng.random() * 365 * 86400,
                                     "details": "{}"} for _ in range(messages // 50)), batch_size=5000)
        db["command_uses"].insert_all(({"account": "wx-bench", "command": rng.choice(COMMANDS),
                                        "at": YEAR_START + rng.random() * 365 * 86400}
                                       for _ in range(messages // 20)), batch_size=5000)
        db["outbox"].insert_all(({"account": "wx-bench", "user": "h00001", "content": "", "status": "sent",
                                  "created_at": YEAR_START + rng.random() * 365 * 86400,
                                  "last_error": "45015" if rng.random() < 0.1 else None}
                                 for _ in range(messages // 10)), batch_size=5000)
    db.execute("ANALYZE")
    db.conn.close()
    return time.perf_counter() - started


def _insert(db, rows) -> None:
    with db.conn:
        db.conn.executemany("INSERT INTO inbound (account, dedup_key, user, kind, content, created_at, received_at, "
                            "status, answered_at, delivery, delivered_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)


def time_queries(path: Path, repeats: int = 7) -> list[dict]:
    db = open_database(path)
    ranges = {"year": analytics.Range.parse("2025-01-01", "2025-12-31", OFFSET_S, None),
              "30 days": analytics.Range.parse("2025-06-01", "2025-06-30", OFFSET_S, None)}
    results = []
    for label, r in ranges.items():
        for name, query in analytics.QUERIES.items():
            query(db, r)  # warm the page cache
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                query(db, r)
                times.append((time.perf_counter() - t) * 1000)
            results.append({"range": label, "query": name, "median_ms": round(statistics.median(times), 2),
                            "max_ms": round(max(times), 2)})
    db.conn.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="reuse (or create) this database file; default: a temporary one")
    parser.add_argument("--messages", type=int, default=1_000_000)
    args = parser.parse_args()
    tmp = None
    if args.db:
        path = Path(args.db)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="r1box-bench-analytics-")
        path = Path(tmp.name) / "year.db"
    if not path.exists():
        print(f"generating {args.messages:,} messages into {path} ...", flush=True)
        print(f"  written in {generate(path, args.messages):.1f} s (rollup triggers included)", flush=True)
    results = time_queries(path)
    print(f"{'range':<8} {'query':<14} {'median ms':>10} {'max ms':>8}")
    for row in results:
        print(f"{row['range']:<8} {row['query']:<14} {row['median_ms']:>10.2f} {row['max_ms']:>8.2f}")
    slowest = max(r["max_ms"] for r in results)
    print(f"slowest: {slowest:.1f} ms ({'under' if slowest < 200 else 'OVER'} the 200 ms target)")
    print(json.dumps({"messages": args.messages, "target_ms": 200, "all_under_target": slowest < 200,
                      "results": results}))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
