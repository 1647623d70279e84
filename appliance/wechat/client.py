"""The platform's HTTP API, asynchronously: access tokens (stable_token or the classic one) and customer-service
messages. aiohttp with a timeout on every call; `api_base_url` points at a fixed-IP proxy where the box's address
is not on the account's IP whitelist.

One TokenManager per account: it refreshes before expiry, keeps the token in the store so a restart does not spend
the daily quota, lets one caller refresh while the others wait, and retries a call once after 40001/42001/40014
(wechatpy retries without bound).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp

from appliance.errors import R1boxError
from appliance.store.database import Store

log = logging.getLogger(__name__)

TOKEN_ERRORS = {40001, 40014, 42001}  # invalid, not latest, or expired: refresh once and retry
REFRESH_MARGIN_S = 300
FAILED_FETCH_S = 5.0  # a token fetch that failed answers its waiters with the same error for this long


class ApiError(R1boxError):
    """The platform answered with a non-zero errcode (or not at all: code -1)."""

    def __init__(self, code: int, message: str):
        super().__init__(f"WeChat API error {code}: {message}")
        self.code = code


@dataclass(frozen=True)
class Credentials:
    kind: str  # "mp" or "wecom"
    app_id: str  # AppID or CorpID
    secret: str
    stable_token: bool = True  # Official Account: /cgi-bin/stable_token, independent of other token users
    agent_id: str = ""  # WeCom: the app that sends


class WeChatClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, timeout_s: float = 10.0):
        self.session, self.base_url = session, base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def call(self, method: str, path: str, *, params: dict | None = None, json: dict | None = None) -> dict:
        try:
            async with self.session.request(method, self.base_url + path, params=params, json=json,
                                            timeout=self.timeout) as resp:
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            raise ApiError(-1, f"{type(e).__name__}: {e}"[:200]) from None
        if not isinstance(data, dict):
            raise ApiError(-1, "the answer is not a JSON object")
        if data.get("errcode", 0) != 0:
            raise ApiError(int(data["errcode"]), str(data.get("errmsg", "")))
        return data

    async def fetch_token(self, creds: Credentials) -> tuple[str, int]:
        if creds.kind == "wecom":
            data = await self.call("GET", "/cgi-bin/gettoken", params={"corpid": creds.app_id,
                                                                       "corpsecret": creds.secret})
        elif creds.stable_token:
            data = await self.call("POST", "/cgi-bin/stable_token", json={
                "grant_type": "client_credential", "appid": creds.app_id, "secret": creds.secret,
                # never force: a forced refresh invalidates the token for every other user of the account
                "force_refresh": False})
        else:
            data = await self.call("GET", "/cgi-bin/token", params={
                "grant_type": "client_credential", "appid": creds.app_id, "secret": creds.secret})
        return data["access_token"], int(data.get("expires_in", 7200))


class TokenManager:
    def __init__(self, client: WeChatClient, creds: Credentials, store: Store):
        self.client, self.creds, self.store = client, creds, store
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()
        self.refreshes = 0
        # with the network cut, every waiter fetching again would queue one timeout after another (a minute for a
        # handful of answers) before anyone notices
        self._failed: tuple[float, ApiError] | None = None

    async def token(self, stale: str | None = None) -> str:
        """The current token. `stale` is one the platform just refused: a new one is fetched unless another caller
        already did."""
        async with self._lock:  # one refresh at a time; the others wait and take its result
            now = time.time()
            if self._token is None and stale is None:
                saved = await self.store.run(_load_token, self.creds.app_id)
                if saved:
                    self._token, self._refresh_at = saved[0], _refresh_at(now, saved[1] - now)
            if self._token is None or self._token == stale or now >= self._refresh_at:
                if self._failed and time.monotonic() - self._failed[0] < FAILED_FETCH_S:
                    raise self._failed[1]
                try:
                    token, expires_in = await self.client.fetch_token(self.creds)
                except ApiError as e:
                    self._failed = (time.monotonic(), e)
                    raise
                self._failed = None
                self._token, self._refresh_at = token, _refresh_at(now, expires_in)
                self.refreshes += 1
                await self.store.run(_save_token, self.creds.app_id, token, now + expires_in)
            return self._token

    async def call(self, method: str, path: str, json: dict) -> dict:
        """An authenticated call, refreshed and retried once on a token error."""
        token = await self.token()
        try:
            return await self.client.call(method, path, params={"access_token": token}, json=json)
        except ApiError as e:
            if e.code not in TOKEN_ERRORS:
                raise
            log.warning("access token refused (%s); refreshing once", e.code)
        token = await self.token(stale=token)
        return await self.client.call(method, path, params={"access_token": token}, json=json)


def _refresh_at(now: float, expires_in: float) -> float:
    # 5 minutes early; a stable token can arrive with expires_in near 300 s, so never more than a fifth of its life
    return now + expires_in - min(REFRESH_MARGIN_S, expires_in / 5)


def _load_token(db, app_id: str) -> tuple[str, float] | None:
    rows = db.execute("SELECT token, expires_at FROM tokens WHERE app_id = ?", [app_id]).fetchall()
    return (rows[0][0], rows[0][1]) if rows and rows[0][1] > time.time() + 60 else None


def _save_token(db, app_id: str, token: str, expires_at: float) -> None:
    db["tokens"].upsert({"app_id": app_id, "token": token, "expires_at": expires_at}, pk="app_id")
