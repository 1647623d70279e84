"""Push delivery through the customer-service API against a local fake of the platform: late answers pushed once,
a refused token refreshed once, a network cut waited out, refusals turned into pull, the per-user quota kept."""

import asyncio
import base64
import time

import pytest

from appliance.app_keys import STORE, WECHAT
from appliance.config import load_config
from appliance.store.database import Store
from appliance.wechat.envelope import Account
from appliance.wechat.outbox import MORE, _enqueue
from appliance.wechat.sim import Platform, text_message
from tests.conftest import write_config

TOKEN = "AAAAA"
KEY = base64.b64encode(bytes(range(32))).decode().rstrip("=")
APP_ID = "wx-push-account"
PLATFORM = Platform(Account("mp", APP_ID, TOKEN, KEY))


@pytest.fixture
def config_file(tiny_fp32, tmp_path, monkeypatch, api):
    monkeypatch.setenv("R1BOX_WECHAT_TOKEN", TOKEN)
    monkeypatch.setenv("R1BOX_WECHAT_APP_SECRET", "app-secret-for-tests")
    path = write_config(tmp_path, tiny_fp32,
                        '[engine]\nmax_batch = 4\nmax_length = 256\nthink_budget = 4\n'
                        f'[wechat]\napp_id = "{APP_ID}"\nmode = "plain"\ndelivery = "push"\n'
                        f'api_base_url = "http://127.0.0.1:{api.server.port}"\n'
                        '[dialog]\nmax_tokens = 12\n')
    return path


async def _late_message(client, user: str, msg_id: int):
    client.app[WECHAT].deadline_s = 0.0  # every answer is late, deterministically
    request = PLATFORM.message(text_message(APP_ID, user, "你好", msg_id))
    resp = await client.post(f"/wechat?{request.query}", data=request.body)
    assert resp.status == 200 and await resp.text() == "success"


async def _until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(0.05)
    return False


async def _inbound(client, user):
    user = client.app[STORE].vault.user_hash(APP_ID, user)
    return await client.app[STORE].run(lambda db: list(db["inbound"].rows_where("user = ?", [user])))


async def test_late_answer_is_pushed_once(start_box, config_file, api):
    client = await start_box(load_config(config_file))
    await _late_message(client, "push-user", 1)
    assert await _until(lambda: _sent_to(api, "push-user"))
    await asyncio.sleep(0.3)
    assert len([s for s in api.sent if s["touser"] == "push-user"]) == 1
    row = (await _inbound(client, "push-user"))[0]
    assert (row["status"], row["delivery"]) == ("delivered", "push")
    assert api.typing == [{"touser": "push-user", "command": "Typing"}]  # shown while the answer was made
    vault = client.app[STORE].vault
    assert api.sent[0]["text"]["content"] == vault.unseal(row["answer"], "inbound", "answer", row["dedup_key"])


async def _sent_to(api, user):
    return any(s["touser"] == user for s in api.sent)


async def test_a_refused_token_is_refreshed_once(start_box, config_file, api):
    client = await start_box(load_config(config_file))
    api.send_errors = [40001]
    await _late_message(client, "token-user", 2)
    assert await _until(lambda: _sent_to(api, "token-user"))
    assert api.tokens_issued == 2  # the first token, and one refresh


async def test_network_cut_is_waited_out_and_nothing_is_lost(start_box, config_file, api):
    client = await start_box(config_file)
    port = api.server.port
    await api.server.close()  # the network is down
    outbox = client.app[WECHAT].outbox
    outbox.max_backoff_s = 0.2
    await _late_message(client, "cut-user", 3)
    assert await _until(lambda: _attempted(client))
    assert (await outbox.pending())[0] == 1
    api.server = await _restart(api, port)  # the network is back
    assert await _until(lambda: _sent_to(api, "cut-user"))
    assert (await outbox.pending())[0] == 0


async def _attempted(client):
    return await client.app[STORE].run(lambda db: db.execute(
        "SELECT count(*) FROM outbox WHERE attempts > 0").fetchone()[0] > 0)


async def _restart(api, port):
    from aiohttp.test_utils import TestServer

    server = TestServer(api.app, port=port)
    await server.start_server()
    return server


@pytest.mark.parametrize("code, alert", [(45015, False), (45047, False), (45002, False), (48001, True)])
async def test_refusals_turn_into_pull(start_box, config_file, api, code, alert):
    client = await start_box(load_config(config_file))
    api.send_errors = [code]
    await _late_message(client, f"refused-{code}", 4)
    # the push was tried and refused (an outbox row back in "pull"), not merely answered before the push began
    assert await _until(lambda: _outbox_status(client, f"refused-{code}", "pull"))
    assert await _status(client, f"refused-{code}", "answered")
    assert bool(client.app[WECHAT].outbox.alerts) == alert
    client.app[WECHAT].deadline_s = 4.5
    request = PLATFORM.message(text_message(APP_ID, f"refused-{code}", "还在吗", 5))
    reply = PLATFORM.read_reply(await (await client.post(f"/wechat?{request.query}", data=request.body)).text())
    assert reply and "回答生成中" in reply


async def _outbox_status(client, user, status):
    user = client.app[STORE].vault.user_hash(APP_ID, user)
    rows = await client.app[STORE].run(lambda db: list(db["outbox"].rows_where("user = ?", [user])))
    return bool(rows) and all(r["status"] == status for r in rows)


async def _status(client, user, status):
    rows = await _inbound(client, user)
    return bool(rows) and rows[0]["status"] == status


async def test_the_user_quota_is_kept_and_the_rest_waits_for_a_pull(tmp_path):
    store = Store(tmp_path / "quota.db")
    store.open()
    now = time.time()
    long_answer = "长" * (682 * 7)  # seven pieces of 2046 bytes
    vault = store.vault
    await store.run(lambda db: db["inbound"].insert({"account": "a", "dedup_key": "k", "user": vault.user_hash("a", "u"),
                                                     "kind": "text", "received_at": now, "status": "pushing",
                                                     "key_id": vault.current}))
    await store.run(_enqueue, vault, "a", "u", "k", long_answer, now)
    rows = await store.run(lambda db: list(db["outbox"].rows_where("user = ?", [vault.user_hash("a", "u")],
                                                                   order_by="id")))
    pieces = [vault.unseal(r["content"], "outbox", "content", r["id"]) for r in rows]
    assert len(pieces) == 5 and pieces[-1].endswith(MORE)
    assert all(len(p.encode()) <= 2048 for p in pieces)
    inbound = await store.run(lambda db: db["inbound"].get(1))
    assert inbound["status"] == "answered"
    rest = vault.unseal(inbound["answer"], "inbound", "answer", "k")
    assert "".join(p.removesuffix(MORE) for p in pieces) + rest == long_answer
    store.close()


async def _pushed_through(start_box, config_file, api, user: str, errors: list[int]):
    """A late answer whose first sends the platform refuses with `errors`; returns the outbox once it went out."""
    client = await start_box(load_config(config_file))
    outbox = client.app[WECHAT].outbox
    outbox.max_backoff_s = 0.2
    api.send_errors = list(errors)
    await _late_message(client, user, 6)
    assert await _until(lambda: _sent_to(api, user))
    return outbox


async def test_ip_not_whitelisted_raises_an_alert_and_keeps_trying(start_box, config_file, api):
    outbox = await _pushed_through(start_box, config_file, api, "ip-user", [40164, 40164])
    assert [a["code"] for a in outbox.alerts] == [40164, 40164] and "whitelist" in outbox.alerts[0]["message"]
    assert outbox.results[40164] == 2 and outbox.results[0] == 1


async def test_concurrent_callers_share_one_token_refresh(tmp_path, api):
    import aiohttp

    from appliance.wechat.client import Credentials, TokenManager, WeChatClient

    store = Store(tmp_path / "t.db")
    store.open()
    async with aiohttp.ClientSession() as session:
        manager = TokenManager(WeChatClient(session, f"http://127.0.0.1:{api.server.port}"),
                               Credentials("mp", "wx", "secret"), store)
        tokens = await asyncio.gather(*(manager.token() for _ in range(10)))
        assert set(tokens) == {"token-1"} and api.tokens_issued == 1
        again = TokenManager(manager.client, manager.creds, store)  # a restart: the stored token is reused
        assert await again.token() == "token-1" and api.tokens_issued == 1
    store.close()


async def test_a_failed_token_fetch_fails_its_waiters_at_once(tmp_path):
    """A cut network: the platform's API takes connections and never answers. Ten callers waiting for a token make
    one attempt between them, not ten timeouts in a row."""
    import aiohttp

    from appliance.wechat.client import ApiError, Credentials, TokenManager, WeChatClient

    attempts = []

    async def silent(reader, writer):
        attempts.append(1)
        await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = Store(tmp_path / "t.db")
    store.open()
    async with aiohttp.ClientSession() as session:
        manager = TokenManager(WeChatClient(session, f"http://127.0.0.1:{port}", timeout_s=0.5),
                               Credentials("mp", "wx", "secret"), store)
        results = await asyncio.gather(*(manager.token() for _ in range(10)), return_exceptions=True)
    assert all(isinstance(r, ApiError) for r in results) and len(attempts) == 1
    server.close()
    store.close()


def test_short_lived_stable_tokens_are_refreshed_early():
    from appliance.wechat.client import _refresh_at

    assert _refresh_at(0, 7200) == 7200 - 300
    assert _refresh_at(0, 345) == 345 - 69  # a fifth of its life, not 300 s of 345


async def test_wecom_members_get_at_most_30_messages_a_minute(tmp_path):
    from appliance.wechat.outbox import _member_wait

    store = Store(tmp_path / "cap.db")
    store.open()
    now = time.time()
    await store.run(lambda db: db["outbox"].insert_all(
        {"account": "ww", "user": "m", "content": "x", "created_at": now - 50, "status": "sent",
         "sent_at": now - 50 + i} for i in range(30)))
    wait = await store.run(_member_wait, "ww", "m", now)
    assert 9 < wait <= 10  # the oldest of the 30 leaves the minute in ten seconds
    assert await store.run(_member_wait, "ww", "other", now) == 0.0
    store.close()


async def test_rate_limits_are_waited_out(start_box, config_file, api):
    outbox = await _pushed_through(start_box, config_file, api, "quota-user", [45009, 45011])
    assert outbox.results[45009] == outbox.results[45011] == 1


async def test_wecom_late_answers_are_pushed_with_the_agent_id(start_box, tiny_fp32, tmp_path, monkeypatch, api):
    monkeypatch.setenv("R1BOX_WECOM_TOKEN", TOKEN)
    monkeypatch.setenv("R1BOX_WECOM_ENCODING_AES_KEY", KEY)
    monkeypatch.setenv("R1BOX_WECOM_CORP_SECRET", "corp-secret")
    path = write_config(tmp_path, tiny_fp32, f'[engine]\nmax_length = 256\nthink_budget = 4\n'
                        '[wecom]\ncorp_id = "ww-push"\nagent_id = "1000002"\n'
                        f'api_base_url = "http://127.0.0.1:{api.server.port}"\n[dialog]\nmax_tokens = 12\n')
    client = await start_box(load_config(path))
    client.app[WECHAT].deadline_s = 0.0
    wecom = Platform(Account("wecom", "ww-push", TOKEN, KEY))
    request = wecom.message(text_message("ww-push", "zhangsan", "你好", 9))
    resp = await client.post(f"/wecom?{request.query}", data=request.body)
    assert resp.status == 200 and await resp.text() == "success"
    assert await _until(lambda: _sent_to(api, "zhangsan"))
    sent = next(s for s in api.sent if s["touser"] == "zhangsan")
    assert sent["agentid"] == 1000002 and sent["msgtype"] == "text" and sent["text"]["content"]
    assert api.typing == []  # WeCom has no typing indicator
