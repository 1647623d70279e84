"""The platform's callbacks on the aiohttp app: the Official Account at /wechat, WeCom at /wecom.

GET verifies the URL (the Official Account echoes echostr; WeCom sends it encrypted and wants the plaintext). POST
carries messages: plain, compatible (plaintext beside <Encrypt>) or safe mode on the Official Account, always
encrypted on WeCom; the reply is encrypted exactly when the request was. A malformed or forged request gets a 4xx
and one log line, never a 500.
"""

from __future__ import annotations

import logging
from urllib.parse import unquote

from aiohttp import web

from appliance.wechat.envelope import (Account, BadCallback, ReplayGuard, check_plain_signature, decrypt,
                                       decrypt_echostr, encrypt_reply, parse, reply_xml, safe_xml)
from appliance.wechat.service import WeChatService, inbound_of

log = logging.getLogger(__name__)

MAX_BODY = 64 << 10  # a WeChat message is a few KB; a bigger body is not one


def raw_query(request: web.Request) -> dict[str, str]:
    """Query values percent-decoded but with '+' kept: base64 in echostr and Encrypt uses '+', which a form
    decoder would turn into a space."""
    pairs = (part.partition("=") for part in request.rel_url.raw_query_string.split("&") if part)
    return {unquote(k): unquote(v) for k, _, v in pairs}


class Callbacks:
    def __init__(self, service: WeChatService | None, accounts: dict[str, Account]):
        self.service, self.accounts = service, accounts  # the service is set once the model has loaded
        self.guards = {path: ReplayGuard(account.replay_window_s) for path, account in accounts.items()}

    def add_routes(self, app: web.Application) -> None:
        for path in self.accounts:
            app.router.add_get(path, self.verify)
            app.router.add_post(path, self.receive)

    async def verify(self, request: web.Request) -> web.Response:
        account = self.accounts[request.path]
        query = raw_query(request)
        try:
            if account.kind == "wecom":
                timestamp, nonce, signature = _required(query, "timestamp", "nonce", "msg_signature")
                self.guards[request.path].check(timestamp, nonce, signature)
                echo = decrypt_echostr(account, signature, timestamp, nonce, _required(query, "echostr")[0])
            else:
                check_plain_signature(account, query)
                echo = _required(query, "echostr")[0]
        except BadCallback as e:
            return _refuse(request, e)
        return web.Response(text=echo, content_type="text/plain")

    async def receive(self, request: web.Request) -> web.Response:
        account = self.accounts[request.path]
        query = raw_query(request)
        try:
            if request.content_length is not None and request.content_length > MAX_BODY:
                raise BadCallback(f"body of {request.content_length} bytes is over {MAX_BODY}", 413)
            body = await request.content.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                raise BadCallback(f"body is over {MAX_BODY} bytes", 413)
            encrypted = account.kind == "wecom" or query.get("encrypt_type") == "aes"
            if encrypted and account.mode == "plain":
                raise BadCallback("an encrypted message, but the account is configured for plain mode", 403)
            if not encrypted and account.mode == "safe":
                raise BadCallback("a plaintext message, but the account is configured for safe mode", 403)
            if account.kind == "wecom":
                timestamp, nonce, signature = _required(query, "timestamp", "nonce", "msg_signature")
            else:
                timestamp, nonce = check_plain_signature(account, query)
                signature = query.get("msg_signature", "") if encrypted else query["signature"]
                if encrypted and not signature:
                    raise BadCallback("encrypt_type=aes without msg_signature", 403)
            self.guards[request.path].check(timestamp, nonce, signature)
            xml = safe_xml(body)
            if encrypted:
                xml = decrypt(account, xml, signature, timestamp, nonce)
            message = parse(xml)
        except BadCallback as e:
            return _refuse(request, e)
        answer = await self.service.on_message(inbound_of(account.app_id, message))
        await self.service.store.reached_peer()  # what the platform is told we have, the standby has too
        if not answer:
            return web.Response(text="success", content_type="text/plain")
        reply = reply_xml(message, answer)
        if encrypted:
            reply = encrypt_reply(account, reply, nonce, timestamp)
        return web.Response(text=reply, content_type="application/xml")


def _required(query: dict[str, str], *names: str) -> list[str]:
    values = [query.get(n, "") for n in names]
    if not all(values):
        raise BadCallback(f"{', '.join(names)} are required", 403)
    return values


def _refuse(request: web.Request, error: BadCallback) -> web.Response:
    log.warning("refused %s %s from %s: %s", request.method, request.path, request.remote, error)
    return web.Response(status=error.status, text=str(error), content_type="text/plain")
