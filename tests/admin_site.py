"""The admin site for tests: the real admin app on a real TLS 1.3 listener over a real SQLite store, users of each
role, and an HTTPS client that keeps cookies and reads each page's CSRF token."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from appliance.admin import auth, tls
from appliance.admin.server import create_admin_app
from appliance.app_keys import METRICS
from appliance.config import load_config
from appliance.metrics import Metrics
from appliance.store import Store

PASSWORD = "correct horse battery"
ROLES = auth.ROLES


@dataclass
class Site:
    url: str
    store: Store
    cert: Path
    words: Path
    db_path: Path

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
                           '[admin]\nutc_offset_hours = 0\n')
    config = load_config(config_path)
    store = Store(config.store.file)
    store.open()
    await store.run(add_users)
    context, _ = tls.server_context("", "", tmp_path / "tls")
    main = web.Application()
    main[METRICS] = Metrics()
    server = await aiohttp_server(create_admin_app(config, store, main), ssl=context)
    yield Site(f"https://127.0.0.1:{server.port}", store, tmp_path / "tls" / "cert.pem", words, config.store.file)
    await server.close()
    store.close()
