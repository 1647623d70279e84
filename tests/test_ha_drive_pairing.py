"""The image's pairing through the CONFIG drive (firmware_image/rootfs/usr/lib/r1box/r1box-setup, `share_pair`), on
real files: the first box makes the keys and writes them to its drive's ha-pair folder; the second installs them
from its drive, keeping the store it had made alone (and that store's keys) aside; a half-copied folder is refused.
The boot itself is tests/test_image_ha.py's."""

import importlib.machinery
import importlib.util
import os
import pwd
import shutil
import sqlite3
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parent.parent / "firmware_image/rootfs/usr/lib/r1box/r1box-setup"
FILES = {"r1box-ha.key", "r1box-ha.key.pub", "r1box-ha.key.host", "r1box-ha.key.host.pub", "r1box.keys"}


@pytest.fixture
def setup():
    loader = importlib.machinery.SourceFileLoader("r1box_setup", str(SETUP))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("r1box_setup", loader))
    loader.exec_module(module)
    module.said = []
    module.console = module.said.append
    return module


def _box(root: Path, name: str) -> dict:
    (root / name / "db").mkdir(parents=True)
    (root / name / "keys").mkdir()
    return {"path": str(root / name / "db" / "r1box.db"), "key_file": str(root / name / "keys" / "r1box.keys")}


def test_the_pair_travels_on_the_config_drive(setup, tmp_path):
    me = pwd.getpwuid(os.getuid())
    first, second = _box(tmp_path, "a"), _box(tmp_path, "b")
    setup.PAIR = tmp_path / "drive-a" / "ha-pair"
    setup.PAIR.parent.mkdir()
    setup.share_pair(me, first)
    assert {p.name for p in setup.PAIR.iterdir()} == FILES
    assert "copy the folder ha-pair" in setup.said[-1]
    key = Path(first["path"]).parent / "r1box-ha.key"
    assert key.stat().st_mode & 0o777 == 0o600

    # the second box started alone first: its own keys and a store sealed with them
    setup.PAIR = tmp_path / "drive-b" / "ha-pair"
    setup.PAIR.parent.mkdir()
    setup.share_pair(me, second)
    with sqlite3.connect(second["path"]) as db:
        db.execute("CREATE TABLE kept (x)")
    own_keys = Path(second["key_file"]).read_bytes()
    # a person copies the first box's folder over the second's; its next boot installs it
    shutil.rmtree(setup.PAIR)
    shutil.copytree(tmp_path / "drive-a" / "ha-pair", setup.PAIR)
    setup.share_pair(me, second)
    for name in FILES - {"r1box.keys"}:
        assert (Path(second["path"]).parent / name).read_bytes() == (Path(first["path"]).parent / name).read_bytes()
    assert Path(second["key_file"]).read_bytes() == Path(first["key_file"]).read_bytes()
    aside = next(Path(second["path"]).parent.glob("r1box.db.older-*"))
    assert sqlite3.connect(aside).execute("SELECT name FROM sqlite_master").fetchall() == [("kept",)]
    suffix = aside.name.removeprefix("r1box.db")
    assert (Path(second["key_file"]).parent / f"r1box.keys{suffix}").read_bytes() == own_keys
    said = len(setup.said)
    setup.share_pair(me, second)  # the same folder again: nothing to do, nothing said
    assert len(setup.said) == said

    (setup.PAIR / "r1box-ha.key.host").unlink()
    with pytest.raises(ValueError, match="lacks r1box-ha.key.host"):
        setup.share_pair(me, second)
