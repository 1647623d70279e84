"""Every message answered exactly once, in time.

A message is recorded in the store before anything else happens to it, under a de-duplication key (MsgId and
sender; sender and CreateTime for events), so the platform's retries, even across a restart, find the first
delivery's row instead of a second model call. The callback waits for the answer up to its deadline: in time, the
answer is the passive reply; late, the callback says `success` and the answer goes out through the outbox
("push", verified accounts) or is kept for the user's next message ("pull", accounts without the customer-service
API). Rows still unanswered at start-up (the box died mid-answer) are answered again and delivered the same way.
In the store a message is named by a keyed hash of its de-duplication key, its sender by a keyed hash, and its
contents and the sender's OpenID are sealed (appliance/store/vault.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace

from appliance.dialog.engine import Dialog
from appliance.dialog.wechat_text import wechat_pieces
from appliance.errors import UnreadableValue
from appliance.store.database import Store
from appliance.store.retention import purge_user
from appliance.wechat.outbox import Outbox

log = logging.getLogger(__name__)

PULL_HINT = "回答生成中，请稍后发送任意消息获取。"
MORE_HINT = "\n（回复“继续”查看后续内容）"
CONTINUE_COMMANDS = {"继续", "#继续", "/continue", "continue"}
NOTHING_MORE = "没有更多内容了，请直接提问。"
# Seams for what the box cannot do yet: speech recognition for voice without the platform's Recognition, and a
# multimodal model for pictures, video, places and links. Each kind gets a polite note until then.
UNSUPPORTED = {
    "voice": "暂时听不懂语音，请用文字描述您的问题。",
    "image": "暂时看不懂图片，请用文字描述您的问题。",
}
UNSUPPORTED_OTHER = "目前只能回答文字消息，请用文字描述您的问题。"


@dataclass(frozen=True)
class Inbound:
    account: str
    user: str
    kind: str  # text, voice, image, event:subscribe, …
    content: str
    dedup_key: str
    created_at: int


def inbound_of(account: str, message) -> Inbound:
    """The parts of a wechatpy message we keep; voice counts as text when the platform recognised it."""
    kind = message.type
    content = getattr(message, "content", "") or ""
    if kind == "voice" and getattr(message, "recognition", None):
        kind, content = "text", message.recognition
    if kind == "event":
        kind = f"event:{message.event}"
        content = str(getattr(message, "key", "") or "")  # a menu CLICK's EventKey, a QR scene
    key = (f"{account}:{message.source}:msg:{message.id}" if getattr(message, "id", 0)
           else f"{account}:{message.source}:{kind}:{message.time}")
    return Inbound(account, message.source, kind, content, key, int(message.time))


class WeChatService:
    def __init__(self, store: Store, dialog: Dialog, deadline_s: float = 4.5, outbox: Outbox | None = None,
                 push_accounts: frozenset[str] = frozenset()):
        self.store, self.dialog, self.deadline_s = store, dialog, deadline_s
        self.outbox, self.push_accounts = outbox, push_accounts
        self._answering: dict[str, asyncio.Task] = {}
        self._user_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.counters = {"received": 0, "duplicates": 0, "passive": 0, "pulled": 0, "pushed": 0, "late": 0}
        self.kinds: Counter = Counter()  # messages received, by kind

    async def recover(self) -> int:
        """Answer what was received but never answered before the last stop; the answers wait for a pull."""
        messages = await self.store.run(_unanswered, self.store.vault)
        for message in messages:
            self._when_done_push(message, self._start(message))
        return len(messages)

    async def on_message(self, message: Inbound) -> str | None:
        """The passive reply's text, or None for `success`. Never takes longer than the deadline."""
        started = time.monotonic()
        self.counters["received"] += 1
        self.kinds[message.kind.split(":")[0]] += 1
        message = replace(message, dedup_key=self.store.vault.ref(message.dedup_key))
        new = await self.store.run(_record, self.store.vault, message)
        if not new:
            self.counters["duplicates"] += 1
            return await self._retry(message, started)
        if message.kind == "event:unsubscribe":  # the platform requires the user's data to go
            user_hash = self.store.vault.user_hash(message.account, message.user)
            await self.store.run(purge_user, message.account, user_hash, user_hash, "unsubscribe", message.dedup_key)
            await self.dialog.forget(message.account, message.user)
            return None
        if message.kind.startswith("event:"):
            reply = self._event_reply(message)
            await self.store.run(_finish, self.store.vault, message.dedup_key, reply or "",
                                 "passive" if reply else "none")
            return reply
        pending = await self.store.run(_take_pending, self.store.vault, message.account, message.user)
        if message.kind != "text":
            note = UNSUPPORTED.get(message.kind, UNSUPPORTED_OTHER)
            await self.store.run(_finish, self.store.vault, message.dedup_key, note, "passive")
            return _merge(pending, note)
        if message.content.strip().lower() in CONTINUE_COMMANDS:
            reply = _merge(pending, "") if pending else NOTHING_MORE
            await self.store.run(_finish, self.store.vault, message.dedup_key, reply, "passive")
            return reply
        task = self._start(message)
        if pending:  # the last answers were late: they go now, and this message's answer waits for the next
            self.counters["pulled"] += 1
            return _merge(pending, PULL_HINT)
        return await self._deliver_in_time(message, task, started)

    def _event_reply(self, message: Inbound) -> str | None:
        config = self.dialog.config
        if message.kind.startswith("event:subscribe"):
            return config.welcome
        if message.kind == "event:click":  # menu buttons whose key is a command run it; others show the help
            return self.dialog.command(message.content) or config.help_text
        return None

    def _start(self, message: Inbound) -> asyncio.Task:
        task = asyncio.create_task(self._answer(message))
        self._answering[message.dedup_key] = task
        task.add_done_callback(lambda _: self._answering.pop(message.dedup_key, None))
        return task

    async def _answer(self, message: Inbound) -> str:
        lock = self._user_locks.setdefault((message.account, message.user), asyncio.Lock())
        try:
            async with lock:  # one answer in flight per user: a follow-up question needs the previous answer
                answer = await self.dialog.answer(message.account, message.user, message.content,
                                                  message.dedup_key)
        except Exception:
            log.exception("answering failed; the message stays recorded and is answered again at the next start",
                          extra={"dedup_key": message.dedup_key})
            raise
        await self.store.run(_set_answer, self.store.vault, message.dedup_key, answer)
        log.info("answered", extra={"user": _short(message.user), "chars": len(answer)})
        return answer

    async def _deliver_in_time(self, message: Inbound, task: asyncio.Task, started: float) -> str | None:
        left = self.deadline_s - (time.monotonic() - started)
        try:
            answer = await asyncio.wait_for(asyncio.shield(task), max(left, 0.0))
        except (asyncio.TimeoutError, Exception):
            self.counters["late"] += 1
            self._when_done_push(message, task)
            return None
        if await self.store.run(_claim, message.dedup_key, "passive"):
            self.counters["passive"] += 1
            return await self._first_bubble(message, answer)
        return None

    async def _first_bubble(self, message: Inbound, answer: str) -> str:
        """A passive reply is one bubble: a longer answer sends its first part, the rest waits for 继续."""
        pieces = wechat_pieces(answer, 2048 - len(MORE_HINT.encode()))
        if len(pieces) == 1:
            return answer
        await self.store.run(_keep_rest, self.store.vault, message, "".join(pieces[1:]))
        return pieces[0] + MORE_HINT

    def _when_done_push(self, message: Inbound, task: asyncio.Task) -> None:
        """Late answers of accounts that may push go out through the outbox; the others wait for a pull."""
        if self.outbox is None or message.account not in self.push_accounts:
            return
        if not task.done():
            asyncio.get_running_loop().create_task(self.outbox.typing(message.account, message.user))

        def done(t: asyncio.Task) -> None:
            if not t.cancelled() and t.exception() is None:
                asyncio.get_running_loop().create_task(self._push(message))

        task.add_done_callback(done)

    async def _push(self, message: Inbound) -> None:
        answer = await self.store.run(_claim_for_push, self.store.vault, message.dedup_key)
        if answer is not None:  # None: delivered meanwhile, passively or by a pull
            self.counters["pushed"] += 1
            await self.outbox.push(message.account, message.user, message.dedup_key, answer)

    async def _retry(self, message: Inbound, started: float) -> str | None:
        """The platform asked again: hand over the answer if it is ready and nobody delivered it yet."""
        task = self._answering.get(message.dedup_key)
        if task is not None:
            return await self._deliver_in_time(message, task, started)
        row = await self.store.run(_row, self.store.vault, message.dedup_key)
        if row and row["status"] == "answered" and await self.store.run(_claim, message.dedup_key, "passive"):
            self.counters["passive"] += 1
            return await self._first_bubble(message, row["answer"])
        return None


def _short(user: str) -> str:
    """An OpenID shortened for logs: enough to follow one user, not enough to message them."""
    return user[:4] + "…" + user[-3:] if len(user) > 10 else "…"


def _merge(pending: list[str], then: str) -> str:
    """Pending answers first, within one reply's 2048 bytes; what does not fit is cut with a note."""
    text = "\n\n".join(p for p in pending + [then] if p)
    pieces = wechat_pieces(text, 2048 - 60)
    return pieces[0] + ("\n……（回答较长，已截断）" if len(pieces) > 1 else "")


# ---- store functions, run on the store's thread; `key` is the stored (hashed) de-duplication key ----

def _record(db, vault, m: Inbound) -> bool:
    seal = lambda text, column: vault.seal(text, "inbound", column, m.dedup_key)  # noqa: E731
    cursor = db.execute(
        "INSERT OR IGNORE INTO inbound (account, dedup_key, user, user_sealed, kind, content, created_at, received_at, "
        "status, key_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'received', ?)",
        [m.account, m.dedup_key, vault.user_hash(m.account, m.user), seal(m.user, "user_sealed"), m.kind,
         seal(m.content, "content"), m.created_at, time.time(), vault.current])
    db.conn.commit()
    return cursor.rowcount == 1


def _row(db, vault, key: str) -> dict | None:
    rows = list(db["inbound"].rows_where("dedup_key = ?", [key]))
    if not rows:
        return None
    row = rows[0]
    try:
        row["answer"] = vault.unseal(row["answer"], "inbound", "answer", key)
    except UnreadableValue as e:
        log.error("%s", e)
        return None
    return row


def _set_answer(db, vault, key: str, answer: str) -> None:
    db.execute("UPDATE inbound SET answer = ?, answered_at = ?, status = 'answered', key_id = min(key_id, ?) "
               "WHERE dedup_key = ? AND status = 'received'",
               [vault.seal(answer, "inbound", "answer", key), time.time(), vault.current, key])
    db.conn.commit()


def _claim(db, key: str, delivery: str) -> bool:
    """Mark the answer delivered; False when another path delivered it first."""
    cursor = db.execute("UPDATE inbound SET status = 'delivered', delivery = ?, delivered_at = ? "
                        "WHERE dedup_key = ? AND status = 'answered'", [delivery, time.time(), key])
    db.conn.commit()
    return cursor.rowcount == 1


def _claim_for_push(db, vault, key: str) -> str | None:
    cursor = db.execute("UPDATE inbound SET status = 'pushing', delivery = 'push' WHERE dedup_key = ? "
                        "AND status = 'answered'", [key])
    db.conn.commit()
    if cursor.rowcount != 1:
        return None
    sealed = db.execute("SELECT answer FROM inbound WHERE dedup_key = ?", [key]).fetchone()[0]
    try:
        return vault.unseal(sealed, "inbound", "answer", key)
    except UnreadableValue as e:
        log.error("%s", e)
        return None


def _finish(db, vault, key: str, answer: str, delivery: str) -> None:
    now = time.time()
    db.execute("UPDATE inbound SET answer = ?, answered_at = ?, status = 'delivered', delivery = ?, delivered_at = ?, "
               "key_id = min(key_id, ?) WHERE dedup_key = ?",
               [vault.seal(answer, "inbound", "answer", key), now, delivery, now, vault.current, key])
    db.conn.commit()


def _take_pending(db, vault, account: str, user: str) -> list[str]:
    rows = db.execute("SELECT id, dedup_key, answer FROM inbound WHERE account = ? AND user = ? "
                      "AND status = 'answered' ORDER BY id", [account, vault.user_hash(account, user)]).fetchall()
    if rows:
        db.execute(f"UPDATE inbound SET status = 'delivered', delivery = 'pull', delivered_at = ? "
                   f"WHERE id IN ({','.join('?' * len(rows))})", [time.time(), *[r[0] for r in rows]])
        db.conn.commit()
    answers = []
    for _, key, sealed in rows:
        try:
            answers.append(vault.unseal(sealed, "inbound", "answer", key))
        except UnreadableValue as e:  # the others still go out
            log.error("%s", e)
    return answers


def _keep_rest(db, vault, m: Inbound, rest: str) -> None:
    """The rest of a long passive answer, as an answered row of its own that the next 继续 (or message) pulls."""
    key = m.dedup_key + ":rest"
    seal = lambda text, column: vault.seal(text, "inbound", column, key)  # noqa: E731
    db.execute("INSERT OR IGNORE INTO inbound (account, dedup_key, user, user_sealed, kind, content, created_at, "
               "received_at, status, answer, answered_at, key_id) VALUES (?, ?, ?, ?, 'text', ?, ?, ?, 'answered', "
               "?, ?, ?)",
               [m.account, key, vault.user_hash(m.account, m.user), seal(m.user, "user_sealed"), seal("", "content"),
                m.created_at, time.time(), seal(rest, "answer"), time.time(), vault.current])
    db.conn.commit()


def _unanswered(db, vault) -> list[Inbound]:
    messages = []
    for row in db["inbound"].rows_where("status = 'received' AND kind = 'text'", order_by="id"):
        key = row["dedup_key"]
        try:
            messages.append(Inbound(row["account"], vault.unseal(row["user_sealed"], "inbound", "user_sealed", key),
                                    row["kind"], vault.unseal(row["content"], "inbound", "content", key) or "", key,
                                    row["created_at"]))
        except UnreadableValue as e:
            log.error("%s; it is not answered again", e)
    return messages
