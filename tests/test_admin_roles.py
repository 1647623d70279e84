"""The role matrix: every admin endpoint asked by nobody, by each role's session and by each role's API key, with
the answer each must get; every act that is let through leaves exactly one audit row naming the actor and the IP,
and a refused one leaves none."""

import json

import pytest

from appliance.admin import auth
from tests.admin_site import ROLES, csrf_of, log_in, site  # noqa: F401  (site is a fixture)

# (method, path, form or None, the least role); forms are filled per call (see _form)
ENDPOINTS = [
    ("GET", "/analytics", None, "viewer"),
    ("GET", "/analytics/data", None, "viewer"),
    ("GET", "/metrics", None, "viewer"),
    ("GET", "/backends", None, "viewer"),
    ("GET", "/words", None, "operator"),
    ("POST", "/words", {"file": "0", "words": "违禁词\n另一个"}, "operator"),
    ("POST", "/words/reload", {}, "operator"),
    ("GET", "/outbox", None, "operator"),
    ("POST", "/outbox/retry", {"id": "1"}, "operator"),
    ("GET", "/answers", None, "operator"),
    ("POST", "/answers", {"question": "营业时间？{who}", "answer": "九点到五点。"}, "operator"),
    ("POST", "/answers/delete", {"id": "1"}, "operator"),
    ("GET", "/audit?operation=login", None, "operator"),
    ("GET", "/audit/export", None, "admin"),
    ("GET", "/users", None, "admin"),
    ("POST", "/users", {"name": "new-{who}", "role": "viewer", "password": "a long new password"}, "admin"),
    ("POST", "/users/delete", {"name": "new-{who}"}, "admin"),
    ("POST", "/keys", {"name": "k-{who}", "role": "viewer"}, "admin"),
    ("POST", "/keys/revoke", {"id": "1"}, "admin"),
    ("GET", "/conversations", None, "admin"),
    ("GET", "/conversations/view?account=wx1&user=u1", None, "admin"),
]
AUDITED_GETS = {"/audit/export", "/conversations/view?account=wx1&user=u1"}


def _form(form: dict, who: str, csrf: str | None) -> dict:
    filled = {k: v.replace("{who}", who) for k, v in form.items()}
    return {**filled, "csrf": csrf} if csrf else filled


def _allowed(actor_role: str | None, needed: str) -> bool:
    return actor_role is not None and ROLES.index(actor_role) >= ROLES.index(needed)


async def _walk(site, http, who: str, role: str | None, actor: str | None, csrf: str | None):
    for method, path, form, needed in ENDPOINTS:
        before = len(await site.audit_rows())
        if method == "GET":
            resp = await http.get(path, allow_redirects=False)
        else:
            resp = await http.post(path, data=_form(form, who, csrf), allow_redirects=False)
        body = await resp.text()
        new = (await site.audit_rows())[before:]
        if _allowed(role, needed):
            assert resp.status == 200, (who, method, path, resp.status, body[:300])
            if method == "POST" or path in AUDITED_GETS:
                assert len(new) == 1, (who, path, new)
                assert new[0]["user_id"] == actor and new[0]["ip_address"] == "127.0.0.1", new[0]
            else:
                assert new == [], (who, path, new)
        else:
            expected = 403 if role else (303 if method == "GET" and not who.startswith("key") else 401)
            assert resp.status == expected, (who, method, path, resp.status, body[:300])
            if expected == 303:
                assert resp.headers["Location"] == "/login"
            assert new == [], (who, path, new)


async def test_the_role_matrix_for_sessions_keys_and_nobody(site):
    anonymous = site.session()
    async with anonymous:
        await _walk(site, anonymous, "nobody", None, None, None)
    for role in ROLES:
        async with await log_in(site, role) as http:
            await _walk(site, http, role, role, role, await csrf_of(http))
    for role in ROLES:
        key = await site.store.run(auth.create_key, f"script-{role}", role, "admin")
        async with site.session({"Authorization": f"Bearer {key}"}) as http:
            await _walk(site, http, f"key-{role}", role, f"key:script-{role}", None)
    async with site.session({"Authorization": "Bearer r1a_not-a-key"}) as http:
        assert (await http.get("/analytics")).status == 401


async def test_export_is_json_lines_of_the_filtered_log(site):
    async with await log_in(site, "admin") as http:
        resp = await http.get("/audit/export?operation=login")
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/x-ndjson")
        rows = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert [r["operation"] for r in rows] == ["login"] and rows[0]["actor"] == "admin"
    assert (await site.audit_rows())[-1]["operation"] == "audit_export"


async def test_words_saved_from_the_page_reach_the_file(site):
    async with await log_in(site, "operator") as http:
        resp = await http.post("/words", data={"file": "0", "words": "甲词\r\n乙词", "csrf": await csrf_of(http)})
        assert resp.status == 200 and "Saved 2 words" in await resp.text()
    assert site.words.read_text(encoding="utf-8") == "甲词\n乙词\n"


@pytest.mark.parametrize("role", ["viewer", "operator"])
async def test_the_nav_shows_only_what_the_role_may_open(site, role):
    async with await log_in(site, role) as http:
        page = await (await http.get("/analytics")).text()
    assert ('href="/words"' in page) == (role != "viewer")
    assert 'href="/users"' not in page and 'href="/conversations"' not in page
