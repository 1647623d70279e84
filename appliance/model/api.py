"""The model service's API: OpenAI-compatible chat completions (plain and server-sent events), the model list
and health.

Reasoning goes in `reasoning_content`, apart from `content`, as DeepSeek's own API does. Errors come back in
OpenAI's shape, {"error": {"message", "type", "code"}}, from one middleware.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid

from aiohttp import web

from appliance.app_keys import API_KEYS, CHAT
from appliance.config import is_loopback
from appliance.errors import EngineBusy, R1boxError, RequestError
from appliance.model.chat import Delta
from appliance.model.engine import Finish

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

KEEPALIVE_S = 5.0  # the longest silence in a stream

_FIELDS = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
           "top_p", "top_k", "seed", "repetition_penalty", "n", "user", "stop", "frequency_penalty",
           "presence_penalty"}


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status,
                             headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except RequestError as e:
        return _error(400, str(e), "invalid_request_error")
    except EngineBusy as e:
        return _error(503, str(e), "server_busy", {"Retry-After": str(e.retry_after_s)})
    except R1boxError as e:
        log.error("request failed: %s", e)
        return _error(500, str(e), "server_error")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, e.reason, "invalid_request_error")


@web.middleware
async def api_access_middleware(request: web.Request, handler):
    """The API and the metrics answer other machines only over TLS and with a key: a plain-HTTP listener beyond
    loopback ([model_server] tls = "off") serves them to this machine alone."""
    if not request.path.startswith(("/v1/", "/metrics")):
        return await handler(request)
    if not request.secure and not is_loopback(request.remote):
        return _error(403, "this listener speaks plain HTTP ([model_server] tls = \"off\"), so the API answers this "
                      "machine only: call it on the box, or set tls = \"auto\" to reach it over TLS 1.3.",
                      "permission_error")
    keys = request.app[API_KEYS]
    if keys:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip().encode()
        if not any(hmac.compare_digest(given, k.encode()) for k in keys):
            return _error(401, "missing or wrong API key: send Authorization: Bearer <key>.", "authentication_error")
    return await handler(request)


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    chat = request.app[CHAT]
    stats = chat.engine.stats()
    return web.json_response({
        "status": "degraded" if stats["fallbacks"] else "ok",
        "model": chat.model_name, "provider": stats["provider"], "fallback_reason": stats["fallback_reason"],
        "queue": {k: stats[k] for k in ("running", "waiting", "slots", "free_slots")},
        "kv_cache_usage": stats["kv_cache_usage"], "prefix_cache": stats["prefix_cache"],
        "uptime_s": round(time.time() - chat.started, 1),
    })


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    chat = request.app[CHAT]
    return web.json_response({"object": "list", "data": [
        {"id": chat.model_name, "object": "model", "created": int(chat.started), "owned_by": "r1box"}]})


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    chat = request.app[CHAT]
    body = await _json_body(request)
    messages = [_message(m) for m in _require(body, "messages", list)]
    if body.get("n", 1) != 1:
        raise RequestError("n must be 1.")
    if body.get("stop") not in (None, [], ""):
        raise RequestError("custom stop strings are not supported; the model's own end tokens apply.")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or not 1 <= max_tokens <= chat.engine.config.max_length):
        raise RequestError(f"max_tokens must be an integer from 1 to {chat.engine.config.max_length}.")
    params = chat.params(temperature=_number(body, "temperature"), top_p=_number(body, "top_p"),
                         top_k=_integer(body, "top_k"), seed=_integer(body, "seed"),
                         repetition_penalty=_number(body, "repetition_penalty"), max_tokens=max_tokens or 1024)
    reply = chat.reply(messages, params)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await _stream(request, reply, ident, created, chat.model_name, include_usage)
    reasoning, content, finish = [], [], None
    try:
        async for item in reply:
            if isinstance(item, Finish):
                finish = item
            else:
                reasoning.append(item.reasoning)
                content.append(item.content)
            if _gone(request):
                break
    finally:
        await reply.aclose()
    if finish is None:  # the client left; nobody reads this
        return web.Response(status=499)
    message = {"role": "assistant", "content": "".join(content)}
    if chat.think:
        message["reasoning_content"] = "".join(reasoning)
    return web.json_response({
        "id": ident, "object": "chat.completion", "created": created, "model": chat.model_name,
        "choices": [{"index": 0, "message": message, "finish_reason": finish.reason}],
        "usage": _usage(finish),
    })


async def _stream(request, reply, ident: str, created: int, model: str, include_usage: bool) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    first = True
    items = _with_keepalives(reply, response, request)
    try:
        async for item in items:
            if first:
                await _start(response, request)
                await _event(response, ident, created, model, {"role": "assistant", "content": ""})
                first = False
            if isinstance(item, Finish):
                await _event(response, ident, created, model, {}, finish=item.reason)
                if include_usage:
                    await _send(response, {"id": ident, "object": "chat.completion.chunk", "created": created,
                                           "model": model, "choices": [], "usage": _usage(item)})
                await response.write(b"data: [DONE]\n\n")
                break
            delta: Delta = item
            if delta.reasoning:
                await _event(response, ident, created, model, {"reasoning_content": delta.reasoning})
            if delta.content:
                await _event(response, ident, created, model, {"content": delta.content})
    except ConnectionResetError:
        log.info("client left mid-stream; generation cancelled")
    except asyncio.CancelledError:  # the client hung up (the listener cancels handlers on disconnect) or shutdown
        log.info("client left; generation cancelled")
        raise
    finally:
        await items.aclose()
        await reply.aclose()
    return response


async def _start(response: web.StreamResponse, request: web.Request) -> None:
    if not response.prepared:
        await response.prepare(request)


async def _with_keepalives(reply, response: web.StreamResponse, request: web.Request):
    """The reply's items; while none comes for KEEPALIVE_S (a long prefill, a full engine), an SSE comment, so a
    caller tells a slow answer from a hung server (appliance/backends/client.py). The headers go out with the first
    item or comment: the engine refuses a request at once or not at all, so "busy" is still a 503."""
    items = aiter(reply)
    while True:
        step = asyncio.ensure_future(anext(items))
        try:
            while not (await asyncio.wait({step}, timeout=KEEPALIVE_S))[0]:
                await _start(response, request)
                await response.write(b": keep-alive\n\n")
        finally:
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
        try:
            item = step.result()
        except StopAsyncIteration:
            return
        yield item


async def _event(response, ident, created, model, delta: dict, finish: str | None = None) -> None:
    await _send(response, {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


async def _send(response, payload: dict) -> None:
    await response.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")


def _usage(finish: Finish) -> dict:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finish.reused_tokens}}


def _gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError("the body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object.")
    unknown = set(body) - _FIELDS
    if unknown:
        raise RequestError(f"unknown field {sorted(unknown)[0]!r}.")
    return body


def _require(body: dict, key: str, kind: type):
    value = body.get(key)
    if not isinstance(value, kind) or not value:
        raise RequestError(f"{key} is required and must be a non-empty {kind.__name__}.")
    return value


def _message(m) -> dict:
    if not isinstance(m, dict):
        raise RequestError("each message must be an object with role and content.")
    content = m.get("content")
    if isinstance(content, list):  # OpenAI's content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise RequestError("only text content parts are supported.")
        content = "".join(p["text"] for p in content)
    return {"role": m.get("role"), "content": content}


def _number(body: dict, key: str) -> float | None:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise RequestError(f"{key} must be a number.")
    return None if value is None else float(value)


def _integer(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise RequestError(f"{key} must be an integer.")
    return value
