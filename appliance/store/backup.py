"""`r1box backup` and `r1box restore`: a consistent copy of the live database, encrypted whole.

The copy is taken with SQLite's online backup API (the service keeps answering), then encrypted in 1 MiB chunks
with AES-256-GCM under a key derived (HKDF, random salt) from the key file's newest key. The header names that key;
each chunk's nonce is its number and whether it is the last, so reordered, dropped or truncated chunks fail like
altered ones. A stolen backup reveals nothing without the key file, which is never part of it: keep a copy of the
key file elsewhere.

Restore checks everything before it touches the live file: the backup's authentication, SQLite's full integrity
check, that this release knows its migrations, and that the key file opens its rows. It refuses while a service (or
any r1box command) uses the database, since a file swapped under an open connection is lost or corrupted; stop the
service first. An existing database is replaced only with --force, and even then moved aside, never deleted.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.errors import VaultError
from appliance.store import audit
from appliance.store.database import MIGRATIONS, StoreError, lock_file, open_database
from appliance.store.vault import Keyring, open_vault

MAGIC = b"R1BOXBK1"
HEADER = len(MAGIC) + 4 + 16  # magic, key id, salt
CHUNK = 1 << 20
SIDE_FILES = ("-wal", "-shm")


def _file_key(key: bytes, salt: bytes) -> AESGCM:
    return AESGCM(HKDF(hashes.SHA256(), 32, salt, b"r1box backup").derive(key))


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(8, "big") + (b"\x00\x00\x00\x01" if last else bytes(4))


def encrypt_file(src: Path, dst, key_id: int, key: bytes) -> None:
    salt = os.urandom(16)
    header = MAGIC + key_id.to_bytes(4, "big") + salt
    aead = _file_key(key, salt)
    dst.write(header)
    with open(src, "rb") as f:
        chunk, index = f.read(CHUNK), 0
        while True:
            following = f.read(CHUNK)
            sealed = aead.encrypt(_nonce(index, not following), chunk, header)
            dst.write(len(sealed).to_bytes(4, "big") + sealed)
            if not following:
                return
            chunk, index = following, index + 1


def decrypt_file(src: Path, dst, keyring: Keyring) -> None:
    with open(src, "rb") as f:
        header = f.read(HEADER)
        if len(header) != HEADER or not header.startswith(MAGIC):
            raise VaultError(f"{src} is not an r1box backup.")
        key_id = int.from_bytes(header[len(MAGIC):len(MAGIC) + 4], "big")
        if key_id not in keyring.keys:
            raise VaultError(f"{src} is encrypted with key {key_id}, which {keyring.path} lacks; use the key file "
                             "that was in place when the backup was made.")
        aead, index = _file_key(keyring.keys[key_id], header[len(MAGIC) + 4:]), 0
        while True:
            size = f.read(4)
            if len(size) != 4:
                raise VaultError(f"{src} is truncated (it ends before its last chunk); use another backup.")
            sealed = f.read(int.from_bytes(size, "big"))
            for last in (False, True):
                try:
                    dst.write(aead.decrypt(_nonce(index, last), sealed, header))
                    break
                except InvalidTag:
                    continue
            else:
                raise VaultError(f"{src} fails its authentication at chunk {index}: it was altered or damaged, or "
                                 "was made with another key file; use another backup.")
            if last:
                if f.read(1):
                    raise VaultError(f"{src} has data after its last chunk: it was altered; use another backup.")
                return
            index += 1


def backup(store, out: Path, actor: str) -> dict:
    """Copy the open store's database into `out`, encrypted; one audit row in the live database."""
    try:
        return _backup(store, Path(out), actor)
    except OSError as e:
        raise StoreError(f"{e.filename or out}: cannot write the backup ({e.strerror}); nothing was kept.") from None


def _backup(store, out: Path, actor: str) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".r1box-backup-", dir=out.parent))  # 0700: the plain copy is private
    try:
        plain = work / "copy.db"

        def copy(db) -> tuple[int, bytes]:
            target = sqlite3.connect(plain)
            try:
                db.conn.backup(target)
            finally:
                target.close()
            kid = store.vault.current
            return kid, store.vault.key(kid)

        key_id, key = store.call(copy)
        partial = work / "backup.partial"
        with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            encrypt_file(plain, f, key_id, key)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    details = {"file": str(out), "bytes": out.stat().st_size, "key_id": key_id}
    store.call(audit.record, "backup", details, actor)
    return details


def restore(src: Path, path: Path, key_file: Path, actor: str, force: bool = False) -> dict:
    """Put the backup `src` in place as the database `path`, after checking it whole; one audit row in it."""
    try:
        return _restore(Path(src), Path(path), key_file, actor, force)
    except OSError as e:
        raise StoreError(f"{e.filename or src}: {e.strerror}; the database was left as it was.") from None


def _restore(src: Path, path: Path, key_file: Path, actor: str, force: bool) -> dict:
    keyring = Keyring.load(key_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(lock_file(path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"{path} is in use by a running r1box (the service, or a backup): stop the service "
                             "first (systemctl stop r1box), then restore.") from None
        if path.exists() and not force:
            raise StoreError(f"{path} exists; restore with --force to replace it (it is moved aside, not deleted).")
        work = Path(tempfile.mkdtemp(prefix=".r1box-restore-", dir=path.parent))
        try:
            candidate = work / path.name
            with open(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                decrypt_file(src, f, keyring)
            _check(candidate, key_file)
            aside = _move_aside(path) if path.exists() else None
            os.replace(candidate, path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        db = open_database(path)
        try:
            details = {"file": str(src), "moved_aside": str(aside) if aside else None}
            audit.record(db, "restore", details, actor)
        finally:
            db.conn.close()
        return details
    finally:
        os.close(lock)


def _check(candidate: Path, key_file: Path) -> None:
    """The decrypted copy as a database: intact, of a release this one can migrate, and opened by the key file."""
    conn = sqlite3.connect(candidate)
    try:
        result = conn.execute("PRAGMA integrity_check").fetchone()[0]
        names = {r[0] for r in conn.execute("SELECT name FROM _migrations")}
    except sqlite3.DatabaseError as e:
        raise StoreError(f"the backup decrypts but is not a usable r1box database ({e}); use another backup.") \
            from None
    finally:
        conn.close()
    if result != "ok":
        raise StoreError(f"the backup decrypts but fails SQLite's integrity check ({result}); use another backup.")
    unknown = names - {name for name, _ in MIGRATIONS}
    if unknown:
        raise StoreError(f"the backup comes from a newer r1box (migration {sorted(unknown)[0]}); restore it with "
                         "that release.")
    db = open_database(candidate)
    try:
        open_vault(db, key_file)
    finally:
        db.conn.close()


def _move_aside(path: Path) -> Path:
    """The replaced database and its WAL files, renamed together so they stay a consistent set."""
    aside = path.with_name(f"{path.name}.before-restore-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.replace(side, aside.with_name(aside.name + suffix))
    os.replace(path, aside)
    return aside
