"""The dialog engine on the tiny model (served by the real model app, asked through the real backends) and a real
SQLite file: memory within its budgets, commands, the per-user rate limit, the reasoning toggle, and the
sensitive-word filter (normalized matching, masking, live reload)."""

import json
import os
import time

import aiohttp
import pytest

from appliance.app_keys import CHAT
from appliance.backends.pool import Backends
from appliance.config import BackendConfig, DialogConfig, load_config
from appliance.dialog.engine import Dialog, _recent_turns, estimate_tokens
from appliance.dialog.filter import WordFilter
from appliance.model.server import create_model_app
from appliance.store.database import Store
from tests.conftest import write_config


@pytest.fixture
async def model(aiohttp_server, tiny_fp32, tmp_path):
    config = write_config(tmp_path, tiny_fp32, "[engine]\nmax_batch = 2\nmax_length = 512\nthink_budget = 4\n")
    return await aiohttp_server(create_model_app(load_config(config)))


@pytest.fixture
async def chat(model):
    """What the dialog talks to: the backends, here the one model app."""
    async with aiohttp.ClientSession() as session:
        yield Backends((BackendConfig(url=str(model.make_url("")).rstrip("/"), name="local"),), session)


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "dialog.db")
    store.open()
    yield store
    store.close()


def _dialog(chat, store, words=(), **config):
    return Dialog(chat, store, DialogConfig(max_tokens=6, **config), WordFilter(list(words)))


async def test_memory_keeps_recent_turns_within_the_token_budget(chat, store):
    dialog = _dialog(chat, store, memory_turns=5)
    for i in range(4):
        await dialog.answer("a", "u", f"问题{i} " + "很长的问题" * 5)
    history = await store.run(_recent_turns, store.vault, "a", "u", 0, 10)
    assert len(history) == 8 and history[0]["role"] == "user"
    tokens = sum(estimate_tokens(t["content"]) for t in history)
    tight = _dialog(chat, store, memory_tokens=tokens - 1)  # one token too few: the oldest pair goes
    assert tight._within_budget(history) == history[2:]
    assert _dialog(chat, store, memory_tokens=tokens)._within_budget(history) == history


async def test_rate_limit_per_user(chat, store):
    dialog = _dialog(chat, store, rate_per_minute=2)
    answers = [await dialog.answer("a", "fast", "你好") for _ in range(3)]
    assert answers[2] == dialog.config.rate_limited_reply and answers[0] != answers[2]
    assert await dialog.answer("a", "other", "你好") != dialog.config.rate_limited_reply


async def test_reasoning_toggle(chat, store):
    dialog = _dialog(chat, store)
    assert "思考" in await dialog.answer("a", "r", "#显示思考")
    assert (await dialog.answer("a", "r", "你好")).startswith("【思考】")
    await dialog.answer("a", "r", "#隐藏思考")
    assert not (await dialog.answer("a", "r", "你好")).startswith("【思考】")


async def test_blocked_words_are_refused_before_the_model(chat, store, model):
    dialog = _dialog(chat, store, words=["违禁词"])
    before = model.app[CHAT].engine.stats()["requests"]
    assert await dialog.answer("a", "b", "这里有个违禁词") == dialog.config.blocked_reply
    assert model.app[CHAT].engine.stats()["requests"] == before and dialog.filter_hits["in"] == 1
    rows = await store.run(lambda db: list(db["audit_log"].rows))
    assert [(r["operation"], r["user_id"][:2]) for r in rows] == [("filter_hit", "u-")]
    assert json.loads(rows[0]["details"]) == {"direction": "in", "words": ["违禁词"]}


def test_matching_ignores_width_and_case():
    f = WordFilter(["ABC", "违禁"])
    assert f.hits("xｘ ＡＢｃ y") == ["abc"] and f.hits("违　禁") == [] and f.hits("含违禁内容") == ["违禁"]
    assert f.mask("含违禁内容") == "含＊＊内容"


def test_lists_reload_when_the_file_changes(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# comment\n甲\n", encoding="utf-8")
    f = WordFilter.from_files([str(words)])
    assert f.hits("甲乙") == ["甲"] and not f.reload_if_changed()
    words.write_text("乙\n", encoding="utf-8")
    os.utime(words, (time.time() + 5, time.time() + 5))
    assert f.reload_if_changed() and f.hits("甲乙") == ["乙"]
    words.write_bytes(b"\xff\xfe")  # broken: the old list stays
    os.utime(words, (time.time() + 10, time.time() + 10))
    assert not f.reload_if_changed() and f.hits("甲乙") == ["乙"]


async def test_each_account_has_its_own_system_prompt(chat, store):
    seen = []

    class Recording:  # the real backends, with the prompts they are asked for kept
        def complete(self, messages, max_tokens):
            seen.append(messages[0])
            return chat.complete(messages, max_tokens)

    dialog = Dialog(Recording(), store, DialogConfig(max_tokens=2, system_prompt="总行"), WordFilter([]),
                    {"wx-a": "甲网点", "wx-b": ""})
    for account in ("wx-a", "wx-b", "wx-c"):
        await dialog.answer(account, "u", "你好")
    assert [m["content"] for m in seen] == ["甲网点", "总行", "总行"]
