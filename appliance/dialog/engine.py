"""The dialog engine: a user's message in, the assistant's answer out, with the conversation remembered.

It keeps each user's recent turns in the store (bounded in number and age), answers a few commands itself (reset,
help), filters what comes in and what goes out, and asks the model through the chat service with reasoning
discarded: a WeChat user sees only the answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from appliance.chat import ChatService
from appliance.dialog.filter import WordFilter
from appliance.dialog.wechat_text import plain_text
from appliance.engine import Finish
from appliance.store import Store

RESET_COMMANDS = {"#reset", "/reset", "#清除记忆", "#重置", "清除记忆"}
HELP_COMMANDS = {"#help", "/help", "#帮助", "帮助"}


@dataclass(frozen=True)
class DialogConfig:
    system_prompt: str = "你是本网点的智能助理，请用简洁、礼貌的中文回答客户的问题。"
    memory_turns: int = 5  # earlier user/assistant pairs kept in the prompt
    memory_minutes: int = 30  # older turns are forgotten
    max_tokens: int = 1024
    blocked_reply: str = "抱歉，这个问题我无法回答。"
    help_text: str = "直接发送问题即可。发送“#清除记忆”开始新的对话，回答较长时发送“继续”查看后续。"
    welcome: str = "您好，欢迎关注！我是本网点的智能助理，有问题请直接发消息给我。"
    reset_reply: str = "好的，之前的对话已清除。"
    word_lists: tuple[str, ...] = ()

    def __post_init__(self):
        if self.memory_turns < 0 or self.memory_minutes < 0 or self.max_tokens < 1:
            raise ValueError("memory_turns, memory_minutes ≥ 0 and max_tokens ≥ 1")


class Dialog:
    def __init__(self, chat: ChatService, store: Store, config: DialogConfig, word_filter: WordFilter):
        self.chat, self.store, self.config, self.filter = chat, store, config, word_filter
        self.filter_hits = {"in": 0, "out": 0}

    def command(self, text: str) -> str | None:
        """The reply to a command that needs no model (help), or None. Reset is async: see answer()."""
        return self.config.help_text if text.strip().lower() in HELP_COMMANDS else None

    async def answer(self, account: str, user: str, text: str) -> str:
        text = text.strip()
        if text.lower() in RESET_COMMANDS:
            await self.store.run(_forget, account, user)
            return self.config.reset_reply
        if (reply := self.command(text)) is not None:
            return reply
        if self.filter.hits(text):
            self.filter_hits["in"] += 1
            return self.config.blocked_reply
        since = time.time() - self.config.memory_minutes * 60
        history = await self.store.run(_recent_turns, account, user, since, 2 * self.config.memory_turns)
        messages = ([{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else [])
        messages += history + [{"role": "user", "content": text}]
        parts = []
        async for item in self.chat.reply(messages, self.chat.params(max_tokens=self.config.max_tokens)):
            if not isinstance(item, Finish):
                parts.append(item.content)
        answer = plain_text("".join(parts))
        if self.filter.hits(answer):
            self.filter_hits["out"] += 1
            answer = self.filter.mask(answer)
        if not answer:
            answer = "抱歉，我没能想出答案，请换个说法再问一次。"
        await self.store.run(_remember, account, user, text, answer)
        return answer

    async def forget(self, account: str, user: str) -> None:
        await self.store.run(_forget, account, user)


def _recent_turns(db, account: str, user: str, since: float, limit: int) -> list[dict]:
    rows = db.execute("SELECT role, content FROM turns WHERE account = ? AND user = ? AND created_at >= ? "
                      "ORDER BY id DESC LIMIT ?", [account, user, since, limit]).fetchall()
    turns = [{"role": role, "content": content} for role, content in reversed(rows)]
    while turns and turns[0]["role"] != "user":  # the window may have cut a pair in half
        turns.pop(0)
    return turns


def _remember(db, account: str, user: str, question: str, answer: str) -> None:
    now = time.time()
    db["turns"].insert_all([{"account": account, "user": user, "role": "user", "content": question, "created_at": now},
                            {"account": account, "user": user, "role": "assistant", "content": answer,
                             "created_at": now}])


def _forget(db, account: str, user: str) -> None:
    db.execute("DELETE FROM turns WHERE account = ? AND user = ?", [account, user])
    db.conn.commit()
