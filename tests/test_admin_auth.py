"""Logging in and staying safe: hashed secrets, cookie flags, CSRF tokens bound to their session (a replayed or
foreign one is refused), the login rate limit with an audit row per failure, expired and forged sessions, security
headers on every answer, and hostile input (SQL injection, path traversal, oversized forms) refused with nothing
lost."""

import re

import pytest

from appliance.admin import auth
from appliance.admin.server import HEADERS
from tests.admin_site import PASSWORD, csrf_of, log_in, site  # noqa: F401  (site is a fixture)

INJECTIONS = ["' OR '1'='1", "admin'--", "x'; DROP TABLE admin_users; --", '" OR 1=1 --', "1 UNION SELECT * FROM "
              "admin_sessions"]


async def _login_form(http) -> str:
    return re.search(r'id="login-csrf" name="csrf" value="([^"]+)"', await (await http.get("/login")).text()).group(1)


async def test_secrets_are_stored_hashed_and_cookies_are_strict(site):
    async with site.session() as http:
        token = await _login_form(http)
        resp = await http.post("/login", data={"name": "admin", "password": PASSWORD, "csrf": token},
                               allow_redirects=False)
        cookie = resp.headers.getall("Set-Cookie")
    session = next(c for c in cookie if c.startswith(auth.SESSION_COOKIE))
    for flag in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/"):
        assert flag in session
    value = session.split(";")[0].split("=", 1)[1]
    users = await site.store.run(lambda db: list(db["admin_users"].rows))
    assert all(u["password_hash"].startswith("scrypt$16384$8$1$") and PASSWORD not in u["password_hash"]
               for u in users)
    stored = await site.store.run(lambda db: [r["token_hash"] for r in db["admin_sessions"].rows])
    assert value not in stored and auth.token_hash(value) in stored
    key = await site.store.run(auth.create_key, "backup-script", "viewer", "admin")
    kept = await site.store.run(lambda db: [r["key_hash"] for r in db["admin_api_keys"].rows])
    assert kept == [auth.token_hash(key)]


async def test_csrf_is_checked_and_a_replayed_or_foreign_token_is_refused(site):
    words = site.words.read_text(encoding="utf-8")
    async with await log_in(site, "operator") as mine, await log_in(site, "admin") as other:
        token = await csrf_of(mine)
        assert (await mine.post("/words/reload", data={})).status == 403  # none
        assert (await mine.post("/words/reload", data={"csrf": "forged"})).status == 403
        assert (await mine.post("/words/reload", data={"csrf": await csrf_of(other)})).status == 403  # another's
        assert (await mine.post("/words/reload", data={"csrf": token})).status == 200
        assert (await mine.post("/logout", data={"csrf": token}, allow_redirects=False)).status == 303
        # the same token after its session ended: refused, and nothing written
        replay = await mine.post("/words", data={"file": "0", "words": "hijacked", "csrf": token},
                                 allow_redirects=False)
        assert replay.status == 401
        # a new login gets a new token; the old one is no good there either
        async with await log_in(site, "operator") as again:
            assert await csrf_of(again) != token
            assert (await again.post("/words", data={"file": "0", "words": "x", "csrf": token})).status == 403
    assert site.words.read_text(encoding="utf-8") == words
    async with site.session() as http:  # the login form has its own token
        resp = await http.post("/login", data={"name": "admin", "password": PASSWORD, "csrf": "guess"})
        assert resp.status == 403


async def test_failed_logins_are_audited_and_rate_limited_per_name_and_ip(site):
    async with site.session() as http:
        token = await _login_form(http)
        for _ in range(5):
            resp = await http.post("/login", data={"name": "admin", "password": "wrong password", "csrf": token})
            assert resp.status == 401 and "Wrong name or password" in await resp.text()
        blocked = await http.post("/login", data={"name": "admin", "password": PASSWORD, "csrf": token})
        assert blocked.status == 429
        # another name from the same address still may, until the address reaches its own limit
        assert (await http.post("/login", data={"name": "viewer", "password": PASSWORD, "csrf": token},
                                allow_redirects=False)).status == 303
        token = await _login_form(http)  # a successful login used up the form's token
        for i in range(15):
            await http.post("/login", data={"name": f"guess{i}", "password": "x", "csrf": token})
        resp = await http.post("/login", data={"name": "operator", "password": PASSWORD, "csrf": token})
        assert resp.status == 429
    rows = await site.audit_rows()
    failures = [r for r in rows if r["operation"] == "login_failed"]
    assert len(failures) == 5 + 1 + 15 + 1 and all(r["ip_address"] == "127.0.0.1" for r in failures)
    assert [r["user_id"] for r in failures[:6]] == ["admin"] * 6
    assert '"rate_limited"' in failures[5]["details"] and '"bad_credentials"' in failures[0]["details"]
    assert [r["user_id"] for r in rows if r["operation"] == "login"] == ["viewer"]


async def test_expired_and_forged_sessions_are_sent_to_login(site):
    async with await log_in(site, "admin") as http:
        assert (await http.get("/users")).status == 200
        await site.store.run(lambda db: (db.execute("UPDATE admin_sessions SET expires_at = 0"), db.conn.commit()))
        resp = await http.get("/users", allow_redirects=False)
        assert resp.status == 303 and resp.headers["Location"] == "/login"
    async with site.session() as http:
        http.cookie_jar.update_cookies({auth.SESSION_COOKIE: "forged-token"})
        assert (await http.get("/users", allow_redirects=False)).status == 303


@pytest.mark.parametrize("path", ["/login", "/static/admin.css", "/no-such-page", "/users"])
async def test_security_headers_on_every_answer(site, path):
    async with site.session() as http:
        resp = await http.get(path, allow_redirects=False)
    for name, value in HEADERS.items():
        assert resp.headers.get(name) == value, (path, name)
    assert "default-src 'self'" in resp.headers["Content-Security-Policy"]


@pytest.mark.parametrize("path", ["/static/../auth.py", "/static/%2e%2e/auth.py", "/static/..%2fauth.py",
                                  "/static/%2e%2e%2f%2e%2e%2fconfig.py", "/static//etc/passwd",
                                  "/static/templates/../../server.py"])
async def test_static_files_do_not_leave_their_folder(site, path):
    async with site.session() as http:
        resp = await http.get(path, allow_redirects=False)
        body = await resp.text()
    assert resp.status in (403, 404) and "import" not in body and "root:" not in body


async def test_sql_injection_in_every_field_changes_nothing(site):
    before = await site.store.run(lambda db: (db["admin_users"].count, db["admin_api_keys"].count))
    async with site.session() as http:
        token = await _login_form(http)
        for text in INJECTIONS:
            resp = await http.post("/login", data={"name": text, "password": text, "csrf": token})
            assert resp.status in (401, 429)
    async with await log_in(site, "admin") as http:
        csrf = await csrf_of(http)
        for text in INJECTIONS:
            for path, form in (("/users", {"name": text, "role": "admin", "password": text * 3}),
                               ("/users", {"name": "ok-name", "role": text, "password": "long enough pw"}),
                               ("/users/delete", {"name": text}), ("/keys", {"name": text, "role": "viewer"}),
                               ("/keys/revoke", {"id": text}), ("/outbox/retry", {"id": text})):
                resp = await http.post(path, data={**form, "csrf": csrf})
                assert resp.status in (200, 400), (path, text, resp.status)
            for path, params in (("/audit", {"operation": text, "actor": text, "ip": text}),
                                 ("/conversations/view", {"account": text, "user": text}),
                                 ("/audit", {"from": text}), ("/analytics", {"from": text})):
                resp = await http.get(path, params=params)
                assert resp.status in (200, 400), (path, text, resp.status)
                assert "Traceback" not in await resp.text()
            audit = await (await http.get("/audit", params={"operation": text})).text()
            assert "No entries." in audit
    after = await site.store.run(lambda db: (db["admin_users"].count, db["admin_api_keys"].count))
    assert after == before


async def test_an_oversized_form_is_refused_and_the_list_kept(site):
    words = site.words.read_text(encoding="utf-8")
    async with await log_in(site, "operator") as http:
        resp = await http.post("/words", data={"file": "0", "words": "词" * 200_000, "csrf": await csrf_of(http)})
        assert resp.status == 413 and "larger than" in await resp.text()
    assert site.words.read_text(encoding="utf-8") == words


async def test_bad_user_input_gets_a_clear_message(site):
    async with await log_in(site, "admin") as http:
        csrf = await csrf_of(http)
        short = await http.post("/users", data={"name": "carol", "role": "viewer", "password": "short", "csrf": csrf})
        assert "at least 10 characters" in await short.text()
        twice = await http.post("/users", data={"name": "viewer", "role": "viewer", "password": "long enough pw",
                                                "csrf": csrf})
        assert "exists already" in await twice.text()
        me = await http.post("/users/delete", data={"name": "admin", "csrf": csrf})
        assert "cannot delete yourself" in await me.text()
