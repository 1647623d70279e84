"""Encryption at rest on real files: nothing a user said, was answered or is named by appears in the raw database or
its WAL; a missing, open or wrong key file is refused with its name; altered or moved values fail for their row
only; keys rotate while the service keeps reading and writing."""

import os
import threading
import time

import pytest

from appliance.app_keys import STORE
from appliance.config import load_config
from appliance.dialog.engine import _recent_turns, _remember
from appliance.errors import UnreadableValue, VaultError
from appliance.store.conversations import conversation, messages, users
from appliance.store.database import Store
from appliance.store.rotation import rotate
from appliance.wechat.envelope import Account
from appliance.wechat.sim import Platform, event_message, text_message
from tests.conftest import write_config

APP_ID = "wx-sealed-account"
OPENID = "oQ7Xs5FbG0secretOpenIdZz"
PLATFORM = Platform(Account("mp", APP_ID, "AAAAA", ""), "plain")


@pytest.fixture
async def client(start_box, tiny_fp32, tmp_path, monkeypatch):
    monkeypatch.setenv("R1BOX_WECHAT_TOKEN", "AAAAA")
    path = write_config(tmp_path, tiny_fp32, '[engine]\nmax_batch = 2\nmax_length = 256\nthink_budget = 4\n'
                        f'[wechat]\napp_id = "{APP_ID}"\nmode = "plain"\n[dialog]\nmax_tokens = 24\n')
    return await start_box(load_config(path))


async def _say(client, xml: str) -> str | None:
    request = PLATFORM.message(xml)
    resp = await client.post(f"/wechat?{request.query}", data=request.body)
    assert resp.status == 200
    return PLATFORM.read_reply(await resp.text())


async def test_the_raw_database_and_its_wal_hold_no_plaintext(client, tmp_path):
    questions = ["我的账户余额是多少请帮我查一下", "Please-close-account-4417-8812"]
    answers = [await _say(client, text_message(APP_ID, OPENID, q, 900 + i)) for i, q in enumerate(questions)]
    await _say(client, event_message(APP_ID, OPENID, "subscribe", key="qrscene_branch_0042"))
    store = client.app[STORE]
    user = store.vault.user_hash(APP_ID, OPENID)
    # what was stored reads back whole through the one read path
    stored = await store.run(messages, store.vault, APP_ID, user)
    assert [m["question"] for m in stored if m["kind"] == "text"] == questions
    stored_answers = [m["answer"] for m in stored if m["kind"] == "text"]
    assert [_xml_newlines(a) for a in stored_answers] == answers  # the reply went through XML: \r\n became \n
    assert len(await store.run(conversation, store.vault, APP_ID, user)) == 4
    raw = b"".join(p.read_bytes() for p in (tmp_path / "r1box.db", tmp_path / "r1box.db-wal") if p.exists())
    assert (tmp_path / "r1box.db-wal").stat().st_size > 0  # the service's writes are still in the WAL
    secrets = [OPENID, *questions, "qrscene_branch_0042", f"{OPENID}:msg:900"]
    secrets += [a for a in stored_answers if len(a.encode()) >= 8]
    assert len(secrets) > 5
    encodings = ("utf-8", "utf-16-le", "utf-16-be")  # SQLite may store text in any of them
    assert [text for text in secrets for e in encodings if text.encode(e) in raw] == []
    assert user.encode() in raw  # the keyed hash stands in for the user


def _xml_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _store(path, key_file=None) -> Store:
    store = Store(path, key_file)
    store.open()
    return store


def test_a_new_database_and_its_key_file_are_private(tmp_path):
    store = _store(tmp_path / "r1box.db")
    store.call(_remember, store.vault, "a", "u", "问", "答")
    for name in ("r1box.keys", "r1box.db", "r1box.db-wal"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    store.close()


def test_a_missing_wrong_or_open_key_file_is_refused_with_its_name(tmp_path):
    store = _store(tmp_path / "r1box.db")
    store.call(_remember, store.vault, "a", "u", "问", "答")
    store.close()
    keys = tmp_path / "r1box.keys"
    keys.rename(tmp_path / "kept.keys")
    with pytest.raises(VaultError, match=f"{keys}: key file not found.*restore it"):
        _store(tmp_path / "r1box.db")
    assert not keys.exists()  # refused, not replaced by a new key that would orphan the rows
    _store(tmp_path / "other.db").close()  # another database's key file, other.keys
    with pytest.raises(VaultError, match="is not this database's key file"):
        _store(tmp_path / "r1box.db", tmp_path / "other.keys")
    os.chmod(tmp_path / "kept.keys", 0o644)
    with pytest.raises(VaultError, match="chmod 600"):
        _store(tmp_path / "r1box.db", tmp_path / "kept.keys")
    os.chmod(tmp_path / "kept.keys", 0o600)
    (tmp_path / "bad.keys").write_text("{not json")
    os.chmod(tmp_path / "bad.keys", 0o600)
    with pytest.raises(VaultError, match="bad.keys: cannot read the key file"):
        _store(tmp_path / "r1box.db", tmp_path / "bad.keys")
    store = _store(tmp_path / "r1box.db", tmp_path / "kept.keys")
    assert [t["content"] for t in store.call(_recent_turns, store.vault, "a", "u", 0, 10)] == ["问", "答"]
    store.close()


def test_an_altered_or_moved_value_fails_for_its_row_only(tmp_path):
    store = _store(tmp_path / "r1box.db")
    vault, user = store.vault, store.vault.user_hash("a", "u")
    for i in range(3):
        store.call(_remember, vault, "a", "u", f"问题{i}", f"回答{i}")

    def alter(db):
        blob = bytearray(db.execute("SELECT content FROM turns WHERE id = 3").fetchone()[0])
        blob[-1] ^= 1
        db.execute("UPDATE turns SET content = ? WHERE id = 3", [bytes(blob)])
        moved = db.execute("SELECT content FROM turns WHERE id = 1").fetchone()[0]  # a valid value, wrong row
        db.execute("UPDATE turns SET content = ? WHERE id = 5", [moved])
        db.conn.commit()

    store.call(alter)
    turns = store.call(conversation, vault, "a", user)
    assert [t["content"] for t in turns] == ["问题0", "回答0", None, "回答1", None, "回答2"]
    assert "turns.content of row 3 fails its authentication check" in turns[2]["error"]
    assert "row 5" in turns[4]["error"] and "error" not in turns[5]
    # the dialog goes on without them
    remembered = store.call(_recent_turns, vault, "a", "u", 0, 10)
    assert [t["content"] for t in remembered] == ["问题0", "回答0", "回答1", "回答2"]
    with pytest.raises(UnreadableValue, match="not a sealed value"):
        vault.unseal("plain text", "turns", "content", 1)
    store.close()


def test_sql_in_every_field_is_data(tmp_path):
    store = _store(tmp_path / "r1box.db")
    evil = "x'); DROP TABLE turns; --"
    store.call(_remember, store.vault, evil, evil, evil, "' OR '1'='1")
    store.call(_remember, store.vault, "a", "victim", "问", "答")
    assert store.call(users, "' OR 1=1 --") == []
    user = store.vault.user_hash(evil, evil)
    assert [t["content"] for t in store.call(conversation, store.vault, evil, user)] == [evil, "' OR '1'='1"]
    assert store.call(conversation, store.vault, "a", "' OR '1'='1") == []
    assert len(store.call(conversation, store.vault, "a", store.vault.user_hash("a", "victim"))) == 2
    store.close()


def test_rows_from_before_encryption_are_sealed_at_start(tmp_path):
    store = _store(tmp_path / "r1box.db")
    store.call(lambda db: db["turns"].insert({"account": "a", "user": OPENID, "role": "user",
                                              "content": "加密之前的问题", "created_at": time.time()}))
    store.close()
    store = _store(tmp_path / "r1box.db")
    assert store.call(_recent_turns, store.vault, "a", OPENID, 0, 10) == [{"role": "user",
                                                                          "content": "加密之前的问题"}]
    row = store.call(lambda db: db["turns"].get(1))
    assert row["user"] == store.vault.user_hash("a", OPENID) and row["key_id"] == 1
    ops = store.call(lambda db: [r[0] for r in db.execute("SELECT operation FROM audit_log")])
    assert ops == ["seal_plaintext_rows"]
    store.close()


def test_keys_rotate_while_the_service_reads_and_writes(tmp_path):
    service = _store(tmp_path / "r1box.db")
    vault = service.vault
    for i in range(450):  # more than two batches
        service.call(_remember, vault, "a", f"user{i % 7}", f"问题{i}", f"回答{i}")
    rotator = _store(tmp_path / "r1box.db")  # `r1box keys rotate`: its own connection to the same files
    done, failures, served = threading.Event(), [], [0]

    def keep_serving():
        i = 0
        while not done.is_set():
            try:
                service.call(_remember, vault, "a", "live", f"新问题{i}", f"新回答{i}")
                turns = service.call(_recent_turns, vault, "a", f"user{i % 7}", 0, 1000)
                assert len(turns) >= 128 and all(t["content"] for t in turns)
                served[0] += 1
            except Exception as e:  # noqa: BLE001 - any failure while rotating is the finding
                failures.append(repr(e))
            i += 1

    worker = threading.Thread(target=keep_serving)
    worker.start()
    try:
        result = rotator.call(rotate, rotator.vault, "cli:test", 100)
    finally:
        done.set()
        worker.join()
    assert failures == [] and served[0] > 0
    assert result["key_id"] == 2 and result["unreadable"] == 0 and result["resealed"] >= 900
    assert vault.current == 2  # the service picked up the new key file by itself
    service.call(_remember, vault, "a", "after", "轮换之后", "好")
    left = service.call(lambda db: db.execute("SELECT count(*) FROM turns WHERE key_id < 2").fetchone()[0])
    written_during = service.call(lambda db: db.execute("SELECT count(*) FROM turns WHERE user = ?",
                                                        [vault.user_hash("a", "live")]).fetchone()[0])
    assert left <= written_during  # only rows the service wrote with key 1 while the rotation ran
    assert rotator.call(rotate, rotator.vault, "cli:test")["key_id"] == 3
    assert service.call(lambda db: db.execute("SELECT count(*) FROM turns WHERE key_id < 3").fetchone()[0]) == 0
    audit = service.call(lambda db: [r[0] for r in db.execute("SELECT operation FROM audit_log")])
    assert audit == ["keys_rotate", "keys_rotate"]
    rotator.close()
    service.close()
