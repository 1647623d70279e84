"""The store on real SQLite files: migrations applied once and in order, the schema they make, WAL, and a damaged
file refused rather than reset."""

import pytest
import sqlite_utils

from appliance.store import MIGRATIONS, Store, StoreError, migrate, open_database


def test_migrations_apply_once_in_order(tmp_path):
    db = open_database(tmp_path / "a.db")
    assert [r["name"] for r in db["_migrations"].rows] == [name for name, _ in MIGRATIONS]
    assert migrate(db) == []
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db["inbound"].columns_dict == {
        "id": int, "account": str, "dedup_key": str, "user": str, "kind": str, "content": str, "created_at": int,
        "received_at": float, "status": str, "answer": str, "answered_at": float, "delivery": str,
        "delivered_at": float, "user_sealed": bytes, "key_id": int}
    assert db["audit_log"].columns_dict == {"id": int, "user_id": str, "operation": str, "timestamp": float,
                                            "ip_address": str, "details": str}
    assert {"turns", "outbox", "tokens"} <= set(db.table_names())


def test_a_database_from_an_older_release_is_brought_up_to_date(tmp_path):
    db = sqlite_utils.Database(tmp_path / "old.db")
    db["_migrations"].create({"name": str, "applied_at": float}, pk="name")
    MIGRATIONS[0][1](db)
    db["_migrations"].insert({"name": MIGRATIONS[0][0], "applied_at": 0.0})
    db["inbound"].insert({"account": "a", "dedup_key": "k", "user": "u", "kind": "text", "received_at": 1.0,
                          "status": "received"})
    assert migrate(db) == [name for name, _ in MIGRATIONS[1:]]
    assert db["inbound"].count == 1  # what was there stays


def test_a_damaged_file_is_refused_not_reset(tmp_path):
    path = tmp_path / "broken.db"
    path.write_bytes(b"SQLite format 3\x00" + b"\x00garbage" * 512)
    with pytest.raises(StoreError, match="r1box will not overwrite it"):
        open_database(path)
    assert path.read_bytes().startswith(b"SQLite format 3")


async def test_calls_run_on_the_store_thread(tmp_path):
    import threading

    store = Store(tmp_path / "t.db")
    store.open()
    names = await store.run(lambda db: threading.current_thread().name)
    assert names.startswith("r1box-store")
    store.close()
