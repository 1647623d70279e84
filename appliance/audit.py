"""The audit log: one row per act that someone may later have to account for (administrative acts, logins,
configuration changes, exports, purges, and sensitive-word hits). The application only ever inserts; rows leave
only by retention."""

from __future__ import annotations

import hashlib
import json
import time


def record(db, operation: str, details: dict, user_id: str | None = None, ip_address: str | None = None) -> None:
    db["audit_log"].insert({"user_id": user_id, "operation": operation, "timestamp": time.time(),
                            "ip_address": ip_address, "details": json.dumps(details, ensure_ascii=False)})


def pseudonym(account: str, user: str) -> str:
    """A stable stand-in for a WeChat user in the audit log: it links a user's entries without naming them."""
    return "u-" + hashlib.sha256(f"{account}\0{user}".encode()).hexdigest()[:16]
