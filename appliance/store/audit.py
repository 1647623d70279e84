"""The audit log: one row per act that someone may later have to account for (administrative acts, logins,
configuration changes, exports, purges, and sensitive-word hits). The application only ever inserts; rows leave
only by retention (SQLite triggers refuse any other UPDATE or DELETE, see appliance/store/database.py). WeChat users appear
under their keyed hash (Vault.user_hash), the same stand-in the conversation tables use."""

from __future__ import annotations

import getpass
import json
import os
import time


def record(db, operation: str, details: dict, user_id: str | None = None, ip_address: str | None = None) -> None:
    """One row; inside a caller's transaction it commits (or rolls back) with the act it records. Acts of the box
    itself ("system") and of its commands ("cli:USER") are recorded with where they were done from."""
    if ip_address is None and user_id and (user_id == "system" or user_id.startswith("cli:")):
        ip_address = origin()
    inside = db.conn.in_transaction
    db.execute("INSERT INTO audit_log (user_id, operation, timestamp, ip_address, details) VALUES (?, ?, ?, ?, ?)",
               [user_id, operation, time.time(), ip_address, json.dumps(details, ensure_ascii=False)])
    if not inside:
        db.conn.commit()


def origin() -> str:
    """A command's address: its SSH client's when run over SSH, else "local" (the console, or the box itself)."""
    ssh = os.environ.get("SSH_CONNECTION") or os.environ.get("SSH_CLIENT") or ""
    return ssh.split()[0] if ssh.split() else "local"


def command_actor() -> str:
    """Who runs an r1box command on the box: "cli:" and the login name (the sudoer's, under sudo)."""
    try:
        who = os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        who = str(os.getuid())
    return f"cli:{who}"
