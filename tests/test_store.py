"""The store on real SQLite files: migrations applied once and in order, the schema they make, WAL, and a damaged
file refused rather than reset."""

import pytest
import sqlite_utils

from appliance.store.database import MIGRATIONS, Store, StoreError, migrate, open_database
from appliance.store.transaction import transaction


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


def test_sealed_columns_and_the_key_check_table(tmp_path):
    db = open_database(tmp_path / "a.db")
    assert {"user_sealed": bytes, "key_id": int}.items() <= db["outbox"].columns_dict.items()
    assert db["turns"].columns_dict["key_id"] is int
    assert db["vault_keys"].columns_dict == {"key_id": int, "probe": bytes, "created_at": float}
    assert {"audit_log_no_update", "audit_log_no_delete"} <= {t.name for t in db.triggers}


async def test_an_act_cut_short_by_a_full_disk_keeps_none_of_its_writes(tmp_path):
    store = Store(tmp_path / "full.db")
    store.open()

    def two_writes(db):
        with transaction(db):
            db.execute("INSERT INTO tokens (app_id, token, expires_at) VALUES ('first', 't', 0)")
            db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
            db.execute("INSERT INTO tokens (app_id, token, expires_at) VALUES ('second', ?, 0)", ["x" * 50000])

    with pytest.raises(StoreError, match=f"{tmp_path / 'full.db'}: cannot write .*full.*Free disk space"):
        await store.run(two_writes)
    await store.run(lambda db: db.execute("PRAGMA max_page_count = 1073741823"))
    assert await store.run(lambda db: db["tokens"].count) == 0
    store.close()
