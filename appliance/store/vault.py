"""Encryption at rest: the keyring file, sealing with AES-256-GCM, and keyed hashes that stand in for users.

The keys live in one JSON file apart from the database (mode 0600, created with the database), never inside it: a
copied database or backup reveals nothing without that file. A sealed value is `version | key id | nonce |
ciphertext+tag`, its associated data the table, column and row it belongs to, so a value moved to another row or
column fails its check like a tampered one. New values use the newest key; older keys stay in the file so that
rows (and backups) sealed with them stay readable while `r1box keys rotate` re-seals them.

Users are named in the database by a keyed hash (HMAC-SHA256 of account and OpenID): lookups, per-user counts and
the audit log link a user's rows without naming them. That hash key is never rotated: changing it would re-key
every row and every in-flight lookup, and it decrypts nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.errors import UnreadableValue, VaultError
from appliance.store.transaction import transaction

FORMAT = "r1box-keyring-1"
VERSION = b"\x01"
HEADER = len(VERSION) + 4 + 12  # version, key id, nonce
PROBE = b"r1box key check"  # sealed per key in vault_keys, to tell a wrong key file from a tampered row
HASH_KEY_ID = 0  # the vault_keys row that checks the hash key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Keyring:
    """The keys of one key file: AES-256 keys by id (the newest seals), and the hash key."""

    def __init__(self, path: Path, keys: dict[int, bytes], hash_key: bytes):
        self.path, self.keys, self.hash_key = path, keys, hash_key

    @property
    def current(self) -> int:
        return max(self.keys)

    @classmethod
    def create(cls, path: Path) -> Keyring:
        keyring = cls(path, {1: AESGCM.generate_key(256)}, secrets.token_bytes(32))
        keyring.save()
        return keyring

    @classmethod
    def load(cls, path: Path) -> Keyring:
        try:
            mode = path.stat().st_mode
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise VaultError(f"{path}: key file not found. The database's contents are sealed with its keys: restore "
                             "it from where you keep its copy, or set [store] key_file to where it is.") from None
        except (OSError, ValueError) as e:
            raise VaultError(f"{path}: cannot read the key file ({e}); restore it from its copy.") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise VaultError(f"{path}: the key file is readable by others (mode {stat.S_IMODE(mode):o}); "
                             f"run `chmod 600 {path}` so only the service's user can read it.")
        try:
            if raw["format"] != FORMAT:
                raise ValueError(f"format {raw['format']!r}")
            keys = {int(k): base64.b64decode(v, validate=True) for k, v in raw["keys"].items()}
            hash_key = base64.b64decode(raw["hash_key"], validate=True)
            if not keys or any(len(k) != 32 for k in keys.values()) or len(hash_key) != 32:
                raise ValueError("keys must be 32 bytes")
        except (KeyError, TypeError, ValueError) as e:
            raise VaultError(f"{path}: not an r1box key file ({e}); restore it from its copy.") from None
        return cls(path, keys, hash_key)

    def save(self) -> None:
        """Write the file whole or not at all: a temporary file, fsynced, renamed over the old one."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        body = json.dumps({"format": FORMAT, "hash_key": _b64(self.hash_key),
                           "keys": {str(k): _b64(v) for k, v in sorted(self.keys.items())}}, indent=1)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def add_key(self) -> int:
        new = self.current + 1
        self.keys[new] = AESGCM.generate_key(256)
        self.save()
        return new


class Vault:
    """Seals and opens values for the store; rereads the key file when another process (a rotation) changed it."""

    def __init__(self, keyring: Keyring):
        self.keyring = keyring
        self._lock = threading.Lock()
        self._seen = self._file_stamp()

    @property
    def path(self) -> Path:
        return self.keyring.path

    @property
    def current(self) -> int:
        self._reload_if_changed()
        return self.keyring.current

    def seal(self, text: str | None, table: str, column: str, ref: str | int) -> bytes | None:
        if text is None:
            return None
        kid = self.current
        nonce = os.urandom(12)
        sealed = AESGCM(self.keyring.keys[kid]).encrypt(nonce, text.encode(), _context(table, column, ref))
        return VERSION + kid.to_bytes(4, "big") + nonce + sealed

    def unseal(self, blob: bytes | str | None, table: str, column: str, ref: str | int) -> str | None:
        """The value, or UnreadableValue naming the row: tampered, moved, or sealed with a key this file lacks."""
        if blob is None:
            return None
        where = f"{table}.{column} of row {ref}"
        if not isinstance(blob, bytes) or len(blob) < HEADER + 16 or blob[:1] != VERSION:
            raise UnreadableValue(f"{where} is not a sealed value (damaged or written outside r1box)")
        kid = int.from_bytes(blob[1:5], "big")
        key = self.key(kid, where)
        try:
            return AESGCM(key).decrypt(blob[5:HEADER], blob[HEADER:], _context(table, column, ref)).decode()
        except InvalidTag:
            raise UnreadableValue(f"{where} fails its authentication check: it was altered or moved from another "
                                  "row; the row is skipped") from None

    def key(self, kid: int, needed_by: str = "a sealed value") -> bytes:
        if kid not in self.keyring.keys:
            self._reload_if_changed()
        if kid not in self.keyring.keys:
            raise UnreadableValue(f"{needed_by} is sealed with key {kid}, which {self.path} lacks; restore the key "
                                  "file that holds it")
        return self.keyring.keys[kid]

    def user_hash(self, account: str, user: str) -> str:
        """The stand-in for a user in every table and in the audit log."""
        mac = hmac.new(self.keyring.hash_key, f"user\0{account}\0{user}".encode(), hashlib.sha256)
        return "u-" + mac.hexdigest()[:32]

    def ref(self, dedup_key: str) -> str:
        """A message's de-duplication key (it holds the sender's OpenID), as stored."""
        return "m-" + hmac.new(self.keyring.hash_key, f"dedup\0{dedup_key}".encode(), hashlib.sha256).hexdigest()

    def _file_stamp(self) -> tuple[int, int]:
        try:
            st = self.path.stat()
            return st.st_mtime_ns, st.st_ino
        except OSError:
            return 0, 0

    def _reload_if_changed(self) -> None:
        stamp = self._file_stamp()
        if stamp == self._seen:
            return
        with self._lock:
            fresh = Keyring.load(self.path)
            if fresh.hash_key != self.keyring.hash_key:
                raise VaultError(f"{self.path} was replaced by a key file with another hash key; put the original "
                                 "back")
            self.keyring, self._seen = fresh, stamp


def _context(table: str, column: str, ref: str | int) -> bytes:
    return f"r1box\0{table}.{column}\0{ref}".encode()


def open_vault(db, path: Path) -> Vault:
    """The database's vault: the key file is created with a new database, checked against an existing one.

    A database that holds sealed rows but whose key file is missing or holds other keys is refused with the file's
    name: serving it would fail on every row, and creating a new key file would orphan them for good."""
    checks = {r[0]: r[1] for r in db.execute("SELECT key_id, probe FROM vault_keys").fetchall()}
    if not path.exists() and not checks:
        keyring = Keyring.create(path)
    else:
        keyring = Keyring.load(path)
    vault = Vault(keyring)
    for kid, probe in checks.items():
        if kid == HASH_KEY_ID:
            if not hmac.compare_digest(probe, _hash_probe(keyring)):
                raise VaultError(f"{path} is not this database's key file (its hash key differs); put the right "
                                 "one in place or set [store] key_file to it.")
            continue
        try:
            vault.unseal(probe, "vault_keys", "probe", kid)
        except UnreadableValue:
            raise VaultError(f"{path} is not this database's key file (key {kid} is missing or differs); put the "
                             "right one in place or set [store] key_file to it.") from None
    record_keys(db, vault)
    return vault


def record_keys(db, vault: Vault) -> None:
    """A check value per key the file holds, so a later start can tell a wrong key file from damaged rows."""
    with transaction(db):
        db.execute("INSERT OR IGNORE INTO vault_keys (key_id, probe, created_at) VALUES (?, ?, ?)",
                   [HASH_KEY_ID, _hash_probe(vault.keyring), time.time()])
        for kid, key in vault.keyring.keys.items():
            nonce = os.urandom(12)
            probe = VERSION + kid.to_bytes(4, "big") + nonce + AESGCM(key).encrypt(
                nonce, PROBE, _context("vault_keys", "probe", kid))
            db.execute("INSERT OR IGNORE INTO vault_keys (key_id, probe, created_at) VALUES (?, ?, ?)",
                       [kid, probe, time.time()])


def _hash_probe(keyring: Keyring) -> bytes:
    return hmac.new(keyring.hash_key, PROBE, hashlib.sha256).digest()
