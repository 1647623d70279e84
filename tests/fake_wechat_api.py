"""A local fake of the platform's HTTP API that speaks its real JSON: tokens (classic, stable, WeCom) and
customer-service sends, with scripted errors. Used by the push-delivery tests."""

from __future__ import annotations

import time

from aiohttp import web


class FakeWeChatApi:
    def __init__(self):
        self.tokens_issued = 0
        self.current = ""
        self.sent: list[dict] = []
        self.last_sent_at = 0.0  # time.monotonic() of the last send taken
        self.send_errors: list[int] = []  # errcodes the next sends answer with, in order
        self.app = web.Application()
        self.app.router.add_post("/cgi-bin/stable_token", self._token)
        self.app.router.add_get("/cgi-bin/token", self._token)
        self.app.router.add_get("/cgi-bin/gettoken", self._token)
        self.app.router.add_post("/cgi-bin/message/custom/send", self._send)
        self.app.router.add_post("/cgi-bin/message/send", self._send)
        self.app.router.add_post("/cgi-bin/message/custom/typing", self._typing)
        self.typing: list[dict] = []

    async def _token(self, request: web.Request) -> web.Response:
        self.tokens_issued += 1
        self.current = f"token-{self.tokens_issued}"
        return web.json_response({"access_token": self.current, "expires_in": 7200})

    async def _typing(self, request: web.Request) -> web.Response:
        if request.query.get("access_token") != self.current:
            return web.json_response({"errcode": 40001, "errmsg": "invalid credential"})
        self.typing.append(await request.json())
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    async def _send(self, request: web.Request) -> web.Response:
        if request.query.get("access_token") != self.current:
            return web.json_response({"errcode": 40001, "errmsg": "invalid credential"})
        if self.send_errors:
            code = self.send_errors.pop(0)
            if code == 40001:
                self.current = "revoked"
            return web.json_response({"errcode": code, "errmsg": f"scripted {code}"})
        self.sent.append(await request.json())
        self.last_sent_at = time.monotonic()
        return web.json_response({"errcode": 0, "errmsg": "ok"})
