"""The box's one SQLite database: WAL, opened through sqlite-utils, migrations as an append-only list.

Every call runs on the store's own thread (sqlite connections belong to the thread that made them, and a write
must never block the event loop): `await store.run(fn, *args)` runs `fn(db, *args)` there. An act of several
statements runs in one transaction (appliance/transaction.py), so a failure (a full disk) leaves nothing of it
behind, and the error says so. An integrity check runs at start; a damaged file is refused with a clear error,
never silently reset. Contents and user identities are sealed by the store's vault (appliance/vault.py), whose key
file lives apart from the database.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import sqlite_utils

from appliance.errors import R1boxError
from appliance.rotation import seal_plaintext_rows
from appliance.transaction import transaction
from appliance.vault import Vault, open_vault


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


def _m0005_sealed_columns(db: sqlite_utils.Database) -> None:
    # Contents are sealed from now on (appliance/vault.py); `user` holds a keyed hash and the OpenID needed for
    # delivery is sealed beside it. key_id is the oldest key any of the row's values may be sealed with, so that a
    # rotation finds the rows it must re-seal. Rows written before this have key_id NULL: the store seals them at
    # its next start, when it has the key (a migration never needs the key, so any tool can migrate a copy).
    for table in ("inbound", "outbox"):
        db[table].add_column("user_sealed", bytes)
    for table in ("inbound", "turns", "outbox"):
        db[table].add_column("key_id", int)
        db[table].create_index(["key_id"])
    db["inbound"].create_index(["received_at"])
    db["turns"].create_index(["created_at"])
    db["outbox"].create_index(["created_at"])


def _m0006_vault_keys_and_append_only_audit(db: sqlite_utils.Database) -> None:
    db["vault_keys"].create({"key_id": int, "probe": bytes, "created_at": float}, pk="key_id")
    # Retention marks its own transaction here; the triggers refuse any other change to the audit log. They guard
    # against the application's own mistakes: whoever can write the file can drop a trigger.
    db["_retention_running"].create({"since": float})
    db.execute("CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log BEGIN "
               "SELECT RAISE(ABORT, 'audit_log is append-only: its rows are never changed'); END")
    db.execute("CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
               "WHEN NOT EXISTS (SELECT 1 FROM _retention_running) BEGIN "
               "SELECT RAISE(ABORT, 'audit_log is append-only: rows leave only by retention'); END")


# Append only: a released migration is never edited or reordered; its name is recorded once applied.
MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("0001_wechat_inbound", _m0001_wechat_inbound),
    ("0002_dialog_turns", _m0002_dialog_turns),
    ("0003_outbox_and_tokens", _m0003_outbox_and_tokens),
    ("0004_audit_log", _m0004_audit_log),
    ("0005_sealed_columns", _m0005_sealed_columns),
    ("0006_vault_keys_and_append_only_audit", _m0006_vault_keys_and_append_only_audit),
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
        with transaction(db):
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


def hold_shared(path: Path) -> int:
    """A shared lock beside the database, held by everyone who uses it (the service, a backup, a rotation), so
    that a restore, which takes it exclusively, never swaps the file under a running service."""
    fd = os.open(lock_file(path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"{path} is being restored from a backup; start again when `r1box restore` is done.") \
            from None
    return fd


def lock_file(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def default_key_file(path: Path) -> Path:
    return path.with_suffix(".keys")


class Store:
    def __init__(self, path: Path, key_file: Path | None = None):
        self.path = Path(path)
        self.key_file = Path(key_file) if key_file else default_key_file(self.path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="r1box-store")
        self._db: sqlite_utils.Database | None = None
        self._lock_fd: int | None = None
        self.vault: Vault | None = None

    def open(self) -> None:
        self._executor.submit(self._open).result()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():  # SQLite gives the -wal and -shm files the database file's mode
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._lock_fd = hold_shared(self.path)
        try:
            self._db = open_database(self.path)
            self.vault = open_vault(self._db, self.key_file)
            seal_plaintext_rows(self._db, self.vault)
        except BaseException:
            if self._db is not None:
                self._db.conn.close()
                self._db = None
            os.close(self._lock_fd)
            self._lock_fd = None
            raise

    async def run(self, fn: Callable, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn, args)

    def call(self, fn: Callable, *args):
        """`run` for code that has no event loop (the r1box commands)."""
        return self._executor.submit(self._call, fn, args).result()

    def _call(self, fn: Callable, args: tuple):
        try:
            return fn(self._db, *args)
        except BaseException as e:
            if self._db.conn.in_transaction:  # never let a later commit carry half of this call's writes
                self._db.conn.rollback()
            if isinstance(e, sqlite3.OperationalError) and ("disk" in str(e) or "full" in str(e)):
                raise StoreError(f"{self.path}: cannot write ({e}); nothing of this change was kept. Free disk "
                                 "space.") from None
            raise

    def close(self) -> None:
        if self._db is not None:
            self._executor.submit(self._db.conn.close).result()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        self._executor.shutdown()
