"""`r1box backup` and `r1box restore` through the command line on real files: a backup taken beside a running
store restores to the same rows; it reveals nothing without the key file; an altered, truncated or foreign backup is
refused before the live file is touched; a running service's database is never swapped; each act is audited once."""

import json

import pytest

from appliance.cli import main
from appliance.dialog.engine import _remember
from appliance.store.conversations import conversation
from appliance.store.database import Store

SECRET = "保险箱密码是四八一五"


@pytest.fixture
def setup(tmp_path):
    config = tmp_path / "r1box.toml"
    config.write_text(f'[store]\npath = "{tmp_path / "data" / "r1box.db"}"\n')
    store = Store(tmp_path / "data" / "r1box.db")
    store.open()
    for i in range(50):
        store.call(_remember, store.vault, "a", f"user{i % 5}", f"{SECRET} {i}", f"回答 {i}")
    return config, store


def _dump(store) -> dict:
    vault = store.vault
    return {u: store.call(conversation, vault, "a", vault.user_hash("a", u)) for u in (f"user{i}" for i in range(5))}


def _operations(store) -> list[str]:
    return store.call(lambda db: [r[0] for r in db.execute("SELECT operation FROM audit_log ORDER BY id")])


def test_backup_beside_a_running_store_restores_to_the_same_rows(setup, tmp_path, capsys):
    config, service = setup
    backup = tmp_path / "backups" / "r1box.backup"
    assert main(["backup", "--config", str(config), str(backup)]) == 0  # the service keeps its database open
    assert json.loads(capsys.readouterr().out)["file"] == str(backup)
    assert backup.stat().st_mode & 0o777 == 0o600
    raw = backup.read_bytes()
    assert SECRET.encode() not in raw and b"SQLite format 3" not in raw and b"CREATE TABLE" not in raw
    before = _dump(service)
    assert _operations(service) == ["backup"]
    # restoring over the running service's database is refused, with or without --force
    for force in ([], ["--force"]):
        assert main(["restore", "--config", str(config), str(backup), *force]) == 7
        assert "stop the service first" in capsys.readouterr().err
    service.call(_remember, service.vault, "a", "user0", "备份之后的问题", "回答")
    service.close()
    assert main(["restore", "--config", str(config), str(backup)]) == 7  # stopped, but the file exists
    assert "--force" in capsys.readouterr().err
    assert main(["restore", "--config", str(config), str(backup), "--force"]) == 0
    aside = json.loads(capsys.readouterr().out)["moved_aside"]
    restored = Store(tmp_path / "data" / "r1box.db")
    restored.open()
    assert _dump(restored) == before  # the question asked after the backup is not in it
    assert _operations(restored) == ["restore"]  # the backup's own row was written after the copy
    restored.close()
    replaced = Store(aside, tmp_path / "data" / "r1box.keys")  # moved aside whole, not deleted
    replaced.open()
    assert len(_dump(replaced)["user0"]) == len(before["user0"]) + 2
    replaced.close()


def test_a_restore_onto_an_empty_place_needs_no_force(setup, tmp_path, capsys):
    config, service = setup
    backup = tmp_path / "b.backup"
    assert main(["backup", "--config", str(config), str(backup)]) == 0
    before = _dump(service)
    service.close()
    other = tmp_path / "other.toml"
    other.write_text(f'[store]\npath = "{tmp_path / "new" / "r1box.db"}"\n'
                     f'key_file = "{tmp_path / "data" / "r1box.keys"}"\n')
    capsys.readouterr()
    assert main(["restore", "--config", str(other), str(backup)]) == 0
    restored = Store(tmp_path / "new" / "r1box.db", tmp_path / "data" / "r1box.keys")
    restored.open()
    assert _dump(restored) == before
    restored.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "append", "not-a-backup"])
def test_an_altered_backup_is_refused_and_the_database_left_alone(setup, tmp_path, capsys, damage):
    config, service = setup
    backup = tmp_path / "b.backup"
    assert main(["backup", "--config", str(config), str(backup)]) == 0
    service.close()
    data = bytearray(backup.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x20
    elif damage == "truncate":
        data = data[:-100]
    elif damage == "append":
        data += b"\x00\x00\x00\x10" + bytes(16)
    else:
        data = bytearray(b"SQLite format 3\x00" + bytes(100))
    backup.write_bytes(bytes(data))
    db = tmp_path / "data" / "r1box.db"
    before = db.read_bytes()
    capsys.readouterr()
    assert main(["restore", "--config", str(config), str(backup), "--force"]) == 8
    err = capsys.readouterr().err
    assert str(backup) in err and ("altered" in err or "truncated" in err or "not an r1box backup" in err)
    assert db.read_bytes() == before and not list(db.parent.glob("*.before-restore-*"))


def test_a_backup_needs_its_key_file(setup, tmp_path, capsys):
    config, service = setup
    backup = tmp_path / "b.backup"
    assert main(["backup", "--config", str(config), str(backup)]) == 0
    service.close()
    stranger = tmp_path / "stranger.toml"
    stranger.write_text(f'[store]\npath = "{tmp_path / "s" / "r1box.db"}"\n')
    seed = Store(tmp_path / "s" / "seed.db", tmp_path / "s" / "r1box.keys")  # makes another box's key file
    seed.open()
    seed.close()
    capsys.readouterr()
    assert main(["restore", "--config", str(stranger), str(backup)]) == 8
    assert "fails its authentication" in capsys.readouterr().err
    assert main(["restore", "--config", str(config), str(tmp_path / "nowhere.backup"), "--force"]) == 7
    assert "nowhere.backup: No such file or directory" in capsys.readouterr().err
    missing = tmp_path / "missing.toml"
    missing.write_text(f'[store]\npath = "{tmp_path / "m" / "r1box.db"}"\n')
    assert main(["restore", "--config", str(missing), str(backup)]) == 8
    assert f"{tmp_path / 'm' / 'r1box.keys'}: key file not found" in capsys.readouterr().err


def test_backups_made_before_a_rotation_still_restore(setup, tmp_path, capsys):
    config, service = setup
    backup = tmp_path / "b.backup"
    assert main(["backup", "--config", str(config), str(backup)]) == 0
    before = _dump(service)
    assert main(["keys", "rotate", "--config", str(config)]) == 0  # beside the running store
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["resealed"] == 100
    assert _dump(service) == before
    assert _operations(service) == ["backup", "keys_rotate"]
    service.close()
    assert main(["restore", "--config", str(config), str(backup), "--force"]) == 0
    restored = Store(tmp_path / "data" / "r1box.db")
    restored.open()
    assert _dump(restored) == before
    restored.close()


@pytest.mark.parametrize("change", ["none", "drop-last", "swap", "drop-first"])
def test_chunks_are_bound_to_their_place(tmp_path, monkeypatch, change):
    import io
    import os

    from appliance.errors import VaultError
    from appliance.store import backup as backup_module
    from appliance.store.vault import Keyring

    monkeypatch.setattr(backup_module, "CHUNK", 1000)
    keyring = Keyring.create(tmp_path / "k.keys")
    plain = tmp_path / "plain"
    plain.write_bytes(os.urandom(3500))  # four chunks, the last one short
    sealed = io.BytesIO()
    backup_module.encrypt_file(plain, sealed, 1, keyring.keys[1])
    data = sealed.getvalue()
    header, body = data[:backup_module.HEADER], data[backup_module.HEADER:]
    chunks, at = [], 0
    while at < len(body):
        size = int.from_bytes(body[at:at + 4], "big")
        chunks.append(body[at:at + 4 + size])
        at += 4 + size
    assert len(chunks) == 4
    chunks = {"none": chunks, "drop-last": chunks[:-1], "swap": [chunks[1], chunks[0], *chunks[2:]],
              "drop-first": chunks[1:]}[change]
    (tmp_path / "b").write_bytes(header + b"".join(chunks))
    out = io.BytesIO()
    if change == "none":
        backup_module.decrypt_file(tmp_path / "b", out, keyring)
        assert out.getvalue() == plain.read_bytes()
    else:
        with pytest.raises(VaultError, match="truncated|fails its authentication"):
            backup_module.decrypt_file(tmp_path / "b", out, keyring)
