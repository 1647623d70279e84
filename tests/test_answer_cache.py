"""Local cache mode: while no model backend answers, questions close to an operator's approved FAQ entries get
the stored answer at once (marked as such), through the real serve app and store; other questions wait and are
answered by the model once it is back. The matching, the table, and the admin page that keeps the entries."""

import asyncio

from appliance.app import create_app
from appliance.app_keys import BACKENDS, STORE, WECHAT
from appliance.config import load_config
from appliance.dialog import answer_cache
from appliance.dialog.answer_cache import normalize, similarity
from appliance.model.server import create_model_app
from appliance.store.database import open_database
from appliance.wechat.envelope import Account
from appliance.wechat.sim import Platform, text_message
from tests.admin_site import csrf_of, log_in, site  # noqa: F401  (site is a fixture)
from tests.conftest import write_config

APP_ID, TOKEN = "wx-cache", "cache-token"
PLATFORM = Platform(Account("mp", APP_ID, TOKEN, ""), "plain")
HOURS = "工作日九点至十七点营业，周六上午营业，周日休息。"


def test_questions_match_entries_by_their_content():
    assert normalize("营业时间？ ") == normalize("营业时间?") == "营业时间"
    assert normalize("ＡＴＭ 在哪里") == "atm在哪里"
    assert similarity("你们的营业时间是几点", "营业时间是几点") >= 0.6  # particles and a pronoun more
    assert similarity("营业时间", "信用卡年费") == 0.0


def test_the_table_and_its_lookup(tmp_path):
    db = open_database(tmp_path / "r1box.db")
    assert db["answer_cache"].columns_dict == {"id": int, "account": str, "question": str, "normalized": str,
                                               "answer": str, "created_by": str, "created_at": float,
                                               "updated_at": float}
    answer_cache.add(db, "", "营业时间是几点？", HOURS, "operator")
    answer_cache.add(db, "wx-other", "信用卡年费多少？", "首年免年费。", "operator")
    assert answer_cache.lookup(db, APP_ID, "请问你们营业时间是几点", 0.6) == HOURS
    assert answer_cache.lookup(db, APP_ID, "信用卡年费多少？", 0.6) is None  # another account's entry
    assert answer_cache.lookup(db, APP_ID, "怎么开户", 0.6) is None
    assert answer_cache.remove(db, 1) and not answer_cache.remove(db, 1)


async def _ask(client, user: str, text: str, msg_id: int) -> str | None:
    request = PLATFORM.message(text_message(APP_ID, user, text, msg_id))
    resp = await client.post(f"/wechat?{request.query}", data=request.body)
    assert resp.status == 200
    return PLATFORM.read_reply(await resp.text())


async def test_with_no_backend_faqs_are_answered_from_the_store_and_the_rest_waits(aiohttp_client, aiohttp_server,
                                                                                   tiny_fp32, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("R1BOX_WECHAT_TOKEN", TOKEN)
    config = load_config(write_config(tmp_path, tiny_fp32, '[engine]\nmax_length = 256\nthink_budget = 4\n'
                                      f'[wechat]\napp_id = "{APP_ID}"\nmode = "plain"\n'
                                      '[dialog]\nmax_tokens = 4\n'))
    client = await aiohttp_client(create_app(config))  # the model process is down
    assert (await (await client.get("/healthz")).json())["status"] == "degraded"
    await client.app[STORE].run(answer_cache.add, "", "营业时间是几点？", HOURS, "operator")
    reply = await _ask(client, "u1", "你们营业时间是几点", 1)
    assert reply.startswith(HOURS) and "预先审核的常见问题答复" in reply
    assert client.app[WECHAT].dialog.cache_answers == 1
    assert await _ask(client, "u2", "怎么开通手机银行？", 2) is None  # "success": it waits for a backend
    assert client.app[WECHAT].dialog.waiting == 1
    await aiohttp_server(create_model_app(config), port=config.model_server.port)  # the model is back
    backends = client.app[BACKENDS]
    backends.breakers["local"].opened_at -= 60
    for _ in range(100):
        if not client.app[WECHAT]._answering:
            break
        await asyncio.sleep(0.1)
    assert client.app[WECHAT].dialog.waiting == 0
    pulled = await _ask(client, "u2", "继续", 3)  # a pull account: the answer comes with the next message
    assert pulled and pulled != HOURS


async def test_operators_keep_the_entries_on_the_admin_pages(site):
    async with await log_in(site, "operator") as http:
        page = await (await http.post("/answers", data={"question": "营业时间？", "answer": HOURS,
                                                        "account": "", "csrf": await csrf_of(http)})).text()
        assert "Added entry 1." in page and HOURS in page
        page = await (await http.post("/answers", data={"question": "", "answer": "x",
                                                        "csrf": await csrf_of(http)})).text()
        assert "both needed" in page
        page = await (await http.post("/answers/delete", data={"id": "1", "csrf": await csrf_of(http)})).text()
        assert "Deleted entry 1." in page and HOURS not in page
    operations = [r["operation"] for r in await site.audit_rows()]
    assert operations[-2:] == ["answer_cache_added", "answer_cache_deleted"]
