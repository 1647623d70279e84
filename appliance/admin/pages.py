"""The admin pages, server-rendered: login, analytics, word lists, delivery queue, audit log, users and keys,
conversations. Each handler names the least role it needs; each act writes one audit row."""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import json
import os
import secrets
import time
from pathlib import Path

from aiohttp import web

from appliance.admin import analytics, auth
from appliance.admin.server import LIMITER, MAIN, metrics_of, need, record, render
from appliance.app_keys import BACKENDS, CONFIG, STORE, WECHAT
from appliance.dialog import answer_cache
from appliance.ha.node import read_role
from appliance.store.conversations import messages, users

routes = web.RouteTableDef()
COOKIE = {"secure": True, "httponly": True, "samesite": "Strict", "path": "/"}
AUDIT_PAGE = 500


def _form_text(form, key: str, limit: int = 200) -> str:
    value = form.get(key, "")
    if not isinstance(value, str) or len(value) > limit:
        raise web.HTTPBadRequest(reason=f"{key}: text of at most {limit} characters")
    return value.strip()


@routes.get("/login")
@need(None)
async def login_page(request: web.Request) -> web.Response:
    token = secrets.token_urlsafe(24)
    response = render(request, "login.html", login_csrf=token)
    response.set_cookie(auth.LOGIN_COOKIE, token, **COOKIE)
    return response


@routes.post("/login")
@need(None)
async def login(request: web.Request) -> web.Response:
    form = await request.post()
    name, password = _form_text(form, "name", 64), form.get("password", "")
    if not isinstance(password, str) or len(password) > 1024:
        raise web.HTTPBadRequest(reason="password: at most 1024 characters")
    expected = request.cookies.get(auth.LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(str(form.get("csrf", "")), expected):
        return render(request, "login.html", status=403, error="The login form expired: try again.",
                      login_csrf=None)
    limiter, ip = request.app[LIMITER], request.remote or "-"
    if limiter.blocked(name, ip):
        await record(request, "login_failed", {"reason": "rate_limited"}, actor=name)
        return render(request, "login.html", status=429, error="Too many failed logins: wait 15 minutes.",
                      login_csrf=None)
    minutes = request.app[CONFIG].admin.session_minutes
    session = await request.app[STORE].run(auth.login, name, password, minutes)
    if session is None:
        limiter.failed(name, ip)
        await record(request, "login_failed", {"reason": "bad_credentials"}, actor=name)
        return render(request, "login.html", status=401, error="Wrong name or password.", login_csrf=None)
    token, actor = session
    limiter.succeeded(name)
    await record(request, "login", {"role": actor.role}, actor=name)
    response = web.HTTPSeeOther("/analytics")
    response.set_cookie(auth.SESSION_COOKIE, token, max_age=minutes * 60, **COOKIE)
    response.del_cookie(auth.LOGIN_COOKIE, path="/")
    raise response


@routes.post("/logout")
@need("viewer")
async def logout(request: web.Request) -> web.Response:
    await request.app[STORE].run(auth.logout, request.cookies.get(auth.SESSION_COOKIE, ""))
    await record(request, "logout", {})
    response = web.HTTPSeeOther("/login")
    response.del_cookie(auth.SESSION_COOKIE, path="/")
    raise response


@routes.get("/")
@need("viewer")
async def home(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/analytics")


def _range(request: web.Request) -> analytics.Range:
    offset = request.app[CONFIG].admin.utc_offset_hours * 3600
    today = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=offset)).date()
    try:
        return analytics.Range.parse(request.query.get("from"), request.query.get("to"), offset, today)
    except ValueError as e:
        raise web.HTTPBadRequest(reason=f"date range: {e} (days as YYYY-MM-DD)") from None


@routes.get("/analytics")
@need("viewer")
async def analytics_page(request: web.Request) -> web.Response:
    r = _range(request)
    labels = r.labels()
    return render(request, "analytics.html", first=labels[0], last=labels[-1])


@routes.get("/analytics/data")
@need("viewer")
async def analytics_data(request: web.Request) -> web.Response:
    data = await request.app[STORE].run(analytics.dashboard, _range(request))
    return web.json_response(data, headers={"Cache-Control": "no-store"})


@routes.get("/metrics")
@need("viewer")
async def metrics(request: web.Request) -> web.Response:
    source = metrics_of(request.app)
    if source is None:
        raise web.HTTPNotFound(reason="no metrics in this process")
    return web.Response(body=source.exposition(), content_type="text/plain", charset="utf-8")


@routes.get("/backends")
@need("viewer")
async def backends_page(request: web.Request) -> web.Response:
    main = request.app.get(MAIN)
    backends = main.get(BACKENDS) if main is not None else None
    wechat = main.get(WECHAT) if main is not None else None
    states = [{**s, "last_error_when": _when(s["last_error_at"])} for s in (backends.states() if backends else [])]
    return render(request, "backends.html", backends=states, waiting=wechat.dialog.waiting if wechat else 0,
                  pair=_pair(request.app[CONFIG]))


def _pair(config) -> dict | None:
    """This box of a hot-standby pair, as its node last wrote itself (appliance/ha/node.py)."""
    if not config.ha.enabled:
        return None
    role = read_role(config)
    last = role.get("last_takeover") or {}
    replicated = role.get("replicated_at")
    return {**role, "peer": config.ha.peer, "virtual_address": config.ha.virtual_address,
            "since_when": _when(role.get("since")), "last_takeover_when": _when(last.get("at")),
            "last_takeover": last, "lag_s": round(time.time() - replicated, 1) if replicated else None}


def _word_files(request: web.Request) -> list[Path]:
    return [Path(p) for p in request.app[CONFIG].dialog.word_lists]


@routes.get("/words")
@need("operator")
async def words_page(request: web.Request, notice: str = "") -> web.Response:
    files = [{"index": i, "path": str(p), "text": p.read_text(encoding="utf-8") if p.exists() else ""}
             for i, p in enumerate(_word_files(request))]
    return render(request, "words.html", files=files, notice=notice)


@routes.post("/words")
@need("operator")
async def words_save(request: web.Request) -> web.Response:
    form = await request.post()
    files = _word_files(request)
    index = _form_text(form, "file", 4)
    if not index.isdigit() or int(index) >= len(files):
        raise web.HTTPBadRequest(reason="no such word list")
    text = _form_text(form, "words", (256 << 10) - 4096).replace("\r\n", "\n")
    path = files[int(index)]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)  # the filter never reads a half-written list
    count = sum(1 for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    await record(request, "words_saved", {"file": str(path), "words": count})
    return await words_page(request, f"Saved {count} words to {path.name}; the filter picks them up at once.")


@routes.post("/words/reload")
@need("operator")
async def words_reload(request: web.Request) -> web.Response:
    main = request.app.get(MAIN)
    service = main.get(WECHAT) if main is not None else None
    changed = service.dialog.filter.reload_if_changed() if service else False
    await record(request, "words_reloaded", {"changed": changed})
    return await words_page(request, "Reloaded the word lists." if changed else "The word lists were current.")


@routes.get("/outbox")
@need("operator")
async def outbox_page(request: web.Request, notice: str = "") -> web.Response:
    rows = await request.app[STORE].run(_outbox_rows)
    return render(request, "outbox.html", rows=rows, notice=notice)


def _outbox_rows(db) -> list[dict]:
    rows = db.execute("SELECT id, account, user, status, attempts, last_error, created_at, next_attempt_at "
                      "FROM outbox WHERE status != 'sent' ORDER BY id DESC LIMIT 200").fetchall()
    return [{"id": i, "account": a, "user": u, "status": s, "attempts": n, "last_error": e,
             "created": _when(c), "next": _when(t)} for i, a, u, s, n, e, c, t in rows]


@routes.post("/outbox/retry")
@need("operator")
async def outbox_retry(request: web.Request) -> web.Response:
    item = await _posted_id(request)
    done = await request.app[STORE].run(_retry_now, item)
    await record(request, "outbox_retry", {"id": item, "due": done})
    return await outbox_page(request, f"Message {item} is due now: the outbox sends it within 30 s." if done
                             else f"Message {item} is not pending.")


@routes.get("/answers")
@need("operator")
async def answers_page(request: web.Request, **context) -> web.Response:
    rows = await request.app[STORE].run(answer_cache.entries)
    for row in rows:
        row["updated"] = _when(row["updated_at"])
    return render(request, "answers.html", rows=rows, **context)


@routes.post("/answers")
@need("operator")
async def answer_add(request: web.Request) -> web.Response:
    form = await request.post()
    account = _form_text(form, "account", 64)
    question, answer = _form_text(form, "question", 500), _form_text(form, "answer", 2000)
    if not question or not answer:
        return await answers_page(request, error="A question and its approved answer are both needed.")
    entry = await request.app[STORE].run(answer_cache.add, account, question, answer, request["actor"].name)
    await record(request, "answer_cache_added", {"id": entry, "account": account, "question": question})
    return await answers_page(request, notice=f"Added entry {entry}.")


@routes.post("/answers/delete")
@need("operator")
async def answer_delete(request: web.Request) -> web.Response:
    entry = await _posted_id(request)
    gone = await request.app[STORE].run(answer_cache.remove, entry)
    await record(request, "answer_cache_deleted", {"id": entry, "existed": gone})
    return await answers_page(request, notice=f"Deleted entry {entry}." if gone else f"No entry {entry}.")


async def _posted_id(request: web.Request) -> int:
    item = _form_text(await request.post(), "id", 20)
    if not item.isdigit():
        raise web.HTTPBadRequest(reason="id: a number")
    return int(item)


def _retry_now(db, item: int) -> bool:
    n = db.execute("UPDATE outbox SET next_attempt_at = ? WHERE id = ? AND status = 'pending'",
                   [time.time(), item]).rowcount
    db.conn.commit()
    return bool(n)


def _when(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def _audit_filters(request: web.Request) -> tuple[str, list]:
    q, where, args = request.query, [], []
    for key, column in (("operation", "operation"), ("actor", "user_id"), ("ip", "ip_address")):
        if value := q.get(key, "").strip()[:200]:
            where.append(f"{column} = ?")
            args.append(value)
    for key, op, extra in (("from", ">=", 0), ("to", "<", 86400)):
        if value := q.get(key, "").strip():
            try:
                args.append(dt.datetime.fromisoformat(value).timestamp() + extra)
            except ValueError:
                raise web.HTTPBadRequest(reason=f"{key}: a day as YYYY-MM-DD") from None
            where.append(f"timestamp {op} ?")
    return (" WHERE " + " AND ".join(where)) if where else "", args


def _audit_rows(db, where: str, args: list, limit: int | None) -> list[dict]:
    sql = f"SELECT id, timestamp, user_id, ip_address, operation, details FROM audit_log{where} ORDER BY id DESC"
    rows = db.execute(sql + (" LIMIT ?" if limit else ""), args + ([limit] if limit else [])).fetchall()
    return [{"id": i, "timestamp": t, "when": _when(t), "actor": u, "ip": ip, "operation": op, "details": d}
            for i, t, u, ip, op, d in rows]


@routes.get("/audit")
@need("operator")
async def audit_page(request: web.Request) -> web.Response:
    where, args = _audit_filters(request)
    rows = await request.app[STORE].run(_audit_rows, where, args, AUDIT_PAGE)
    return render(request, "audit.html", rows=rows, query=request.query, query_string=request.query_string,
                  limit=AUDIT_PAGE, export=request["actor"].can("admin"))


@routes.get("/audit/export")
@need("admin")
async def audit_export(request: web.Request) -> web.StreamResponse:
    where, args = _audit_filters(request)
    rows = await request.app[STORE].run(_audit_rows, where, args, None)
    await record(request, "audit_export", {"rows": len(rows), "filters": dict(request.query)})
    body = "".join(json.dumps({k: v for k, v in r.items() if k != "when"}, ensure_ascii=False) + "\n" for r in rows)
    return web.Response(text=body, content_type="application/x-ndjson", headers={
        "Content-Disposition": f'attachment; filename="r1box-audit-{dt.date.today()}.jsonl"'})


@routes.get("/users")
@need("admin")
async def users_page(request: web.Request, **context) -> web.Response:
    users, keys = await request.app[STORE].run(_people)
    return render(request, "users.html", users=users, keys=keys, roles=auth.ROLES, **context)


def _people(db) -> tuple[list, list]:
    users = [{"name": n, "role": r, "created": _when(c)}
             for n, r, c in db.execute("SELECT name, role, created_at FROM admin_users ORDER BY name")]
    keys = [{"id": i, "name": n, "role": r, "by": b, "created": _when(c), "revoked": _when(v)}
            for i, n, r, b, c, v in db.execute("SELECT id, name, role, created_by, created_at, revoked_at "
                                               "FROM admin_api_keys ORDER BY id")]
    return users, keys


@routes.post("/users")
@need("admin")
async def user_add(request: web.Request) -> web.Response:
    form = await request.post()
    name, role, password = _form_text(form, "name", 64), _form_text(form, "role", 16), form.get("password", "")
    try:
        auth.check_user(name, role, password if isinstance(password, str) else "")
        hashed = await asyncio.get_running_loop().run_in_executor(None, auth.hash_password, password)
        await request.app[STORE].run(auth.add_user, name, role, hashed)
    except auth.AuthError as e:
        return await users_page(request, error=str(e))
    await record(request, "user_added", {"name": name, "role": role})
    return await users_page(request, notice=f"Added {name} ({role}).")


@routes.post("/users/delete")
@need("admin")
async def user_delete(request: web.Request) -> web.Response:
    name = _form_text(await request.post(), "name", 64)
    if name == request["actor"].name:
        return await users_page(request, error="You cannot delete yourself.")
    gone = await request.app[STORE].run(auth.delete_user, name)
    await record(request, "user_deleted", {"name": name, "existed": gone})
    return await users_page(request, notice=f"Deleted {name}." if gone else f"No user {name}.")


@routes.post("/keys")
@need("admin")
async def key_add(request: web.Request) -> web.Response:
    form = await request.post()
    name, role = _form_text(form, "name", 64), _form_text(form, "role", 16)
    try:
        key = await request.app[STORE].run(auth.create_key, name, role, request["actor"].name)
    except auth.AuthError as e:
        return await users_page(request, error=str(e))
    await record(request, "key_created", {"name": name, "role": role})
    return await users_page(request, new_key=key, notice=f"Key {name} ({role}) created: copy it now, it is not "
                            "shown again.")


@routes.post("/keys/revoke")
@need("admin")
async def key_revoke(request: web.Request) -> web.Response:
    item = await _posted_id(request)
    done = await request.app[STORE].run(auth.revoke_key, item)
    await record(request, "key_revoked", {"id": item, "revoked": done})
    return await users_page(request, notice=f"Key {item} revoked." if done else f"Key {item} was not active.")


@routes.get("/conversations")
@need("admin")
async def conversations_page(request: web.Request) -> web.Response:
    people = await request.app[STORE].run(users, None, 200)
    for u in people:
        u["last"] = _when(u["last_at"])
    return render(request, "conversations.html", users=people)


@routes.get("/conversations/view")
@need("admin")
async def conversation_page(request: web.Request) -> web.Response:
    """A user's messages, opened: users are named by their keyed hash, so the page never shows an OpenID."""
    account, user = request.query.get("account", "")[:200], request.query.get("user", "")[:200]
    store = request.app[STORE]
    turns = [m for m in await store.run(messages, store.vault, account, user) if not m["kind"].startswith("event")]
    for t in turns:
        t["when"] = _when(t["received_at"])
    await record(request, "conversation_viewed", {"account": account, "user": user, "messages": len(turns)})
    return render(request, "conversation.html", account=account, who=user, turns=turns)
