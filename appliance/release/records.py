"""A release as the store keeps it: the one source of truth that the CLI, the admin pages and the running service
share. The CLI and the pages change a release's row (each change one transaction with its audit row); the
service reads the row every few seconds and follows it, so a restart resumes a release where the store says it is.

Phases: shadow → ab → promoted, or → rolled_back / stopped from either of the first two. One release is active at
a time. Each answer made while a release runs is a sample: which variant made it, whether it was sent (served) or
only compared (shadow), how long it took and how it ended; a shadow answer is kept sealed like every answer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from appliance.errors import R1boxError
from appliance.release.rule import VariantFigures
from appliance.store import audit
from appliance.store.transaction import transaction

ACTIVE = ("shadow", "ab")
ENDED = ("promoted", "rolled_back", "stopped")
ERROR_OUTCOMES = ("error", "timeout", "blocked", "empty")


class ReleaseError(R1boxError):
    """A release that cannot start or change as asked: one already running, none running, a bad candidate."""

    exit_code = 9


@dataclass(frozen=True)
class Release:
    id: int
    candidate: str  # its label
    url: str  # where the candidate answers (an artifact's own `r1box model`, or a remote backend)
    key_env: str  # the environment variable with its key
    artifact: str  # the artifact directory the service runs the candidate from; empty for a remote backend
    phase: str
    shadow_share: float
    ab_share: float
    auto: bool
    started_at: float
    phase_at: float
    ended_at: float | None
    figures: dict  # the last evaluation's decision, as rule.Decision.as_dict()

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE


def _release(row) -> Release:
    return Release(row["id"], row["candidate"], row["url"], row["key_env"] or "", row["artifact"] or "",
                   row["phase"], row["shadow_share"], row["ab_share"], bool(row["auto"]), row["started_at"],
                   row["phase_at"] or row["started_at"], row["ended_at"], json.loads(row["figures"] or "{}"))


def latest(db) -> Release | None:
    rows = list(db["releases"].rows_where(order_by="id DESC", limit=1))
    return _release(rows[0]) if rows else None


def active(db) -> Release | None:
    rows = list(db["releases"].rows_where("phase IN ('shadow', 'ab')", order_by="id DESC", limit=1))
    return _release(rows[0]) if rows else None


def promoted(db) -> Release | None:
    """The last promoted release, whose candidate is the serving model now."""
    rows = list(db["releases"].rows_where("phase = 'promoted'", order_by="id DESC", limit=1))
    return _release(rows[0]) if rows else None


def start(db, candidate: str, url: str, key_env: str, artifact: str, shadow_share: float, ab_share: float,
          auto: bool, actor: str, ip: str | None = None) -> Release:
    with transaction(db, immediate=True):
        if running := active(db):
            raise ReleaseError(f"release {running.id} of {running.candidate} is already running ({running.phase}); "
                               "promote, roll back or stop it first (r1box release status).")
        now = time.time()
        release_id = db["releases"].insert({
            "candidate": candidate, "url": url, "key_env": key_env, "artifact": artifact, "phase": "shadow",
            "shadow_share": shadow_share, "ab_share": ab_share, "auto": int(auto), "started_by": actor, "started_at": now, "phase_at": now,
            "figures": "{}"}).last_pk
        audit.record(db, "release_start", {"release": release_id, "candidate": candidate, "url": url,
                                           "artifact": artifact, "shadow_share": shadow_share,
                                           "ab_share": ab_share, "auto": auto}, actor, ip)
    return latest(db)


def change_phase(db, release_id: int, to: str, actor: str, figures: dict | None = None,
                 ip: str | None = None) -> Release:
    """Move an active release on (ab), or end it (promoted, rolled_back, stopped); audited with the figures."""
    with transaction(db, immediate=True):
        row = db.execute("SELECT phase FROM releases WHERE id = ?", [release_id]).fetchone()
        if row is None or row[0] not in ACTIVE:
            raise ReleaseError(f"release {release_id} is {row[0] if row else 'unknown'}, not running; nothing to "
                               f"change (r1box release status).")
        if to == "ab" and row[0] != "shadow":
            raise ReleaseError(f"release {release_id} is already in A/B")
        now = time.time()
        db["releases"].update(release_id, {"phase": to, "phase_at": now, "ended_at": now if to in ENDED else None,
                                           **({"figures": json.dumps(figures)} if figures else {})})
        audit.record(db, f"release_{to}", {"release": release_id, "from": row[0], "figures": figures or {}},
                     actor, ip)
    return latest(db)


def save_figures(db, release_id: int, figures: dict) -> None:
    db["releases"].update(release_id, {"figures": json.dumps(figures)})


def record_sample(db, vault, release_id: int, ref: str, variant: str, served: bool, backend: str,
                  latency_s: float | None, first_token_s: float | None, outcome: str, answer: str | None) -> None:
    with transaction(db):
        sample_id = db["release_samples"].insert({
            "release_id": release_id, "ref": ref, "variant": variant, "served": int(served), "backend": backend,
            "latency_s": latency_s, "first_token_s": first_token_s, "outcome": outcome, "key_id": vault.current,
            "at": time.time()}).last_pk
        if answer is not None:  # the row's id is the sealed value's context, so it is sealed once the row has one
            db.execute("UPDATE release_samples SET answer = ? WHERE id = ?",
                       [vault.seal(answer, "release_samples", "answer", sample_id), sample_id])


def figures(db, release_id: int, variant: str, served: bool, since: float = 0.0) -> VariantFigures:
    """A variant's answers (served, or shadow) since a time, with its evaluation-set results."""
    rows = db.execute("SELECT latency_s, outcome FROM release_samples WHERE release_id = ? AND variant = ? "
                      "AND served = ? AND at >= ?", [release_id, variant, int(served), since]).fetchall()
    return _variant(rows, _evaluated(db, release_id, variant))


def shadowed_live(db, release_id: int) -> VariantFigures:
    """The live answers that shadow answers were compared with: the served samples of the same messages."""
    rows = db.execute("SELECT latency_s, outcome FROM release_samples WHERE release_id = ? AND variant = 'live' "
                      "AND served = 1 AND ref IN (SELECT ref FROM release_samples WHERE release_id = ? AND served = 0)",
                      [release_id, release_id]).fetchall()
    return _variant(rows, _evaluated(db, release_id, "live"))


def _variant(rows: list, passed: dict[str, bool]) -> VariantFigures:
    return VariantFigures(len(rows), sum(outcome in ERROR_OUTCOMES for _, outcome in rows),
                          tuple(latency for latency, outcome in rows if outcome == "ok" and latency is not None),
                          passed)


def _evaluated(db, release_id: int, variant: str) -> dict[str, bool]:
    run = db.execute("SELECT results FROM eval_runs WHERE release_id = ? AND variant = ? ORDER BY id DESC LIMIT 1",
                     [release_id, variant]).fetchone()
    return {item["id"]: item["passed"] for item in json.loads(run[0])} if run else {}


def record_eval(db, release_id: int | None, variant: str, target: str, results: list[dict]) -> None:
    db["eval_runs"].insert({"release_id": release_id, "variant": variant, "target": target, "items": len(results),
                            "passed": sum(r["passed"] for r in results), "results": json.dumps(results,
                                                                                             ensure_ascii=False),
                            "at": time.time()})
    db.conn.commit()


def eval_done(db, release_id: int, variant: str) -> bool:
    return db.execute("SELECT 1 FROM eval_runs WHERE release_id = ? AND variant = ?",
                      [release_id, variant]).fetchone() is not None


def history(db, release_id: int, buckets: int = 24) -> list[dict]:
    """Answers, errors and mean latency per variant over the release's life, in equal time buckets: the chart."""
    start, end = db.execute("SELECT min(at), max(at) FROM release_samples WHERE release_id = ? AND served = 1",
                            [release_id]).fetchone()
    if start is None:
        return []
    width = max((end - start) / buckets, 1.0)
    rows = db.execute("SELECT CAST((at - ?) / ? AS INTEGER) AS b, variant, count(*), "
                      f"sum(outcome IN {ERROR_OUTCOMES}), avg(CASE WHEN outcome = 'ok' THEN latency_s END) "
                      "FROM release_samples WHERE release_id = ? AND served = 1 GROUP BY b, variant ORDER BY b",
                      [start, width, release_id]).fetchall()
    return [{"at": start + b * width, "variant": v, "answers": n, "errors": e, "mean_latency_s": lat}
            for b, v, n, e, lat in rows]
