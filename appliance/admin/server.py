"""The admin application and its TLS 1.3 listener, started from the main app's cleanup context beside the
metrics listener and sharing its Store.

One middleware decides every request: who is asking (a session cookie or an API key), whether their role may use
the route (each handler names the least role it needs), and whether a POST carries the session's CSRF token.
Security headers go on every response, static files and errors included.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

import jinja2
from aiohttp import web

from appliance.admin import auth, tls
from appliance.admin.analytics import set_clock
from appliance.app_keys import ADMIN_PORT, CONFIG, METRICS, STORE
from appliance.config import Config
from appliance.store import audit
from appliance.store.database import Store

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
MAIN = web.AppKey("main", web.Application)  # the service's app: its WeChat dialog (word lists) and metrics
LIMITER = web.AppKey("limiter", auth.LoginLimiter)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
MAX_FORM_KB = 256

HEADERS = {
    "Strict-Transport-Security": "max-age=31536000",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def need(role: str | None):
    """The least role a handler needs (None: open, as the login page is)."""
    def mark(handler):
        handler.role = role
        return handler
    return mark


async def record(request: web.Request, operation: str, details: dict, actor: str | None = None) -> None:
    """One audit row for an act, with who did it and from where."""
    who = actor or request["actor"].name
    await request.app[STORE].run(audit.record, operation, details, who, request.remote)


def render(request: web.Request, template: str, status: int = 200, **context) -> web.Response:
    actor = request.get("actor")
    html = request.app[TEMPLATES].get_template(template).render(actor=actor, csrf=actor.csrf if actor else None,
                                                                path=request.path, **context)
    return web.Response(text=html, content_type="text/html", status=status, headers={"Cache-Control": "no-store"})


def _error_page(request: web.Request, status: int, message: str) -> web.Response:
    if request.headers.get("Authorization"):
        return web.json_response({"error": message}, status=status)
    return render(request, "error.html", status=status, status_code=status, message=message)


@web.middleware
async def guard(request: web.Request, handler):
    route = request.match_info.route
    role = getattr(route.handler, "role", None) if route.resource is not None else None
    store = request.app[STORE]
    bearer = request.headers.get("Authorization", "")
    actor = None
    if bearer.startswith("Bearer "):
        actor = await store.run(auth.key_actor, bearer.removeprefix("Bearer ").strip())
        if actor is None:
            return _error_page(request, 401, "unknown or revoked API key")
    elif token := request.cookies.get(auth.SESSION_COOKIE):
        actor = await store.run(auth.session_actor, token)
    request["actor"] = actor
    try:
        if role is not None:
            if actor is None:
                if request.method == "GET":
                    raise web.HTTPSeeOther("/login")
                return _error_page(request, 401, "your session has ended: log in again")
            if not actor.can(role):
                return _error_page(request, 403, f"this needs the {role} role; you are {actor.role}")
            if request.method == "POST" and actor.csrf is not None:
                form = await request.post()
                if not hmac.compare_digest(str(form.get("csrf", "")), actor.csrf):
                    return _error_page(request, 403, "the form's security token is stale: reload the page")
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return _error_page(request, 413, f"the form is larger than {MAX_FORM_KB} KB")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error_page(request, e.status, e.reason)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(HEADERS)


def create_admin_app(config: Config, store: Store, main: web.Application | None = None) -> web.Application:
    from appliance.admin.pages import routes
    from appliance.admin.release_pages import routes as release_routes

    app = web.Application(client_max_size=MAX_FORM_KB << 10, middlewares=[guard])
    app[CONFIG], app[STORE], app[LIMITER] = config, store, auth.LoginLimiter()
    if main is not None:
        app[MAIN] = main
    app[TEMPLATES] = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    app.add_routes(routes)
    app.add_routes(release_routes)
    app.router.add_static("/static/", HERE / "static", follow_symlinks=False)
    app.on_response_prepare.append(_security_headers)
    return app


def metrics_of(app: web.Application):
    main = app.get(MAIN)
    return main.get(METRICS) if main is not None else None


async def admin_ctx(app: web.Application):
    """The admin listener: TLS 1.3, the configured certificate or a self-signed one whose fingerprint is logged."""
    config, store = app[CONFIG], app[STORE]
    context, print_ = tls.server_context(config.admin.cert, config.admin.key, config.store.file.parent / "admin-tls")
    await store.run(set_clock, config.admin.utc_offset_hours * 3600)
    runner = web.AppRunner(create_admin_app(config, store, app), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.admin.host, config.admin.port, ssl_context=context)
    await site.start()
    app[ADMIN_PORT] = runner.addresses[0][1] if runner.addresses else config.admin.port
    log.warning("admin pages on https://%s:%d/ certificate SHA-256 fingerprint %s", config.admin.host,
                app[ADMIN_PORT], print_, extra={"tls_fingerprint": print_})
    yield
    await runner.cleanup()
