"""Who may do what in the admin pages: roles, admin users with scrypt password hashes, login sessions with a
CSRF token each, API keys for scripts, and a login rate limit.

Roles are ordered: viewer (dashboard, metrics) < operator (+ word lists, delivery queue, audit log) < admin
(+ users, keys, conversations, audit export). Session tokens and API keys are random 256-bit values stored only as
SHA-256 hashes (a fast hash is enough for values that cannot be guessed); passwords, which people choose, get
scrypt. The CSRF token is per session, not per request: SameSite=Strict already keeps other sites' requests from
carrying the cookie, and a token that rotates on every POST would break a second tab and the back button without
stopping anyone who cannot read the page. A token is bound to its session, so one from an ended session or from
someone else's is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass

ROLES = ("viewer", "operator", "admin")
SESSION_COOKIE = "r1box_session"
LOGIN_COOKIE = "r1box_login"  # the login form's CSRF token (double submit): there is no session yet
NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
MIN_PASSWORD = 10
_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}


class AuthError(ValueError):
    """A name, role or password that cannot be accepted; the message says why."""


@dataclass(frozen=True)
class Actor:
    name: str  # a user's name, or "key:<name>" for an API key
    role: str
    csrf: str | None = None  # None for API keys: no cookie, so nothing for another site to ride on

    def can(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        _, n, r, p, salt, digest = stored.split("$")
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), digest)


_DUMMY_HASH = hash_password(secrets.token_hex(8))  # unknown names cost as much as known ones


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_user(name: str, role: str, password: str | None) -> None:
    if not NAME.fullmatch(name):
        raise AuthError("a user name is 1-64 letters, digits, or . _ @ -")
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}")
    if password is not None and len(password) < MIN_PASSWORD:
        raise AuthError(f"a password has at least {MIN_PASSWORD} characters")


def add_user(db, name: str, role: str, password_hash: str) -> None:
    if db.execute("SELECT 1 FROM admin_users WHERE name = ?", [name]).fetchone():
        raise AuthError(f"user {name} exists already")
    db["admin_users"].insert({"name": name, "role": role, "password_hash": password_hash,
                              "created_at": time.time()})


def delete_user(db, name: str) -> bool:
    db.execute("DELETE FROM admin_sessions WHERE user_name = ?", [name])
    gone = db.execute("DELETE FROM admin_users WHERE name = ?", [name]).rowcount
    db.conn.commit()
    return bool(gone)


def login(db, name: str, password: str, minutes: int) -> tuple[str, Actor] | None:
    """A new session (token, actor) when the password is right; the token goes into the cookie only."""
    row = db.execute("SELECT role, password_hash FROM admin_users WHERE name = ?", [name]).fetchone()
    if not verify_password(password, row[1] if row else _DUMMY_HASH) or not row:
        return None
    token, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(32), time.time()
    db["admin_sessions"].insert({"token_hash": token_hash(token), "user_name": name, "csrf": csrf,
                                 "created_at": now, "expires_at": now + minutes * 60})
    db.execute("DELETE FROM admin_sessions WHERE expires_at < ?", [now])
    db.conn.commit()
    return token, Actor(name, row[0], csrf)


def session_actor(db, token: str) -> Actor | None:
    row = db.execute("SELECT s.user_name, u.role, s.csrf FROM admin_sessions s JOIN admin_users u "
                     "ON u.name = s.user_name WHERE s.token_hash = ? AND s.expires_at > ?",
                     [token_hash(token), time.time()]).fetchone()
    return Actor(*row) if row else None


def logout(db, token: str) -> None:
    db.execute("DELETE FROM admin_sessions WHERE token_hash = ?", [token_hash(token)])
    db.conn.commit()


def create_key(db, name: str, role: str, created_by: str) -> str:
    """A new API key, returned once; only its hash is kept."""
    check_user(name, role, None)
    key = "r1a_" + secrets.token_urlsafe(32)
    db["admin_api_keys"].insert({"name": name, "role": role, "key_hash": token_hash(key), "created_by": created_by,
                                 "created_at": time.time()})
    return key


def revoke_key(db, key_id: int) -> bool:
    revoked = db.execute("UPDATE admin_api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                         [time.time(), key_id]).rowcount
    db.conn.commit()
    return bool(revoked)


def key_actor(db, key: str) -> Actor | None:
    row = db.execute("SELECT name, role FROM admin_api_keys WHERE key_hash = ? AND revoked_at IS NULL",
                     [token_hash(key)]).fetchone()
    return Actor(f"key:{row[0]}", row[1]) if row else None


class LoginLimiter:
    """Failed logins per IP and per user name in a sliding window; past the limit, logins wait it out."""

    def __init__(self, per_name: int = 5, per_ip: int = 20, window_s: float = 900):
        self.limits, self.window_s = {"name": per_name, "ip": per_ip}, window_s
        self._failures: dict[tuple[str, str], deque[float]] = defaultdict(deque)

    def _recent(self, key: tuple[str, str]) -> deque[float]:
        times, now = self._failures[key], time.monotonic()
        while times and times[0] < now - self.window_s:
            times.popleft()
        return times

    def blocked(self, name: str, ip: str) -> bool:
        return any(len(self._recent((kind, value))) >= self.limits[kind]
                   for kind, value in (("name", name), ("ip", ip)))

    def failed(self, name: str, ip: str) -> None:
        for key in (("name", name), ("ip", ip)):
            self._recent(key).append(time.monotonic())

    def succeeded(self, name: str) -> None:
        self._failures.pop(("name", name), None)
