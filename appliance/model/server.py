"""`r1box model`: the model service, apart from the business logic. It loads the artifact, runs the engine, and
serves the OpenAI-compatible API (appliance/model/api.py), /healthz and its Prometheus metrics on one listener
([model_server], loopback by default). `r1box serve` reaches it as its first backend; a second box or HQ may too,
with a key.

If this process dies (a crash, an out-of-memory kill during a long prefill), WeChat, the store, the admin pages and
the outbox live on in `r1box serve`; systemd restarts this one and serve asks again what was unfinished.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import onnxruntime as ort
from aiohttp import web

from appliance.app_keys import API_KEYS, CHAT, CONFIG, LISTENER, METRICS
from appliance.config import Config, EngineConfig, ModelConfig
from appliance.errors import ConfigError
from appliance.model.api import api_access_middleware, errors_middleware, routes
from appliance.model.chat import ChatService
from appliance.model.decoder import Decoder, open_decoder
from appliance.model.engine import Engine
from appliance.model.gpu_preflight import nvidia_preflight
from appliance.model.manifest import load_manifest
from appliance.model.tokenizer import ChatTokenizer
from appliance.ops.logs import request_id_middleware
from appliance.ops.metrics import EngineCollector, GpuCollector, Metrics
from appliance.ops.systemd import systemd_ctx

log = logging.getLogger(__name__)


def resolve_artifact(model: ModelConfig, providers: list[str] | None = None) -> Path:
    """The configured artifact, or the catalog model's cached one (exported on first use where the export stage
    is installed): in float16 where CUDA may serve it, since the GPU's attention takes nothing else."""
    if model.artifact:
        return Path(model.artifact).expanduser()
    try:
        from export.artifacts import cached_artifact
    except ImportError:
        raise ConfigError("[model] artifact is empty and the export stage is not installed; set artifact to an "
                          "exported directory, or pip install 'r1box[export]'.") from None
    return cached_artifact(model.name, dtype=artifact_dtype(model.provider, providers))


def artifact_dtype(provider: str, providers: list[str] | None = None) -> str:
    """float16 where CUDA may serve (provider auto or cuda, and this onnxruntime has it), else float32."""
    providers = ort.get_available_providers() if providers is None else providers
    return "float16" if provider != "cpu" and "CUDAExecutionProvider" in providers else "float32"


def open_chat(model: ModelConfig, engine_config: EngineConfig, metrics: Metrics | None = None) -> ChatService:
    """Load and verify the artifact, start the decoder (CUDA falling back to the CPU) and the engine."""
    artifact = resolve_artifact(model)
    manifest = load_manifest(artifact)
    threads = model.threads or None
    provider, preflight_reason = nvidia_preflight(model.provider, artifact)
    decoder, reason = open_decoder(manifest, provider, threads, model.huge_pages, model.int4_kernel)
    reason = preflight_reason or reason
    on_cpu = (lambda: Decoder(manifest, threads, "cpu", model.huge_pages, model.int4_kernel)) \
        if decoder.provider != "cpu" else None
    engine = Engine(decoder, engine_config, stop_ids=frozenset(manifest.chat["stop_ids"]),
                    think=manifest.chat.get("think"), fallback=on_cpu)
    if reason:
        engine.fallbacks, engine.fallback_reason = 1, reason
    log.info("serving %s on %s with %d threads, %d slots of up to %d tokens, KV budget %.0f MB (%d tokens)",
             manifest.name, decoder.provider, decoder.threads, engine_config.max_batch, engine.cache.max_length,
             engine.kv_budget * engine.cache.bytes_per_token / 1e6, engine.kv_budget)
    engine.start()
    return ChatService(manifest, ChatTokenizer(manifest), engine, metrics)


async def _chat_ctx(app: web.Application):
    config = app[CONFIG]
    chat = await asyncio.get_running_loop().run_in_executor(None, open_chat, config.model, config.engine,
                                                            app[METRICS])
    app[CHAT] = chat
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR2, _inject_provider_failure, chat.engine)
    app[METRICS].watch(EngineCollector(chat.engine))
    gpu = GpuCollector.create()
    if gpu:
        app[METRICS].watch(gpu)
    yield
    loop.remove_signal_handler(signal.SIGUSR2)
    await asyncio.get_running_loop().run_in_executor(None, chat.engine.stop)


def _inject_provider_failure(engine) -> None:
    """SIGUSR2, for the fault drills on a box without a GPU: the state a failed GPU leaves (the provider counted as
    failed, /healthz degraded), without the GPU. The answers go on, from the CPU."""
    engine.fallbacks += 1
    engine.fallback_reason = "provider failure injected with SIGUSR2 (a fault drill)"
    log.warning("the execution provider is marked failed (SIGUSR2, a fault drill): /healthz says degraded")


async def _metrics(request: web.Request) -> web.Response:
    """The engine's metrics, behind the API's access rule (loopback, or a key)."""
    return web.Response(body=request.app[METRICS].exposition(), content_type="text/plain", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


def create_model_app(config: Config) -> web.Application:
    app = web.Application(client_max_size=config.model_server.max_body_kb << 10,
                          middlewares=[request_id_middleware, errors_middleware, api_access_middleware])
    app[CONFIG], app[LISTENER] = config, config.model_server
    app[API_KEYS] = config.model_server.api_keys
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(systemd_ctx)
    app.cleanup_ctx.append(_chat_ctx)
    app.add_routes(routes)
    app.router.add_get("/metrics", _metrics)
    return app
