"""The audit log: one row per act that someone may later have to account for (administrative acts, logins,
configuration changes, exports, purges, and sensitive-word hits). The application only ever inserts; rows leave
only by retention (SQLite triggers refuse any other UPDATE or DELETE, see appliance/store.py). WeChat users appear
under their keyed hash (Vault.user_hash), the same stand-in the conversation tables use."""

from __future__ import annotations

import json
import time


def record(db, operation: str, details: dict, user_id: str | None = None, ip_address: str | None = None) -> None:
    """One row; inside a caller's transaction it commits (or rolls back) with the act it records."""
    inside = db.conn.in_transaction
    db.execute("INSERT INTO audit_log (user_id, operation, timestamp, ip_address, details) VALUES (?, ?, ?, ?, ?)",
               [user_id, operation, time.time(), ip_address, json.dumps(details, ensure_ascii=False)])
    if not inside:
        db.conn.commit()

