"""`r1box serve`, as an aiohttp application factory: the business side of the box. WeChat and WeCom callbacks,
the dialog, the store, the outbox, the admin pages and the metrics live here; the models are backends reached over
HTTP (appliance/backends/), the box's own `r1box model` (appliance/model/server.py) first among them, so a model
that crashes or is killed takes none of this down. Resources open and close in cleanup contexts; blocking work
runs off the event loop."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from aiohttp import web

from appliance.admin.server import admin_ctx
from appliance.app_keys import (BACKENDS, CONFIG, CONFIG_FILE, LISTENER, METRICS, METRICS_PORT, RELEASE, STARTED,
                                STORE, WECHAT)
from appliance.backends.pool import Backends
from appliance.config import Config
from appliance.dialog.engine import Dialog
from appliance.dialog.filter import WordFilter
from appliance.ha.node import litestream_socket, read_role
from appliance.ha.replication import ReplicaBarrier
from appliance.ops.logs import request_id_middleware
from appliance.ops.metrics import BackendCollector, HaCollector, Metrics, WeChatCollector
from appliance.ops.systemd import systemd_ctx
from appliance.release.manager import ReleaseManager
from appliance.store.database import Store
from appliance.store.retention import run_forever as run_retention
from appliance.wechat.callback import Callbacks
from appliance.wechat.client import Credentials, TokenManager, WeChatClient
from appliance.wechat.envelope import Account
from appliance.wechat.outbox import Outbox
from appliance.wechat.service import WeChatService

log = logging.getLogger(__name__)


async def _store_ctx(app: web.Application):
    config = app[CONFIG]
    store = Store(config.store.file, config.store.keys)
    await asyncio.get_running_loop().run_in_executor(None, store.open)
    app[STORE] = store
    if config.ha.enabled:  # one box of a pair: acknowledgements wait for the peer's copy
        store.replica = ReplicaBarrier(litestream_socket(config), store.path, config.ha.sync_timeout_s)
        await store.replica.start()
        app[METRICS].watch(HaCollector(lambda: read_role(config), store.replica))
    retention = asyncio.create_task(run_retention(store, config.store.conversation_days, config.store.audit_days,
                                                  config.store.retention_interval_h))
    yield
    retention.cancel()
    await asyncio.gather(retention, return_exceptions=True)
    if store.replica:
        await store.replica.close()
    await asyncio.get_running_loop().run_in_executor(None, store.close)


async def _backends_ctx(app: web.Application):
    """The model backends, probed in the background from the start."""
    session = aiohttp.ClientSession()
    backends = Backends(app[CONFIG].backends, session, app[METRICS])
    app[BACKENDS] = backends
    app[METRICS].watch(BackendCollector(backends))
    await backends.probe_all()  # /healthz says "ok" only once a backend has answered
    backends.start()
    log.info("model backends: %s", ", ".join(f"{b.label} ({b.url})" for b in app[CONFIG].backends))
    yield
    await backends.stop()
    await session.close()


async def healthz(request: web.Request) -> web.Response:
    """ok: a backend can answer; degraded: none can now, and questions are recorded and wait for one."""
    backends = request.app[BACKENDS]
    wechat = request.app.get(WECHAT)
    return web.json_response({
        "status": "ok" if backends.any_up else "degraded",
        "backends": backends.states(),
        "waiting_for_backend": wechat.dialog.waiting if wechat else 0,
        "uptime_s": round(time.time() - request.app[STARTED], 1),
    })


def wechat_accounts(config: Config) -> dict[str, Account]:
    """The configured callback endpoints, by path."""
    accounts = {}
    if config.wechat.app_id:
        w = config.wechat
        accounts[w.path] = Account("mp", w.app_id, w.token, w.encoding_aes_key, w.previous_encoding_aes_key,
                                   mode=w.mode, replay_window_s=w.replay_window_s)
    if config.wecom.corp_id:
        w = config.wecom
        accounts[w.path] = Account("wecom", w.corp_id, w.token, w.encoding_aes_key, w.previous_encoding_aes_key,
                                   w.agent_id, "safe", w.replay_window_s)
    return accounts


def push_credentials(config: Config) -> dict[str, tuple[Credentials, str]]:
    """Accounts that push late answers, with their API base URL."""
    out = {}
    if config.wechat.app_id and config.wechat.delivery == "push":
        out[config.wechat.app_id] = (Credentials("mp", config.wechat.app_id, config.wechat.app_secret,
                                                 config.wechat.stable_token), config.wechat.api_base_url)
    if config.wecom.corp_id and config.wecom.corp_secret:
        out[config.wecom.corp_id] = (Credentials("wecom", config.wecom.corp_id, config.wecom.corp_secret,
                                                 agent_id=config.wecom.agent_id), config.wecom.api_base_url)
    return out


def _wechat_ctx(callbacks: Callbacks):
    async def ctx(app: web.Application):
        config, store = app[CONFIG], app[STORE]
        dialog = Dialog(app[BACKENDS], store, config.dialog, WordFilter.from_files(list(config.dialog.word_lists)),
                        {config.wechat.app_id: config.wechat.system_prompt,
                         config.wecom.corp_id: config.wecom.system_prompt})
        pushing = push_credentials(config)
        outbox, session = None, None
        if pushing:
            session = aiohttp.ClientSession()
            tokens = {app_id: TokenManager(WeChatClient(session, base), creds, store)
                      for app_id, (creds, base) in pushing.items()}
            outbox = Outbox(store, tokens, {app_id: creds for app_id, (creds, _) in pushing.items()})
            outbox.start()
        release_session = aiohttp.ClientSession()
        dialog.release = app[RELEASE] = ReleaseManager(store, app[BACKENDS], config.release, release_session,
                                                       app[METRICS], dialog.filter.hits, app[CONFIG_FILE] or None)
        await dialog.release.start()
        service = WeChatService(store, dialog, config.wechat.deadline_s, outbox, frozenset(pushing))
        callbacks.service = app[WECHAT] = service
        app[METRICS].watch(WeChatCollector(service, dialog))
        recovered = await service.recover()
        if recovered:
            log.info("answering %d messages received before the last stop", recovered)
        yield
        await dialog.release.stop()
        await release_session.close()
        if outbox:
            await outbox.stop()
            await session.close()
    return ctx


async def _metrics_ctx(app: web.Application):
    """/metrics on its own listener, so the office network can reach the callbacks without reaching the metrics."""
    metrics, config = app[METRICS], app[CONFIG].metrics

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), content_type="text/plain", charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    listener = web.Application()
    listener.router.add_get("/metrics", serve)
    runner = web.AppRunner(listener, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    app[METRICS_PORT] = runner.addresses[0][1] if runner.addresses else config.port
    log.info("metrics on http://%s:%d/metrics", config.host, app[METRICS_PORT])
    yield
    await runner.cleanup()


def create_app(config: Config, config_file: str | None = None) -> web.Application:
    """`config_file`: the TOML file the configuration came from, handed to processes serve starts (a release's
    candidate model)."""
    app = web.Application(client_max_size=config.server.max_body_kb << 10, middlewares=[request_id_middleware])
    app[CONFIG], app[LISTENER], app[STARTED] = config, config.server, time.time()
    app[CONFIG_FILE] = str(config_file or "")
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(systemd_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_backends_ctx)
    app.router.add_get("/healthz", healthz)
    accounts = wechat_accounts(config)
    if accounts:
        callbacks = Callbacks(None, accounts)
        callbacks.add_routes(app)
        app.cleanup_ctx.append(_wechat_ctx(callbacks))
    app.cleanup_ctx.append(_metrics_ctx)
    app.cleanup_ctx.append(admin_ctx)
    return app
