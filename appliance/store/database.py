"""The box's one SQLite database: WAL, opened through sqlite-utils, migrations as an append-only list.

Every call runs on the store's own thread (sqlite connections belong to the thread that made them, and a write
must never block the event loop): `await store.run(fn, *args)` runs `fn(db, *args)` there. An act of several
statements runs in one transaction (appliance/store/transaction.py), so a failure (a full disk) leaves nothing of it
behind, and the error says so. An integrity check runs at start; a damaged file is refused with a clear error,
never silently reset. Contents and user identities are sealed by the store's vault (appliance/store/vault.py), whose key
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
from appliance.store.rotation import seal_plaintext_rows
from appliance.store.transaction import transaction
from appliance.store.vault import Vault, open_vault


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
    # Contents are sealed from now on (appliance/store/vault.py); `user` holds a keyed hash and the OpenID needed for
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
def _m0007_admin_accounts(db: sqlite_utils.Database) -> None:
    # people and scripts allowed into the admin pages; only hashes of passwords, session tokens and API keys
    db["admin_users"].create({"name": str, "role": str, "password_hash": str, "created_at": float}, pk="name",
                             not_null={"role", "password_hash", "created_at"})
    db["admin_sessions"].create({"token_hash": str, "user_name": str, "csrf": str, "created_at": float,
                                 "expires_at": float}, pk="token_hash",
                                not_null={"user_name", "csrf", "created_at", "expires_at"})
    db["admin_api_keys"].create({"id": int, "name": str, "role": str, "key_hash": str, "created_by": str,
                                 "created_at": float, "revoked_at": float}, pk="id",
                                not_null={"name", "role", "key_hash", "created_at"})
    db["admin_api_keys"].create_index(["key_hash"], unique=True)


# A user's message (not an event, not the stored rest of a long answer) counted in its UTC hour.
_COUNTED = "NEW.kind NOT LIKE 'event%' AND NEW.dedup_key NOT LIKE '%:rest'"
_HOUR = "CAST(NEW.received_at / 3600 AS INTEGER)"
_LOCAL_DAY = "CAST((NEW.received_at + (SELECT offset_s FROM analytics_clock)) / 86400 AS INTEGER)"
# answer latency buckets (upper bounds in seconds; the last is open): percentiles are read from these
LATENCY_BOUNDS = (0.5, 1, 2, 3, 4, 4.5, 5, 7.5, 10, 15, 20, 30, 60, 120)
_BUCKET = "CASE " + " ".join(f"WHEN NEW.answered_at - NEW.received_at <= {b} THEN {i}"
                             for i, b in enumerate(LATENCY_BOUNDS)) + f" ELSE {len(LATENCY_BOUNDS)} END"
_ANSWERED = (f"INSERT INTO latency_hourly (hour, account, bucket, n) VALUES ({_HOUR}, NEW.account, {_BUCKET}, 1) "
             "ON CONFLICT DO UPDATE SET n = n + 1;")


def _execute_script(db: sqlite_utils.Database, script: str) -> None:
    """Statement by statement inside the migration's transaction: sqlite3's executescript would commit it first."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            db.execute(statement)
            statement = ""
    assert not statement.strip(), f"an incomplete statement at the end of a script: {statement[:80]}"


def _m0008_analytics_rollups(db: sqlite_utils.Database) -> None:
    """Hourly rollups kept by triggers, so the dashboard reads thousands of rows for a year, not a million: a
    year of raw inbound rows takes 0.3-0.8 s per aggregate on this kind of box. Counts carry no identity;
    user_days (who was active on which local day) follows deletions of a user's messages, and the hashing of
    users from before encryption, so it never keeps an OpenID."""
    _execute_script(db, f"""
    CREATE TABLE analytics_clock (offset_s INTEGER NOT NULL);  -- the office's UTC offset, set at each start
    INSERT INTO analytics_clock VALUES (0);
    CREATE TABLE inbound_hourly (hour INTEGER NOT NULL, account TEXT NOT NULL, messages INTEGER NOT NULL DEFAULT 0,
        passive INTEGER NOT NULL DEFAULT 0, push INTEGER NOT NULL DEFAULT 0, pull INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (hour, account)) WITHOUT ROWID;
    CREATE TABLE latency_hourly (hour INTEGER NOT NULL, account TEXT NOT NULL, bucket INTEGER NOT NULL,
        n INTEGER NOT NULL, PRIMARY KEY (hour, account, bucket)) WITHOUT ROWID;
    CREATE TABLE user_days (day INTEGER NOT NULL, account TEXT NOT NULL, user TEXT NOT NULL,
        PRIMARY KEY (day, account, user)) WITHOUT ROWID;
    CREATE TABLE command_uses (id INTEGER PRIMARY KEY, account TEXT NOT NULL, command TEXT NOT NULL,
        at REAL NOT NULL);
    CREATE INDEX command_uses_at ON command_uses (at, command);
    CREATE INDEX outbox_errors ON outbox (created_at) WHERE last_error IS NOT NULL;

    CREATE TRIGGER inbound_counted AFTER INSERT ON inbound WHEN {_COUNTED} BEGIN
        INSERT INTO inbound_hourly (hour, account, messages, passive, push, pull)
            VALUES ({_HOUR}, NEW.account, 1, NEW.delivery IS 'passive', NEW.delivery IS 'push',
                    NEW.delivery IS 'pull')
            ON CONFLICT DO UPDATE SET messages = messages + 1, passive = passive + excluded.passive,
                push = push + excluded.push, pull = pull + excluded.pull;
        INSERT OR IGNORE INTO user_days VALUES ({_LOCAL_DAY}, NEW.account, NEW.user);
    END;
    CREATE TRIGGER inbound_answered_at_once AFTER INSERT ON inbound
        WHEN {_COUNTED} AND NEW.answered_at IS NOT NULL BEGIN {_ANSWERED} END;
    CREATE TRIGGER inbound_answered AFTER UPDATE OF answered_at ON inbound
        WHEN {_COUNTED} AND OLD.answered_at IS NULL AND NEW.answered_at IS NOT NULL BEGIN {_ANSWERED} END;
    CREATE TRIGGER inbound_delivery AFTER UPDATE OF delivery ON inbound
        WHEN {_COUNTED} AND OLD.delivery IS NOT NEW.delivery BEGIN
        UPDATE inbound_hourly SET passive = passive + (NEW.delivery IS 'passive') - (OLD.delivery IS 'passive'),
            push = push + (NEW.delivery IS 'push') - (OLD.delivery IS 'push'),
            pull = pull + (NEW.delivery IS 'pull') - (OLD.delivery IS 'pull')
            WHERE hour = {_HOUR} AND account = NEW.account;
    END;
    CREATE TRIGGER inbound_forgotten AFTER DELETE ON inbound BEGIN
        DELETE FROM user_days WHERE account = OLD.account AND user = OLD.user AND NOT EXISTS (
            SELECT 1 FROM inbound WHERE account = OLD.account AND user = OLD.user AND kind NOT LIKE 'event%'
            AND CAST((received_at + (SELECT offset_s FROM analytics_clock)) / 86400 AS INTEGER) = user_days.day);
    END;
    CREATE TRIGGER inbound_user_hashed AFTER UPDATE OF user ON inbound WHEN OLD.user IS NOT NEW.user BEGIN
        INSERT OR IGNORE INTO user_days SELECT day, account, NEW.user FROM user_days
            WHERE account = OLD.account AND user = OLD.user;
        DELETE FROM user_days WHERE account = OLD.account AND user = OLD.user;
    END;
    """)
    # a box upgraded with messages already stored gets them counted once
    counted = "kind NOT LIKE 'event%' AND dedup_key NOT LIKE '%:rest'"
    hour = "CAST(received_at / 3600 AS INTEGER)"
    db.execute(f"INSERT INTO inbound_hourly SELECT {hour}, account, count(*), sum(delivery IS 'passive'), "
               f"sum(delivery IS 'push'), sum(delivery IS 'pull') FROM inbound WHERE {counted} GROUP BY 1, 2")
    db.execute(f"INSERT OR IGNORE INTO user_days SELECT CAST(received_at / 86400 AS INTEGER), account, user "
               f"FROM inbound WHERE {counted}")
    bucket = _BUCKET.replace("NEW.", "")
    db.execute(f"INSERT INTO latency_hourly SELECT {hour}, account, {bucket}, count(*) FROM inbound "
               f"WHERE {counted} AND answered_at IS NOT NULL GROUP BY 1, 2, 3")


def _m0009_answer_cache(db: sqlite_utils.Database) -> None:
    """Frequently asked questions with approved answers, for when no model backend answers
    (appliance/dialog/answer_cache.py). account '' is every account."""
    db["answer_cache"].create({"id": int, "account": str, "question": str, "normalized": str, "answer": str,
                               "created_by": str, "created_at": float, "updated_at": float}, pk="id",
                              not_null={"account", "question", "normalized", "answer"})
    db["answer_cache"].create_index(["account"])


def _m0010_releases(db: sqlite_utils.Database) -> None:
    """Gray release of a candidate model (appliance/release/): the release itself, one row per answer made while
    it runs (which variant made it, served or shadow, how long, how it ended; a shadow answer sealed), and the
    evaluation-set runs that give each variant its accuracy."""
    db["releases"].create({
        "id": int, "candidate": str, "url": str, "key_env": str, "artifact": str, "phase": str, "shadow_share": float,
        "ab_share": float, "auto": int, "started_by": str, "started_at": float, "phase_at": float,
        "ended_at": float, "figures": str,
    }, pk="id", not_null={"candidate", "url", "phase", "shadow_share", "ab_share", "auto", "started_at"})
    db["releases"].create_index(["phase"])
    db["release_samples"].create({
        "id": int, "release_id": int, "ref": str, "variant": str, "served": int, "backend": str, "latency_s": float,
        "first_token_s": float, "outcome": str, "answer": bytes, "key_id": int, "at": float,
    }, pk="id", not_null={"release_id", "variant", "served", "outcome", "at"})
    db["release_samples"].create_index(["release_id", "variant", "served"])
    db["release_samples"].create_index(["ref"])
    db["release_samples"].create_index(["at"])
    db["eval_runs"].create({"id": int, "release_id": int, "variant": str, "target": str, "items": int,
                            "passed": int, "results": str, "at": float}, pk="id",
                           not_null={"variant", "target", "items", "passed", "results", "at"})
    db["eval_runs"].create_index(["release_id", "variant"])


def _m0011_ha_takeovers(db: sqlite_utils.Database) -> None:
    """Hot standby (appliance/ha/): one row each time a box of a pair starts serving this store. The highest epoch
    is the store's age, which a box compares with its peer's copy before it serves, so neither ever serves an
    older store than the other holds."""
    db["ha_takeovers"].create({"epoch": int, "node": str, "source": str, "at": float}, pk="epoch",
                              not_null={"node", "source", "at"})


# Append only: a released migration is never edited or reordered; its name is recorded once applied.
MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("0001_wechat_inbound", _m0001_wechat_inbound),
    ("0002_dialog_turns", _m0002_dialog_turns),
    ("0003_outbox_and_tokens", _m0003_outbox_and_tokens),
    ("0004_audit_log", _m0004_audit_log),
    ("0005_sealed_columns", _m0005_sealed_columns),
    ("0006_vault_keys_and_append_only_audit", _m0006_vault_keys_and_append_only_audit),
    ("0007_admin_accounts", _m0007_admin_accounts),
    ("0008_analytics_rollups", _m0008_analytics_rollups),
    ("0009_answer_cache", _m0009_answer_cache),
    ("0010_releases", _m0010_releases),
    ("0011_ha_takeovers", _m0011_ha_takeovers),
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
        self.replica = None  # [ha]: the wait for the peer's copy (appliance/ha/replication.py), set by serve

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

    async def reached_peer(self) -> None:
        """Waits until what was written so far is in the pair's other box ([ha]); at once on a box alone. Called
        before the platform is told that a message was taken or a push was made."""
        if self.replica is not None:
            await self.replica.reached_peer()

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
