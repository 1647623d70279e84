"""Push delivery: late answers go out through the customer-service API, from an outbox kept in SQLite.

A row is written before the first attempt, so a network cut or a restart loses nothing: rows wait and go out when
the platform answers again. One sender loop keeps the whole box under 3 messages a second, respects the quota of 5
messages per user in the 48 hours after their last message (a long answer is cut into 2048-byte pieces only as far
as the quota goes; the rest waits for the user's next message), backs off on network errors, and maps the
platform's refusals to what can still be done:

    45015 window closed, 45047 quota spent,
    45002 content too long                   → keep the answer for the user's next message (pull)
    48001 API unauthorized (unverified)      → pull, and an alert: set delivery = "pull"
    40164 IP not on the whitelist            → keep trying, and an alert that says what to do
    45009, 45011 rate limits, network errors → back off and retry
    WeCom: 30 messages a minute per member   → held until the minute has room (WeCom drops the excess silently)

Rows carry the user's keyed hash for counting and the OpenID sealed for sending; contents are sealed. A row that
cannot be opened (altered in the file) is set aside as 'unreadable' with its reason, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque

from appliance.errors import UnreadableValue
from appliance.store.database import Store
from appliance.store.transaction import transaction
from appliance.wechat.client import ApiError, Credentials, TokenManager
from appliance.wechat.envelope import split_utf8

log = logging.getLogger(__name__)

USER_QUOTA = 5
QUOTA_WINDOW_S = 48 * 3600
WECOM_PER_MEMBER_PER_MINUTE = 30  # beyond it WeCom drops messages silently
TO_PULL = {45002, 45015, 45047, 48001}  # 45002: too long, which the 2048-byte pieces should never be
ALERTS = {
    48001: "the account may not use the customer-service API (unverified?): set [wechat] delivery = \"pull\"",
    40164: "the platform refuses this box's IP address: add it to the account's IP whitelist, or set "
           "[wechat] api_base_url to a fixed-IP proxy",
}
MORE = "\n（回复任意消息查看后续内容）"


class Outbox:
    def __init__(self, store: Store, tokens: dict[str, TokenManager], credentials: dict[str, Credentials],
                 rate_per_s: float = 2.5, max_backoff_s: float = 300.0):
        self.store, self.tokens, self.credentials = store, tokens, credentials
        self.interval = 1.0 / rate_per_s
        self.max_backoff_s = max_backoff_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.results: Counter = Counter()  # by errcode, 0 for sent
        self.alerts: deque[dict] = deque(maxlen=100)
        self.pending_count, self.oldest_age_s = 0, 0.0  # refreshed by the sender loop, read by /metrics

    async def push(self, account: str, user: str, inbound_key: str, text: str) -> None:
        """Queue an answer; pieces beyond the user's remaining quota wait for their next message."""
        await self.store.run(_enqueue, self.store.vault, account, user, inbound_key, text, time.time())
        self._wake.set()

    async def typing(self, account: str, user: str) -> None:
        """"Typing…" in the user's chat while a late answer is made (Official Accounts only; best effort: it
        needs an interaction in the last 30 s, lasts 15 s, and a refusal changes nothing)."""
        if self.credentials[account].kind != "mp":
            return
        try:
            await self.tokens[account].call("POST", "/cgi-bin/message/custom/typing",
                                            {"touser": user, "command": "Typing"})
        except ApiError as e:
            log.debug("typing indicator refused (%s)", e.code)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def pending(self) -> tuple[int, float | None]:
        """How many rows wait, and the age in seconds of the oldest."""
        return await self.store.run(_pending_stats, time.time())

    async def _run(self) -> None:
        while True:
            count, oldest = await self.pending()
            self.pending_count, self.oldest_age_s = count, oldest or 0.0
            row = await self.store.run(_next_due, self.store.vault, time.time())
            if row is None:
                self._wake.clear()
                wait = await self.store.run(_seconds_to_next, time.time())
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=min(wait, 30.0) if wait is not None else 30)
                except asyncio.TimeoutError:
                    pass
                continue
            await self._send(row)
            await asyncio.sleep(self.interval)

    async def _send(self, row: dict) -> None:
        creds = self.credentials[row["account"]]
        if creds.kind == "wecom":
            wait = await self.store.run(_member_wait, row["account"], row["user_hash"], time.time())
            if wait > 0:  # WeCom would drop it without an error: hold it until the minute has room
                await self.store.run(_retry_later, row["id"], "WeCom per-member minute cap", time.time() + wait, 0)
                return
        try:
            if creds.kind == "wecom":
                await self.tokens[row["account"]].call("POST", "/cgi-bin/message/send", {
                    "touser": row["user"], "msgtype": "text", "agentid": int(creds.agent_id or 0),
                    "text": {"content": row["content"]}})
            else:
                await self.tokens[row["account"]].call("POST", "/cgi-bin/message/custom/send", {
                    "touser": row["user"], "msgtype": "text", "text": {"content": row["content"]}})
        except ApiError as e:
            self.results[e.code] += 1
            if e.code in ALERTS:
                self.alerts.append({"at": time.time(), "code": e.code, "account": row["account"],
                                    "message": ALERTS[e.code]})
                log.error("WeChat refused a push (%s): %s", e.code, ALERTS[e.code])
            if e.code in TO_PULL:
                await self.store.run(_back_to_pull, self.store.vault, row["id"], str(e))
            else:
                backoff = min(self.max_backoff_s, 2.0 ** min(row["attempts"] + 1, 16))
                await self.store.run(_retry_later, row["id"], str(e), time.time() + backoff)
            return
        self.results[0] += 1
        await self.store.run(_sent, row["id"], time.time())
        await self.store.reached_peer()  # a standby that takes over must not push it again


# ---- store functions, run on the store's thread ----

def _enqueue(db, vault, account: str, user: str, key: str, text: str, now: float) -> None:
    user_hash = vault.user_hash(account, user)
    last_inbound = db.execute("SELECT max(received_at) FROM inbound WHERE account = ? AND user = ?",
                              [account, user_hash]).fetchone()[0] or now
    since = max(last_inbound, now - QUOTA_WINDOW_S)
    used = db.execute("SELECT count(*) FROM outbox WHERE account = ? AND user = ? AND status IN ('pending', 'sent') "
                      "AND created_at >= ?", [account, user_hash, since]).fetchone()[0]
    room = max(USER_QUOTA - used, 0)
    pieces = split_utf8(text, 2048)
    if len(pieces) > room:  # the last message that fits says there is more; the rest is pulled later
        fit = split_utf8(text, 2048 - len(MORE.encode()))
        send, rest = ([p for p in fit[:room - 1]] + [fit[room - 1] + MORE], "".join(fit[room:])) if room else ([], text)
    else:
        send, rest = pieces, ""
    with transaction(db):
        for piece in send:  # the row's id is its values' context, so they are sealed once it has one
            row_id = db.execute("INSERT INTO outbox (account, user, inbound_key, content, created_at, attempts, "
                                "next_attempt_at, status) VALUES (?, ?, ?, '', ?, 0, ?, 'pending')",
                                [account, user_hash, key, now, now]).lastrowid
            db.execute("UPDATE outbox SET content = ?, user_sealed = ?, key_id = ? WHERE id = ?",
                       [vault.seal(piece, "outbox", "content", row_id), vault.seal(user, "outbox", "user_sealed",
                                                                                   row_id), vault.current, row_id])
        if rest:
            db.execute("UPDATE inbound SET status = 'answered', answer = ?, delivery = NULL, key_id = min(key_id, ?) "
                       "WHERE dedup_key = ?", [vault.seal(rest, "inbound", "answer", key), vault.current, key])


def _next_due(db, vault, now: float) -> dict | None:
    """The next row to send, opened: `user` is the OpenID to send to, `user_hash` what the row counts under."""
    for row in db["outbox"].rows_where("status = 'pending' AND next_attempt_at <= ?", [now], order_by="id"):
        try:
            return {**row, "user_hash": row["user"],
                    "user": vault.unseal(row["user_sealed"], "outbox", "user_sealed", row["id"]),
                    "content": vault.unseal(row["content"], "outbox", "content", row["id"])}
        except UnreadableValue as e:
            log.error("%s", e)
            with transaction(db):
                db.execute("UPDATE outbox SET status = 'unreadable', last_error = ? WHERE id = ?",
                           [str(e)[:300], row["id"]])
    return None


def _seconds_to_next(db, now: float) -> float | None:
    at = db.execute("SELECT min(next_attempt_at) FROM outbox WHERE status = 'pending'").fetchone()[0]
    return None if at is None else max(at - now, 0.0)


def _sent(db, row_id: int, now: float) -> None:
    with transaction(db):
        db.execute("UPDATE outbox SET status = 'sent', sent_at = ?, attempts = attempts + 1 WHERE id = ?",
                   [now, row_id])
        db.execute("UPDATE inbound SET status = 'delivered', delivered_at = ? WHERE dedup_key = "
                   "(SELECT inbound_key FROM outbox WHERE id = ?) AND status = 'pushing'", [now, row_id])


def _retry_later(db, row_id: int, error: str, at: float, attempt: int = 1) -> None:
    with transaction(db):
        db.execute("UPDATE outbox SET attempts = attempts + ?, next_attempt_at = ?, last_error = ? WHERE id = ?",
                   [attempt, at, error[:300], row_id])


def _member_wait(db, account: str, user: str, now: float) -> float:
    """Seconds until a WeCom member may receive another message within the per-minute cap (0: now)."""
    sent = [r[0] for r in db.execute("SELECT sent_at FROM outbox WHERE account = ? AND user = ? AND status = 'sent' "
                                     "AND sent_at > ? ORDER BY sent_at", [account, user, now - 60]).fetchall()]
    if len(sent) < WECOM_PER_MEMBER_PER_MINUTE:
        return 0.0
    return sent[len(sent) - WECOM_PER_MEMBER_PER_MINUTE] + 60 - now


def _back_to_pull(db, vault, row_id: int, error: str) -> None:
    """The platform will not take it: the answer waits for the user's next message instead."""
    with transaction(db):
        key = db["outbox"].get(row_id)["inbound_key"]
        db.execute("UPDATE outbox SET status = 'pull', last_error = ?, attempts = attempts + 1 WHERE id = ?",
                   [error[:300], row_id])
        pieces = db.execute("SELECT id, content FROM outbox WHERE inbound_key = ? AND status = 'pull' ORDER BY id",
                            [key]).fetchall()
        answer = "".join(_opened(vault, piece_id, content) for piece_id, content in pieces)
        db.execute("UPDATE inbound SET status = 'answered', delivery = NULL, answer = ?, key_id = min(key_id, ?) "
                   "WHERE dedup_key = ?", [vault.seal(answer, "inbound", "answer", key), vault.current, key])


def _opened(vault, row_id: int, content) -> str:
    try:
        return vault.unseal(content, "outbox", "content", row_id)
    except UnreadableValue as e:
        log.error("%s", e)
        return ""


def _pending_stats(db, now: float) -> tuple[int, float | None]:
    count, oldest = db.execute("SELECT count(*), min(created_at) FROM outbox WHERE status = 'pending'").fetchone()
    return count, (None if oldest is None else now - oldest)
