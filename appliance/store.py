"""The box's one SQLite database: WAL, opened through sqlite-utils, migrations as an append-only list.

Every call runs on the store's own thread (sqlite connections belong to the thread that made them, and a write
must never block the event loop): `await store.run(fn, *args)` runs `fn(db, *args)` there. An integrity check runs
at start; a damaged file is refused with a clear error, never silently reset.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import sqlite_utils

from appliance.errors import R1boxError


class StoreError(R1boxError):
    """The database file is damaged, unreadable, or its disk is full."""

    exit_code = 7


def _m0001_wechat_inbound(db: sqlite_utils.Database) -> None:
    # one row per message the platform delivered, recorded before anything else happens to it
    db["inbound"].create({
        "id": int, "account": str, "dedup_key": str, "user": str, "kind": str, "content": str,
        "created_at": int, "received_at": float, "status": str, "answer": str, "answered_at": float,
        "delivery": str, "delivered_at": float,
    }, pk="id", not_null={"account", "dedup_key", "user", "kind", "received_at", "status"})
    db["inbound"].create_index(["dedup_key"], unique=True)
    db["inbound"].create_index(["account", "user", "status"])


def _m0002_dialog_turns(db: sqlite_utils.Database) -> None:
    db["turns"].create({"id": int, "account": str, "user": str, "role": str, "content": str, "created_at": float},
                       pk="id", not_null={"account", "user", "role", "content", "created_at"})
    db["turns"].create_index(["account", "user", "id"])


def _m0003_outbox_and_tokens(db: sqlite_utils.Database) -> None:
    # answers to push through the customer-service API, written before the first attempt
    db["outbox"].create({
        "id": int, "account": str, "user": str, "inbound_key": str, "content": str, "created_at": float,
        "attempts": int, "next_attempt_at": float, "status": str, "last_error": str, "sent_at": float,
    }, pk="id", not_null={"account", "user", "content", "created_at", "status"}, defaults={"attempts": 0})
    db["outbox"].create_index(["status", "next_attempt_at"])
    db["outbox"].create_index(["account", "user", "sent_at"])
    db["tokens"].create({"app_id": str, "token": str, "expires_at": float}, pk="app_id")


def _m0004_audit_log(db: sqlite_utils.Database) -> None:
    # append-only from the application: no update or delete path except retention
    db["audit_log"].create({"id": int, "user_id": str, "operation": str, "timestamp": float, "ip_address": str,
                            "details": str}, pk="id", not_null={"operation", "timestamp"})
    db["audit_log"].create_index(["timestamp"])
    db["audit_log"].create_index(["operation", "timestamp"])


# Append only: a released migration is never edited or reordered; its name is recorded once applied.
MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("0001_wechat_inbound", _m0001_wechat_inbound),
    ("0002_dialog_turns", _m0002_dialog_turns),
    ("0003_outbox_and_tokens", _m0003_outbox_and_tokens),
    ("0004_audit_log", _m0004_audit_log),
]


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply the migrations this database lacks, each in its own transaction; return their names."""
    if "_migrations" not in db.table_names():
        db["_migrations"].create({"name": str, "applied_at": float}, pk="name")
    done = {row["name"] for row in db["_migrations"].rows}
    applied = []
    for name, step in MIGRATIONS:
        if name in done:
            continue
        with db.conn:
            step(db)
            db["_migrations"].insert({"name": name, "applied_at": time.time()})
        applied.append(name)
    return applied


def open_database(path: Path) -> sqlite_utils.Database:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db = sqlite_utils.Database(str(path))
        db.enable_wal()
        db.execute("PRAGMA synchronous=FULL")  # a message acknowledged to the platform survives a power cut
        db.execute("PRAGMA busy_timeout=5000")
        result = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path} is not a usable SQLite database ({e}). Restore it from a backup, or move it "
                         "aside to start empty; r1box will not overwrite it.") from None
    if result != "ok":
        raise StoreError(f"{path} failed its integrity check ({result}). Restore it from a backup, or move it "
                         "aside to start empty; r1box will not overwrite it.")
    migrate(db)
    return db


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="r1box-store")
        self._db: sqlite_utils.Database | None = None

    def open(self) -> None:
        self._db = self._executor.submit(open_database, self.path).result()

    async def run(self, fn: Callable, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn, args)

    def _call(self, fn: Callable, args: tuple):
        try:
            return fn(self._db, *args)
        except sqlite3.OperationalError as e:
            if "disk" in str(e) or "full" in str(e):
                raise StoreError(f"{self.path}: cannot write ({e}); free disk space.") from None
            raise

    def close(self) -> None:
        if self._db is not None:
            self._executor.submit(self._db.conn.close).result()
        self._executor.shutdown()
