"""Retention and the right to deletion on real files and the real app: what is past its days goes, system events
stay without the OpenID, the scheduled job runs inside the service, a user's data goes on request and on
unsubscribe, and each purge leaves exactly one audit row of counts."""

import asyncio
import json
import time

import pytest

from appliance.app_keys import STORE
from appliance.cli import main
from appliance.config import load_config
from appliance.dialog.engine import _remember
from appliance.errors import ConfigError
from appliance.store.database import Store
from appliance.store.retention import DAY_S, purge_expired, purge_user
from appliance.wechat.envelope import Account
from appliance.wechat.service import Inbound, _record
from appliance.wechat.sim import Platform, event_message, text_message
from tests.conftest import write_config

APP_ID = "wx-retention"


def _audit(store, operation):
    return store.call(lambda db: [json.loads(r[0]) for r in db.execute(
        "SELECT details FROM audit_log WHERE operation = ? ORDER BY id", [operation])])


def _age(store, table, column, days):
    store.call(lambda db: (db.execute(f"UPDATE {table} SET {column} = {column} - ?", [days * DAY_S]),
                           db.conn.commit()))


def _message(store, user, key, kind="text", content="问题"):
    vault = store.vault
    store.call(_record, vault, Inbound(APP_ID, user, kind, content, vault.ref(key), int(time.time())))


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "r1box.db")
    store.open()
    yield store
    store.close()


def test_expired_rows_go_events_stay_and_one_audit_row_counts_them(store):
    _message(store, "old", "k1")
    _message(store, "old", "k2", "event:subscribe", "qrscene_1")
    store.call(_remember, store.vault, APP_ID, "old", "旧问题", "旧回答")
    store.call(lambda db: db.execute("INSERT INTO audit_log (operation, timestamp, details) VALUES "
                                      "('login', ?, '{}'), ('login', ?, '{}')",
                                      [time.time() - 181 * DAY_S, time.time() - 179 * DAY_S]) and db.conn.commit())
    _age(store, "inbound", "received_at", 31)
    _age(store, "turns", "created_at", 31)
    _message(store, "new", "k3")
    store.call(_remember, store.vault, APP_ID, "new", "新问题", "新回答")
    counts = store.call(purge_expired, 30, 180, "system")
    assert counts == {"inbound": 1, "turns": 2, "outbox": 0, "release_samples": 0, "events_stripped": 1,
                      "audit_log": 1}
    left = store.call(lambda db: [(r["kind"], r["user_sealed"], r["content"]) for r in db["inbound"].rows])
    assert left[0] == ("event:subscribe", None, None) and len(left) == 2  # the event, without who and its key
    assert store.call(lambda db: db["turns"].count) == 2
    assert _audit(store, "retention") == [{"conversation_days": 30, "audit_days": 180, **counts}]
    assert store.call(purge_expired, 30, 180, "system")["audit_log"] == 0  # the 179-day row stays


def test_purge_now_from_the_command_line(store, tmp_path, capsys):
    store.call(_remember, store.vault, APP_ID, "u", "问", "答")
    _age(store, "turns", "created_at", 3)
    config = tmp_path / "r1box.toml"
    config.write_text(f'[store]\npath = "{tmp_path / "r1box.db"}"\nconversation_days = 2\n')
    assert main(["purge", "--config", str(config)]) == 0  # beside the open store
    assert json.loads(capsys.readouterr().out)["turns"] == 2
    assert [r["turns"] for r in _audit(store, "retention")] == [2]
    actor = store.call(lambda db: db.execute("SELECT user_id FROM audit_log").fetchone()[0])
    assert actor.startswith("cli:")


def test_the_audit_log_refuses_changes_outside_retention(store):
    import sqlite3

    store.call(lambda db: db.execute("INSERT INTO audit_log (operation, timestamp) VALUES ('login', 1)")
               and db.conn.commit())
    for sql in ("UPDATE audit_log SET operation = 'nothing'", "DELETE FROM audit_log"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            store.call(lambda db: db.execute(sql))
    assert store.call(lambda db: db["audit_log"].count) == 1
    assert store.call(purge_expired, 30, 180, "system")["audit_log"] == 1  # retention may


def test_purge_user_takes_everything_of_one_user_and_nothing_else(tmp_path, capsys, monkeypatch):
    for name in ("SSH_CONNECTION", "SSH_CLIENT"):  # at the box's console
        monkeypatch.delenv(name, raising=False)
    from appliance.wechat.outbox import _enqueue

    store = Store(tmp_path / "r1box.db")
    store.open()
    for user in ("leaving", "staying"):
        _message(store, user, f"{user}-1")
        store.call(_remember, store.vault, APP_ID, user, "问", "答")
        store.call(_enqueue, store.vault, APP_ID, user, store.vault.ref(f"{user}-1"), "推送", time.time())
    store.close()
    config = tmp_path / "r1box.toml"
    config.write_text(f'[wechat]\napp_id = "{APP_ID}"\nmode = "plain"\ntoken = "t"\n'
                      f'[store]\npath = "{tmp_path / "r1box.db"}"\n')
    assert main(["purge-user", "--config", str(config), "' OR '1'='1"]) == 0  # a name, not SQL: nothing matches
    assert json.loads(capsys.readouterr().out) | {"user": ""} == {"user": "", "inbound": 0, "turns": 0,
                                                                  "outbox": 0, "release_samples": 0}
    assert main(["purge-user", "--config", str(config), "--account", f"{APP_ID}' OR 1=1 --", "leaving"]) == 0
    assert json.loads(capsys.readouterr().out)["turns"] == 0
    assert main(["purge-user", "--config", str(config), "leaving"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result | {"user": ""} == {"user": "", "inbound": 1, "turns": 2, "outbox": 1,
                                        "release_samples": 0}
    store = Store(tmp_path / "r1box.db")
    store.open()
    hashes = store.call(lambda db: {r[0] for t in ("inbound", "turns", "outbox")
                                    for r in db.execute(f"SELECT user FROM {t}")})
    assert hashes == {store.vault.user_hash(APP_ID, "staying")}
    rows = _audit(store, "purge_user")
    assert len(rows) == 3 and rows[2]["user"] == result["user"] and rows[2]["reason"] == "request"
    actor, address = store.call(lambda db: db.execute("SELECT user_id, ip_address FROM audit_log "
                                                      "ORDER BY id DESC").fetchone())
    assert actor.startswith("cli:") and address == "local"
    store.close()


def test_a_command_run_over_ssh_is_audited_with_the_client_address(store, monkeypatch):
    monkeypatch.setenv("SSH_CONNECTION", "10.8.0.23 52144 10.8.0.1 22")
    store.call(purge_expired, 30, 180, "cli:operator")
    row = store.call(lambda db: db.execute("SELECT user_id, ip_address FROM audit_log").fetchone())
    assert row == ("cli:operator", "10.8.0.23")


def test_a_full_disk_leaves_nothing_half_done(store):
    from appliance.store.database import StoreError

    account, reason = APP_ID, "用户书面申请" * 2000  # the audit row needs new pages: it fails after the deletes
    store.call(_remember, store.vault, account, "u", "问", "答")
    user = store.vault.user_hash(account, "u")

    def fill(db):  # the disk is full: no page may be added to the database
        db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")

    store.call(fill)
    with pytest.raises(StoreError, match="full.*nothing of this change was kept. Free disk space"):
        store.call(purge_user, account, user, "cli:test", reason)
    with pytest.raises(StoreError, match="nothing of this change was kept"):
        store.call(_remember, store.vault, account, "u", "再问", "答" * 20000)
    store.call(lambda db: db.execute("PRAGMA max_page_count = 1073741823"))
    assert store.call(lambda db: (db["turns"].count, db["audit_log"].count)) == (2, 0)
    assert store.call(purge_user, account, user, "cli:test", reason)["turns"] == 2  # room again: it works


async def test_unsubscribe_purges_through_the_same_path(start_box, tiny_fp32, tmp_path, monkeypatch):
    monkeypatch.setenv("R1BOX_WECHAT_TOKEN", "AAAAA")
    path = write_config(tmp_path, tiny_fp32, '[engine]\nmax_batch = 2\nmax_length = 256\nthink_budget = 4\n'
                        f'[wechat]\napp_id = "{APP_ID}"\nmode = "plain"\n[dialog]\nmax_tokens = 8\n')
    client = await start_box(load_config(path))
    platform = Platform(Account("mp", APP_ID, "AAAAA", ""), "plain")
    for xml in (text_message(APP_ID, "bye", "你好", 1), event_message(APP_ID, "bye", "unsubscribe")):
        request = platform.message(xml)
        assert (await client.post(f"/wechat?{request.query}", data=request.body)).status == 200
    store = client.app[STORE]
    user = store.vault.user_hash(APP_ID, "bye")
    rows = await store.run(lambda db: list(db["inbound"].rows))
    assert [(r["kind"], r["user"], r["user_sealed"], r["content"]) for r in rows] == [
        ("event:unsubscribe", user, None, None)]
    assert await store.run(lambda db: db["turns"].count) == 0
    audit = await store.run(lambda db: [(r["operation"], r["user_id"], json.loads(r["details"]))
                                        for r in db["audit_log"].rows])
    assert audit == [("purge_user", user, {"account": APP_ID, "user": user, "reason": "unsubscribe",
                                           "release_samples": 0, "inbound": 1, "turns": 2, "outbox": 0})]


async def test_the_service_purges_on_its_schedule(start_box, tiny_fp32, tmp_path):
    path = write_config(tmp_path, tiny_fp32, "")
    path.write_text(path.read_text() + "conversation_days = 1\nretention_interval_h = 0.0005\n")  # 1.8 s
    client = await start_box(load_config(path))
    store = client.app[STORE]
    await store.run(_remember, store.vault, "a", "u", "问", "答")
    await store.run(lambda db: (db.execute("UPDATE turns SET created_at = created_at - 2 * 86400"),
                                db.conn.commit()))
    for _ in range(100):
        runs = await store.run(lambda db: db.execute("SELECT details FROM audit_log WHERE operation = 'retention'")
                               .fetchall())
        if runs:
            break
        await asyncio.sleep(0.1)
    assert [json.loads(r[0])["turns"] for r in runs] == [2]
    assert await store.run(lambda db: db["turns"].count) == 0


@pytest.mark.parametrize("line", ["conversation_days = 0", "audit_days = -1", "retention_interval_h = 0"])
def test_retention_settings_are_checked(tmp_path, line):
    path = tmp_path / "r1box.toml"
    path.write_text(f"[store]\n{line}\n")
    with pytest.raises(ConfigError, match=r"\[store\]"):
        load_config(path)
