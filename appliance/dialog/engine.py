"""The dialog engine: a user's message in, the assistant's answer out, with the conversation remembered.

It keeps each user's recent turns in the store (bounded in number and age), answers a few commands itself (reset,
help), filters what comes in and what goes out, and asks a model through the backends (appliance/backends/) with
reasoning discarded: a WeChat user sees only the answer. Turns are stored sealed, under the user's keyed hash.
When no backend can answer, a question close to one of the operators' frequently asked ones gets its approved
answer from the answer cache at once, marked as such; any other waits (it is already recorded in the store) and is
asked again, whole, once a backend answers its probe: nothing is remembered of it until an answer came. During a
gray release (appliance/release/) the release decides which variant answers a user and records each answer.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque

from appliance.backends.client import Completion
from appliance.backends.pool import Backends
from appliance.config import DialogConfig
from appliance.dialog import answer_cache
from appliance.dialog.filter import WordFilter
from appliance.dialog.wechat_text import plain_text
from appliance.errors import NoBackend, UnreadableValue
from appliance.store import audit
from appliance.store.database import Store
from appliance.store.transaction import transaction

log = logging.getLogger(__name__)

RESET_COMMANDS = {"#reset", "/reset", "#清除记忆", "#重置", "清除记忆"}
HELP_COMMANDS = {"#help", "/help", "#帮助", "帮助"}
SHOW_REASONING = {"#显示思考", "#think on", "/think on"}
HIDE_REASONING = {"#隐藏思考", "#think off", "/think off"}
# each spelling of a command under one name, for the dashboard's top commands
COMMAND_NAMES = {**dict.fromkeys(RESET_COMMANDS, "reset"), **dict.fromkeys(HELP_COMMANDS, "help"),
                 **dict.fromkeys(SHOW_REASONING, "think_on"), **dict.fromkeys(HIDE_REASONING, "think_off")}


class Dialog:
    def __init__(self, backends: Backends, store: Store, config: DialogConfig, word_filter: WordFilter,
                 system_prompts: dict[str, str] | None = None):
        self.backends, self.store, self.config, self.filter = backends, store, config, word_filter
        self.system_prompts = {k: v for k, v in (system_prompts or {}).items() if v}  # per account, else config
        self.filter_hits = {"in": 0, "out": 0}
        self.waiting = 0  # questions held until a backend answers again
        self.cache_answers = 0  # answered from the answer cache while no backend could
        self.show_reasoning: set[tuple[str, str]] = set()  # users who asked to see the model's reasoning
        self._recent: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self.release = None  # a ReleaseManager (appliance/release/) while serve runs: who gets which variant

    def command(self, text: str) -> str | None:
        """The reply to a command that needs no model (help), or None. Reset is async: see answer()."""
        return self.config.help_text if text.strip().lower() in HELP_COMMANDS else None

    def _over_rate(self, who: tuple[str, str]) -> bool:
        if not self.config.rate_per_minute:
            return False
        now, times = time.monotonic(), self._recent[who]
        while times and times[0] < now - 60:
            times.popleft()
        if len(times) >= self.config.rate_per_minute:
            return True
        times.append(now)
        return False

    async def answer(self, account: str, user: str, text: str, ref: str = "") -> str:
        """The reply to one message; `ref` names the message in the store, for the release's samples."""
        text, who = text.strip(), (account, user)
        if command := COMMAND_NAMES.get(text.lower()):
            await self.store.run(_count_command, account, command)
        if text.lower() in RESET_COMMANDS:
            await self.store.run(_forget, self.store.vault, account, user)
            return self.config.reset_reply
        if text.lower() in SHOW_REASONING | HIDE_REASONING:
            (self.show_reasoning.add if text.lower() in SHOW_REASONING else self.show_reasoning.discard)(who)
            return "好的，之后的回答会附上思考过程。" if who in self.show_reasoning else "好的，之后只显示回答。"
        if (reply := self.command(text)) is not None:
            return reply
        if self._over_rate(who):
            return self.config.rate_limited_reply
        self.filter.reload_if_changed()
        if hits := self.filter.hits(text):
            await self._audit_hit(account, user, "in", hits)
            return self.config.blocked_reply
        since = time.time() - self.config.memory_minutes * 60
        history = await self.store.run(_recent_turns, self.store.vault, account, user, since,
                                       2 * self.config.memory_turns)
        history = self._within_budget(history)
        system = self.system_prompts.get(account, self.config.system_prompt)
        messages = [{"role": "system", "content": system}] if system else []
        messages += history + [{"role": "user", "content": text}]
        completion, variant = await self._ask(account, user, text, messages)
        answer, thought = plain_text(completion.content), completion.reasoning.strip()
        outcome = "ok" if answer else "empty"
        if who in self.show_reasoning and thought:
            answer = f"【思考】{plain_text(thought)}\n\n【回答】{answer}"
        if hits := self.filter.hits(answer):
            await self._audit_hit(account, user, "out", hits)
            answer, outcome = self.filter.mask(answer), "blocked"
        if not answer:
            answer = "抱歉，我没能想出答案，请换个说法再问一次。"
        if self.release and variant:
            await self.release.served(ref, account, user, variant, completion, outcome, messages,
                                      self.config.max_tokens)
        await self.store.run(_remember, self.store.vault, account, user, text, answer)
        return answer

    async def _ask(self, account: str, user: str, text: str, messages: list[dict]) -> tuple[Completion, str]:
        """The answer from a backend (during a release, from the variant this user is in) and that variant; while
        none can answer, an approved answer from the cache (variant ""), or else the wait for one to come back."""
        while True:
            try:
                if self.release:
                    return await self.release.complete(account, user, messages, self.config.max_tokens)
                return await self.backends.complete(messages, self.config.max_tokens), ""
            except NoBackend as e:
                if self.config.answer_cache:
                    cached = await self.store.run(answer_cache.lookup, account, text,
                                                  self.config.answer_cache_similarity)
                    if cached:
                        self.cache_answers += 1
                        log.info("no backend can answer; answered from the answer cache")
                        return Completion(f"{cached}\n{self.config.answer_cache_note}", "", "stop", "answer_cache",
                                          "", 0.0, 0.0), ""
                self.waiting += 1
                log.warning("%s; the question waits in the store for a backend to come back", e)
                try:
                    await self.backends.wait_up()
                finally:
                    self.waiting -= 1

    async def _audit_hit(self, account: str, user: str, direction: str, hits: list[str]) -> None:
        self.filter_hits[direction] += 1
        await self.store.run(audit.record, "filter_hit", {"direction": direction, "words": hits},
                             self.store.vault.user_hash(account, user))

    async def forget(self, account: str, user: str) -> None:
        await self.store.run(_forget, self.store.vault, account, user)
        self.show_reasoning.discard((account, user))

    def _within_budget(self, history: list[dict]) -> list[dict]:
        """Drop the oldest question/answer pairs until the kept turns fit memory_tokens."""
        while history and sum(estimate_tokens(t["content"]) for t in history) > self.config.memory_tokens:
            history = history[2:]
        return history


def estimate_tokens(text: str) -> int:
    """An upper bound on tokens without the model's tokenizer (the backend may be any model): a Chinese character
    is one token or less in the R1 and Qwen vocabularies and takes 3 UTF-8 bytes; English words take 4-5 bytes a
    token, so this overcounts them and memory errs on the short side."""
    return len(text.encode()) // 3 + 1


def _recent_turns(db, vault, account: str, user: str, since: float, limit: int) -> list[dict]:
    rows = db.execute("SELECT id, role, content FROM turns WHERE account = ? AND user = ? AND created_at >= ? "
                      "ORDER BY id DESC LIMIT ?", [account, vault.user_hash(account, user), since, limit]).fetchall()
    turns = []
    for row_id, role, sealed in reversed(rows):
        try:
            turns.append({"role": role, "content": vault.unseal(sealed, "turns", "content", row_id)})
        except UnreadableValue as e:  # the conversation goes on without that turn
            log.error("%s", e)
    while turns and turns[0]["role"] != "user":  # the window may have cut a pair in half
        turns.pop(0)
    return turns


def _remember(db, vault, account: str, user: str, question: str, answer: str) -> None:
    now, user_hash = time.time(), vault.user_hash(account, user)
    with transaction(db):
        for role, content in (("user", question), ("assistant", answer)):
            # the row's id is its content's context, so the content is sealed once the row has one
            row_id = db.execute("INSERT INTO turns (account, user, role, content, created_at, key_id) "
                                "VALUES (?, ?, ?, '', ?, ?)", [account, user_hash, role, now, vault.current]).lastrowid
            db.execute("UPDATE turns SET content = ? WHERE id = ?",
                       [vault.seal(content, "turns", "content", row_id), row_id])


def _count_command(db, account: str, command: str) -> None:
    db["command_uses"].insert({"account": account, "command": command, "at": time.time()})


def _forget(db, vault, account: str, user: str) -> None:
    db.execute("DELETE FROM turns WHERE account = ? AND user = ?", [account, vault.user_hash(account, user)])
    db.conn.commit()
