"""Retention and the right to deletion.

Conversations (messages, answers, dialog turns, the outbox) are kept `[store] conversation_days` (30), the audit log
`audit_days` (180); a job inside the service purges what is older once per `retention_interval_h`. Subscribe and
unsubscribe events are system events and stay (subscriber counts over time), stripped of the OpenID and event key
once they are as old as a conversation may be. A user's data goes at once on `r1box purge-user` and when they
unsubscribe. Each purge is one transaction together with its audit row, which holds counts, never contents.
"""

from __future__ import annotations

import asyncio
import logging
import time

from appliance.store import audit
from appliance.store.transaction import transaction

log = logging.getLogger(__name__)

DAY_S = 86400


def purge_expired(db, conversation_days: int, audit_days: int, actor: str, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    before, audit_before = now - conversation_days * DAY_S, now - audit_days * DAY_S
    with transaction(db):
        counts = {
            "inbound": db.execute("DELETE FROM inbound WHERE received_at < ? AND kind NOT LIKE 'event:%'",
                                  [before]).rowcount,
            "turns": db.execute("DELETE FROM turns WHERE created_at < ?", [before]).rowcount,
            "outbox": db.execute("DELETE FROM outbox WHERE created_at < ?", [before]).rowcount,
            "release_samples": db.execute("DELETE FROM release_samples WHERE at < ?", [before]).rowcount,
            "events_stripped": db.execute(
                "UPDATE inbound SET user_sealed = NULL, content = NULL, answer = NULL WHERE kind LIKE 'event:%' "
                "AND received_at < ? AND (user_sealed IS NOT NULL OR content IS NOT NULL OR answer IS NOT NULL)",
                [before]).rowcount,
        }
        db.execute("INSERT INTO _retention_running (since) VALUES (?)", [now])  # lets the audit triggers pass
        counts["audit_log"] = db.execute("DELETE FROM audit_log WHERE timestamp < ?", [audit_before]).rowcount
        db.execute("DELETE FROM _retention_running")
        audit.record(db, "retention", {"conversation_days": conversation_days, "audit_days": audit_days, **counts},
                     actor)
    return counts


def purge_user(db, account: str, user_hash: str, actor: str, reason: str, keep_key: str | None = None) -> dict:
    """Everything stored of one user goes; `keep_key` (the unsubscribe event itself) stays as a content-free row.
    Their audit entries stay: the audit log is the operator's record and names them only by the keyed hash."""
    with transaction(db):
        counts = {
            "release_samples": db.execute(
                "DELETE FROM release_samples WHERE ref IN (SELECT dedup_key FROM inbound WHERE account = ? AND "
                "user = ?)", [account, user_hash]).rowcount,
            "inbound": db.execute("DELETE FROM inbound WHERE account = ? AND user = ? AND dedup_key IS NOT ?",
                                  [account, user_hash, keep_key]).rowcount,
            "turns": db.execute("DELETE FROM turns WHERE account = ? AND user = ?", [account, user_hash]).rowcount,
            "outbox": db.execute("DELETE FROM outbox WHERE account = ? AND user = ?", [account, user_hash]).rowcount,
        }
        if keep_key is not None:
            db.execute("UPDATE inbound SET status = 'delivered', delivery = 'none', user_sealed = NULL, "
                       "content = NULL, answer = NULL WHERE dedup_key = ?", [keep_key])
        audit.record(db, "purge_user", {"account": account, "user": user_hash, "reason": reason, **counts}, actor)
    return counts


def last_run(db) -> float:
    """When retention last ran; for a database it never ran on, when the database was made."""
    at = db.execute("SELECT max(timestamp) FROM audit_log WHERE operation = 'retention'").fetchone()[0]
    return at if at is not None else db.execute("SELECT min(applied_at) FROM _migrations").fetchone()[0]


async def run_forever(store, conversation_days: int, audit_days: int, interval_h: float) -> None:
    """The service's job: due one interval after the last run (so a box that restarts often still purges)."""
    interval = interval_h * 3600
    while True:
        last = await store.run(last_run)
        await asyncio.sleep(max(0.0, last + interval - time.time()))
        try:
            counts = await store.run(purge_expired, conversation_days, audit_days, "system")
        except Exception:
            log.exception("retention failed; it is tried again in an hour")
            await asyncio.sleep(min(interval, 3600))
            continue
        log.info("retention purged", extra=counts)
