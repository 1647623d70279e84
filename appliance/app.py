"""The aiohttp application factory: this is the program. Resources (the model, the engine) open and close in
cleanup contexts; loading the model, which blocks for seconds, runs off the event loop."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
from aiohttp import web

from appliance.admin.server import admin_ctx
from appliance.model.api import api_access_middleware, errors_middleware, routes
from appliance.app_keys import API_KEYS, CHAT, CONFIG, METRICS, METRICS_PORT, STORE, WECHAT
from appliance.model.chat import ChatService
from appliance.config import Config, EngineConfig, ModelConfig
from appliance.dialog.engine import Dialog
from appliance.dialog.filter import WordFilter
from appliance.model.engine import Engine
from appliance.errors import ConfigError
from appliance.model.gpu_preflight import nvidia_preflight
from appliance.ops.logs import request_id_middleware
from appliance.model.manifest import load_manifest
from appliance.ops.metrics import EngineCollector, GpuCollector, Metrics, WeChatCollector
from appliance.model.decoder import Decoder, open_decoder
from appliance.store.retention import run_forever as run_retention
from appliance.store.database import Store
from appliance.ops.systemd import systemd_ctx
from appliance.model.tokenizer import ChatTokenizer
from appliance.wechat.callback import Callbacks
from appliance.wechat.client import Credentials, TokenManager, WeChatClient
from appliance.wechat.outbox import Outbox
from appliance.wechat.envelope import Account
from appliance.wechat.service import WeChatService

log = logging.getLogger(__name__)

def resolve_artifact(model: ModelConfig) -> Path:
    """The configured artifact, or the catalog model's cached one (exported on first use where the export stage
    is installed)."""
    if model.artifact:
        return Path(model.artifact).expanduser()
    try:
        from export.artifacts import cached_artifact
    except ImportError:
        raise ConfigError("[model] artifact is empty and the export stage is not installed; set artifact to an "
                          "exported directory, or pip install 'r1box[export]'.") from None
    return cached_artifact(model.name)


def open_chat(model: ModelConfig, engine_config: EngineConfig, metrics: Metrics | None = None) -> ChatService:
    """Load and verify the artifact, start the decoder (CUDA falling back to the CPU) and the engine."""
    artifact = resolve_artifact(model)
    manifest = load_manifest(artifact)
    threads = model.threads or None
    provider, preflight_reason = nvidia_preflight(model.provider, artifact)
    decoder, reason = open_decoder(manifest, provider, threads, model.huge_pages)
    reason = preflight_reason or reason
    on_cpu = (lambda: Decoder(manifest, threads, "cpu", model.huge_pages)) if decoder.provider != "cpu" else None
    engine = Engine(decoder, engine_config, stop_ids=frozenset(manifest.chat["stop_ids"]),
                    think=manifest.chat.get("think"), fallback=on_cpu)
    if reason:
        engine.fallbacks, engine.fallback_reason = 1, reason
    log.info("serving %s on %s with %d threads, %d slots of %d tokens (KV cache %.0f MB)", manifest.name,
             decoder.provider, decoder.threads, engine_config.max_batch, engine.cache.max_length,
             engine.cache.nbytes / 1e6)
    engine.start()
    return ChatService(manifest, ChatTokenizer(manifest), engine, metrics)


async def _store_ctx(app: web.Application):
    config = app[CONFIG].store
    store = Store(config.file, config.keys)
    await asyncio.get_running_loop().run_in_executor(None, store.open)
    app[STORE] = store
    retention = asyncio.create_task(run_retention(store, config.conversation_days, config.audit_days,
                                                  config.retention_interval_h))
    yield
    retention.cancel()
    await asyncio.gather(retention, return_exceptions=True)
    await asyncio.get_running_loop().run_in_executor(None, store.close)


async def _chat_ctx(app: web.Application):
    config = app[CONFIG]
    chat = await asyncio.get_running_loop().run_in_executor(None, open_chat, config.model, config.engine,
                                                            app[METRICS])
    app[CHAT] = chat
    app[METRICS].watch(EngineCollector(chat.engine))
    yield
    await asyncio.get_running_loop().run_in_executor(None, chat.engine.stop)


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
        dialog = Dialog(app[CHAT], store, config.dialog, WordFilter.from_files(list(config.dialog.word_lists)),
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
        service = WeChatService(store, dialog, config.wechat.deadline_s, outbox, frozenset(pushing))
        callbacks.service = app[WECHAT] = service
        app[METRICS].watch(WeChatCollector(service, dialog))
        recovered = await service.recover()
        if recovered:
            log.info("answering %d messages received before the last stop", recovered)
        yield
        if outbox:
            await outbox.stop()
            await session.close()
    return ctx


async def _metrics_ctx(app: web.Application):
    """/metrics on its own listener, so the office network can reach the API without reaching the metrics."""
    metrics, config = app[METRICS], app[CONFIG].metrics
    gpu = GpuCollector.create()
    if gpu:
        metrics.watch(gpu)

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


def create_app(config: Config) -> web.Application:
    app = web.Application(client_max_size=config.server.max_body_kb << 10,
                          middlewares=[request_id_middleware, errors_middleware, api_access_middleware])
    app[CONFIG] = config
    app[API_KEYS] = config.server.api_keys
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(systemd_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_chat_ctx)
    app.add_routes(routes)
    accounts = wechat_accounts(config)
    if accounts:
        callbacks = Callbacks(None, accounts)
        callbacks.add_routes(app)
        app.cleanup_ctx.append(_wechat_ctx(callbacks))
    app.cleanup_ctx.append(_metrics_ctx)
    app.cleanup_ctx.append(admin_ctx)
    return app
