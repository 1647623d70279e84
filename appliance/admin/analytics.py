"""The conversation analytics behind the dashboard: aggregate queries over the rollups that triggers keep
(store migration 0008), never over message contents.

Days are the office's local days: hourly rollups are kept in UTC hours and shifted by the configured offset when
read, so a whole-hour offset needs no rewrite of the rollups. Each query reads at most a few rows per hour of the
range (a year: about 9,000), which keeps every one of them well under 200 ms on a year of data (`just
bench-analytics`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from appliance.store.database import LATENCY_BOUNDS


@dataclass(frozen=True)
class Range:
    """Local days first..last inclusive, as day numbers since the epoch (in the office's time)."""

    first: int
    last: int
    offset_s: int

    @classmethod
    def parse(cls, first: str | None, last: str | None, offset_s: int, today: dt.date) -> "Range":
        """From YYYY-MM-DD strings (either may be empty: the last 30 days up to today). Raises ValueError."""
        end = dt.date.fromisoformat(last) if last else today
        start = dt.date.fromisoformat(first) if first else end - dt.timedelta(days=29)
        if start > end:
            raise ValueError("the first day is after the last")
        if (end - start).days > 800:
            raise ValueError("a range of at most 800 days")
        epoch = dt.date(1970, 1, 1)
        return cls((start - epoch).days, (end - epoch).days, offset_s)

    @property
    def hours(self) -> tuple[int, int]:
        """UTC hours [lo, hi) that make up the local days."""
        return (self.first * 86400 - self.offset_s) // 3600, ((self.last + 1) * 86400 - self.offset_s) // 3600

    @property
    def seconds(self) -> tuple[float, float]:
        return self.first * 86400 - self.offset_s, (self.last + 1) * 86400 - self.offset_s

    def labels(self) -> list[str]:
        epoch = dt.date(1970, 1, 1)
        return [(epoch + dt.timedelta(days=d)).isoformat() for d in range(self.first, self.last + 1)]


def _by_day(rows, r: Range, width: int = 1) -> list:
    """Rows of (day, value...) spread over every day of the range, zeros where a day has none."""
    out = [[0] * width for _ in range(r.last - r.first + 1)]
    for day, *values in rows:
        if r.first <= day <= r.last:
            out[day - r.first] = [v or 0 for v in values]
    return [v[0] for v in out] if width == 1 else out


def messages(db, r: Range) -> dict:
    """Messages per day and per hour of the day, and how answers went out: passive, pushed, pulled."""
    lo, hi = r.hours
    rows = db.execute("SELECT (hour * 3600 + ?) / 86400, sum(messages), sum(passive), sum(push), sum(pull) "
                      "FROM inbound_hourly WHERE hour >= ? AND hour < ? GROUP BY 1", [r.offset_s, lo, hi]).fetchall()
    daily = _by_day(rows, r, 4)
    hourly = dict(db.execute("SELECT ((hour * 3600 + ?) / 3600) % 24, sum(messages) FROM inbound_hourly "
                             "WHERE hour >= ? AND hour < ? GROUP BY 1", [r.offset_s, lo, hi]).fetchall())
    return {"per_day": [d[0] for d in daily], "per_hour": [hourly.get(h, 0) for h in range(24)],
            "delivery": {"passive": sum(d[1] for d in daily), "push": sum(d[2] for d in daily),
                         "pull": sum(d[3] for d in daily)}}


def active_users(db, r: Range) -> dict:
    per_day = db.execute("SELECT day, count(*) FROM user_days WHERE day BETWEEN ? AND ? GROUP BY day",
                         [r.first, r.last]).fetchall()
    total = db.execute("SELECT count(*) FROM (SELECT DISTINCT account, user FROM user_days "
                       "WHERE day BETWEEN ? AND ?)", [r.first, r.last]).fetchone()[0]
    return {"per_day": _by_day(per_day, r), "total": total}


def latency(db, r: Range) -> dict:
    """Answer latency p50 and p99 per day, read from the buckets as the bucket's upper bound (None: no answers;
    the open last bucket reads as its lower bound)."""
    lo, hi = r.hours
    rows = db.execute("SELECT (hour * 3600 + ?) / 86400, bucket, sum(n) FROM latency_hourly "
                      "WHERE hour >= ? AND hour < ? GROUP BY 1, 2", [r.offset_s, lo, hi]).fetchall()
    counts = [[0] * (len(LATENCY_BOUNDS) + 1) for _ in range(r.last - r.first + 1)]
    for day, bucket, n in rows:
        if r.first <= day <= r.last:
            counts[day - r.first][bucket] = n
    return {"p50": [_quantile(c, 0.5) for c in counts], "p99": [_quantile(c, 0.99) for c in counts]}


def _quantile(counts: list[int], q: float) -> float | None:
    total = sum(counts)
    if not total:
        return None
    seen = 0
    for bucket, n in enumerate(counts):
        seen += n
        if seen >= q * total:
            return float(LATENCY_BOUNDS[min(bucket, len(LATENCY_BOUNDS) - 1)])
    return float(LATENCY_BOUNDS[-1])


def filter_hits(db, r: Range) -> list[int]:
    lo, hi = r.seconds
    rows = db.execute("SELECT CAST((timestamp + ?) / 86400 AS INTEGER), count(*) FROM audit_log "
                      "WHERE operation = 'filter_hit' AND timestamp >= ? AND timestamp < ? GROUP BY 1",
                      [r.offset_s, lo, hi]).fetchall()
    return _by_day(rows, r)


def top_commands(db, r: Range, limit: int = 10) -> list[list]:
    lo, hi = r.seconds
    return [list(row) for row in db.execute(
        "SELECT command, count(*) FROM command_uses WHERE at >= ? AND at < ? GROUP BY command "
        "ORDER BY 2 DESC, 1 LIMIT ?", [lo, hi, limit])]


def errors(db, r: Range) -> list[int]:
    """Pushes that failed at least once (the outbox keeps the platform's last error), per day."""
    lo, hi = r.seconds
    rows = db.execute("SELECT CAST((created_at + ?) / 86400 AS INTEGER), count(*) FROM outbox "
                      "WHERE last_error IS NOT NULL AND created_at >= ? AND created_at < ? GROUP BY 1",
                      [r.offset_s, lo, hi]).fetchall()
    return _by_day(rows, r)


QUERIES = {"messages": messages, "active_users": active_users, "latency": latency, "filter_hits": filter_hits,
           "top_commands": top_commands, "errors": errors}


def dashboard(db, r: Range) -> dict:
    """Everything the analytics page draws, in one JSON-ready document."""
    return {"days": r.labels(), **{name: query(db, r) for name, query in QUERIES.items()}}


def set_clock(db, offset_s: int) -> None:
    """The office's UTC offset, which the triggers use for the local day of a user's activity."""
    db.execute("UPDATE analytics_clock SET offset_s = ?", [offset_s])
    db.conn.commit()
