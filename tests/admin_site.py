"""The admin site for tests: the real admin app on a real TLS 1.3 listener over a real SQLite store, users of each
role, and an HTTPS client that keeps cookies and reads each page's CSRF token."""

from __future__ import annotations

import json
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from appliance.admin import auth, tls
from appliance.admin.server import create_admin_app
from appliance.app_keys import BACKENDS, METRICS
from appliance.backends.pool import Backends
from appliance.config import BackendConfig, load_config
from appliance.ops.metrics import Metrics
from appliance.store.database import Store

PASSWORD = "correct horse battery"
ROLES = auth.ROLES


@dataclass
class Site:
    url: str
    store: Store
    cert: Path
    words: Path
    db_path: Path
    backends: Backends  # the main app's, never probed: states as a test sets them

    def client_context(self, **versions) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.cert))
        for key, value in versions.items():
            setattr(context, key, value)
        return context

    def session(self, headers: dict | None = None) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=self.client_context())
        return aiohttp.ClientSession(self.url, connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     headers=headers)

    async def audit_rows(self) -> list[dict]:
        return await self.store.run(lambda db: list(db["audit_log"].rows_where(order_by="id")))


async def csrf_of(http: aiohttp.ClientSession, path: str = "/analytics") -> str:
    page = await (await http.get(path)).text()
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


async def log_in(site: Site, name: str, password: str = PASSWORD) -> aiohttp.ClientSession:
    http = site.session()
    form = await (await http.get("/login")).text()
    token = re.search(r'id="login-csrf" name="csrf" value="([^"]+)"', form).group(1)
    resp = await http.post("/login", data={"name": name, "password": password, "csrf": token},
                           allow_redirects=False)
    assert resp.status == 303, await resp.text()
    return http


def add_users(db) -> None:
    hashed = auth.hash_password(PASSWORD)
    for role in ROLES:
        auth.add_user(db, role, role, hashed)


@pytest.fixture
async def site(tmp_path, aiohttp_server) -> Site:
    words = tmp_path / "words.txt"
    words.write_text("违禁词\n", encoding="utf-8")
    config_path = tmp_path / "r1box.toml"
    config_path.write_text(f'[dialog]\nword_lists = ["{words}"]\n[store]\npath = "{tmp_path / "r1box.db"}"\n'
                           '[admin]\nutc_offset_hours = 0\n'
                           # one box of a pair: the backends page shows the pair as its node wrote it
                           '[ha]\nenabled = true\naddress = "10.0.0.1"\npeer = "10.0.0.2"\n'
                           'virtual_address = "10.0.0.50/24"\n')
    config = load_config(config_path)
    store = Store(config.store.file)
    store.open()
    await store.run(add_users)
    context, _ = tls.server_context("", "", tmp_path / "tls")
    main = web.Application()
    main[METRICS] = Metrics()
    main[BACKENDS] = Backends((BackendConfig(url="http://127.0.0.1:9", name="local"),
                               BackendConfig(url="https://hq.example:8000", name="hq", priority=1)), session=None)
    server = await aiohttp_server(create_admin_app(config, store, main), ssl=context)
    yield Site(f"https://127.0.0.1:{server.port}", store, tmp_path / "tls" / "cert.pem", words, config.store.file,
               main[BACKENDS])
    await server.close()
    store.close()


def _at(day: int, hour: int, minute: int = 0) -> float:
    """A time on 2025-03-0<day> in UTC (the test site's offset is 0)."""
    return 1740787200 + (day - 1) * 86400 + hour * 3600 + minute * 60


# (day, hour, user, latency or None, delivery): written as the WeChat service writes them
SEEDED = [(1, 9, "a", 0.4, "passive"), (1, 9, "b", 2.5, "passive"), (1, 14, "a", 0.8, "push"),
          (2, 10, "c", 6.0, "pull"), (2, 10, "c", 0.3, "passive"), (3, 23, "a", None, None)]
SEEDED_RANGE = {"from": "2025-03-01", "to": "2025-03-03"}
EXPECTED = {
    "days": ["2025-03-01", "2025-03-02", "2025-03-03"],
    "messages": {"per_day": [3, 2, 1], "per_hour": [2 if h in (9, 10) else 1 if h in (14, 23) else 0
                                                    for h in range(24)],
                 "delivery": {"passive": 3, "push": 1, "pull": 1}},
    "active_users": {"per_day": [2, 1, 1], "total": 3},
    "latency": {"p50": [1.0, 0.5, None], "p99": [3.0, 7.5, None]},
    "filter_hits": [0, 2, 0],
    "top_commands": [["help", 3], ["reset", 1]],
    "errors": [1, 0, 0],
}


def seed_messages(db) -> None:
    """Messages received, answered and delivered in separate steps as the service does them, an event and the
    stored rest of a long answer (neither counted)."""
    for i, (day, hour, user, latency, delivery) in enumerate(SEEDED):
        at = _at(day, hour, i)
        db.execute("INSERT INTO inbound (account, dedup_key, user, kind, content, created_at, received_at, status) "
                   "VALUES ('wx1', ?, ?, 'text', ?, ?, ?, 'received')", [f"k{i}", user, f"问题{i}", int(at), at])
        if latency is not None:
            db.execute("UPDATE inbound SET answer = ?, answered_at = ?, status = 'answered' WHERE dedup_key = ?",
                       [f"回答{i}", at + latency, f"k{i}"])
            db.execute("UPDATE inbound SET status = 'delivered', delivery = ?, delivered_at = ? WHERE dedup_key = ?",
                       [delivery, at + latency, f"k{i}"])
    db.execute("INSERT INTO inbound (account, dedup_key, user, kind, content, created_at, received_at, status) "
               "VALUES ('wx1', 'ev', 'd', 'event:subscribe', '', 0, ?, 'delivered')", [_at(1, 8)])
    db.execute("INSERT INTO inbound (account, dedup_key, user, kind, content, created_at, received_at, status, "
               "answer, answered_at) VALUES ('wx1', 'k0:rest', 'a', 'text', '', 0, ?, 'answered', '后续', ?)",
               [_at(1, 9, 1), _at(1, 9, 1)])
    db.conn.commit()


def seed(db, vault=None) -> None:
    """A small known history: the messages, commands, filter hits and a failed push. With the store's vault, the
    messages are then sealed and their users hashed, as the store does with rows from before encryption."""
    from appliance.dialog.engine import _count_command
    from appliance.store.rotation import seal_plaintext_rows

    seed_messages(db)
    if vault is not None:
        seal_plaintext_rows(db, vault)
    for command in ("help", "help", "reset", "help"):
        _count_command(db, "wx1", command)
        db.execute("UPDATE command_uses SET at = ? WHERE id = last_insert_rowid()", [_at(1, 12)])
    for minute in (1, 2):  # as audit.record writes them, at a time in the seeded range (the log is append-only)
        db["audit_log"].insert({"user_id": "u-c", "operation": "filter_hit", "timestamp": _at(2, 11, minute),
                                "details": json.dumps({"direction": "in", "words": ["违禁词"]})})
    db["outbox"].insert_all([
        {"account": "wx1", "user": "a", "content": "回答2", "created_at": _at(1, 14), "status": "sent",
         "attempts": 2, "last_error": "45047 out of response count limit"},
        {"account": "wx1", "user": "a", "content": "x", "created_at": _at(1, 15), "status": "pending",
         "attempts": 0, "next_attempt_at": _at(1, 15)}])
    db.conn.commit()
