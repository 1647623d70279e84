"""WeChat and WeCom callbacks on the real app (tiny model, real SQLite file): verification, the three encryption
modes, exactly-once answers under the platform's retries, the deadline with pull delivery, recovery after a
restart, and forged or malformed requests answered with a 4xx."""

import asyncio
import base64
import time

import pytest

from appliance.app_keys import CHAT, STORE, WECHAT
from appliance.config import load_config
from appliance.wechat.envelope import Account, reply_xml, sha1_signature, split_utf8
from appliance.wechat.sim import Platform, event_message, text_message
from tests.conftest import write_config

TOKEN = "AAAAA"
KEY = base64.b64encode(bytes(range(32))).decode().rstrip("=")
OLD_KEY = base64.b64encode(bytes(range(1, 33))).decode().rstrip("=")
APP_ID = "wx1234567890abcdef"
MP = Account("mp", APP_ID, TOKEN, KEY)


@pytest.fixture
def config_file(tiny_fp32, tmp_path, monkeypatch):
    monkeypatch.setenv("R1BOX_WECHAT_TOKEN", TOKEN)
    monkeypatch.setenv("R1BOX_WECHAT_ENCODING_AES_KEY", KEY)
    monkeypatch.setenv("R1BOX_WECHAT_PREVIOUS_ENCODING_AES_KEY", OLD_KEY)
    monkeypatch.setenv("R1BOX_WECOM_TOKEN", TOKEN)
    monkeypatch.setenv("R1BOX_WECOM_ENCODING_AES_KEY", KEY)
    # a think budget of 4 makes the tiny random model close its think block and say something
    path = write_config(tmp_path, tiny_fp32,
                        '[engine]\nmax_batch = 4\nmax_length = 256\nthink_budget = 4\n'
                        f'[wechat]\napp_id = "{APP_ID}"\nmode = "compat"\ndeadline_s = 4.5\n'
                        '[wecom]\ncorp_id = "ww0011223344"\nagent_id = "1000002"\n'
                        '[dialog]\nmax_tokens = 12\n')
    return path


@pytest.fixture
async def client(start_box, config_file):
    return await start_box(load_config(config_file))


async def _send(client, platform, xml, path="/wechat", **kwargs):
    request = platform.message(xml, **kwargs)
    resp = await client.post(f"{path}?{request.query}", data=request.body)
    text = await resp.text()
    return resp.status, (platform.read_reply(text) if resp.status == 200 else text)


async def test_url_verification_echoes_exactly(client):
    platform = Platform(MP)
    resp = await client.get(f"/wechat?{platform.url_check('1234567890abc')}")
    assert resp.status == 200 and await resp.read() == b"1234567890abc"
    bad = platform.url_check("x").replace("signature=", "signature=0")
    assert (await client.get(f"/wechat?{bad}")).status == 403
    assert (await client.get("/wechat?echostr=x")).status == 403


def test_official_example_signature():
    # the platform's documented example: Token AAAAA, timestamp 1714037059, nonce 486452656
    assert sha1_signature("AAAAA", "1714037059", "486452656") == "899cf89e464efb63f54ddac96b0a0a235f53aa78"


def test_reply_text_cannot_break_the_xml():
    from xml.etree import ElementTree

    class Msg:
        source, target = "user", "app"

    text = "a ]]> b <c> & d 🙂"
    assert ElementTree.fromstring(reply_xml(Msg, text)).findtext("Content") == text


@pytest.mark.parametrize("text, pieces", [("a" * 2048, 1), ("a" * 2049, 2), ("a" * 2047 + "长", 2),
                                          ("🙂" * 512, 1), ("🙂" * 513, 2)])
def test_replies_split_at_2048_utf8_bytes_without_cutting_a_character(text, pieces):
    parts = split_utf8(text)
    assert len(parts) == pieces and "".join(parts) == text
    assert all(len(p.encode()) <= 2048 for p in parts)


async def test_wecom_url_verification_decrypts_echostr_with_plus_and_slash(client):
    platform = Platform(Account("wecom", "ww0011223344", TOKEN, KEY))
    for echo in ("plain-echo", "a+b/c=d" * 5):
        resp = await client.get(f"/wecom?{platform.url_check(echo)}")
        assert resp.status == 200 and await resp.text() == echo


@pytest.mark.parametrize("mode", ["plain", "compat", "safe"])
async def test_text_message_answered_passively_in_each_mode(client, mode):
    platform = Platform(MP, mode)
    status, answer = await _send(client, platform, text_message(APP_ID, f"user-{mode}", "你好", 1000))
    assert status == 200 and answer  # encrypted modes were decrypted by the simulator: the reply was encrypted


async def test_wecom_message_is_answered_encrypted(client):
    platform = Platform(Account("wecom", "ww0011223344", TOKEN, KEY))
    status, answer = await _send(client, platform, text_message("ww0011223344", "zhangsan", "在吗", 7), "/wecom")
    assert status == 200 and answer


async def test_three_deliveries_of_one_message_make_one_model_call(client):
    platform = Platform(MP)
    xml = text_message(APP_ID, "dup-user", "你们几点开门？", 424242)
    before = client.model.app[CHAT].engine.stats()["requests"]
    results = await asyncio.gather(*(_send(client, platform, xml) for _ in range(3)))
    assert [s for s, _ in results] == [200, 200, 200]
    answers = [a for _, a in results if a]
    assert len(answers) == 1  # one passive answer, the others "success"
    assert client.model.app[CHAT].engine.stats()["requests"] - before == 1
    # and a fourth delivery after the fact gets nothing new either
    assert (await _send(client, platform, xml))[1] is None
    # the same MsgId from another user is another message
    assert (await _send(client, platform, text_message(APP_ID, "other-user", "你好", 424242)))[1]


async def test_late_answer_is_kept_and_handed_out_on_the_next_message(client):
    service = client.app[WECHAT]
    service.deadline_s = 0.0  # no answer can be that fast
    platform = Platform(MP)
    started = time.monotonic()
    status, answer = await _send(client, platform, text_message(APP_ID, "slow-user", "讲个故事", 1))
    assert status == 200 and answer is None and time.monotonic() - started < 2
    for _ in range(100):  # the answer finishes in the background
        if not service._answering:
            break
        await asyncio.sleep(0.05)
    status, answer = await _send(client, platform, text_message(APP_ID, "slow-user", "还有问题", 2))
    assert answer and "回答生成中" in answer  # the kept answer, then a note that this one is on its way
    user = client.app[STORE].vault.user_hash(APP_ID, "slow-user")
    rows = await client.app[STORE].run(lambda db: list(db["inbound"].rows_where("user = ?", [user], order_by="id")))
    assert [(r["status"], r["delivery"]) for r in rows][0] == ("delivered", "pull")


async def test_restart_answers_what_was_received_but_not_answered(start_box, config_file):
    config = load_config(config_file)
    first = await start_box(config)
    # a row as a release before encryption wrote it: sealed at the next start, then answered
    await first.app[STORE].run(lambda db: db["inbound"].insert(
        {"account": APP_ID, "dedup_key": f"{APP_ID}:crash-user:msg:9", "user": "crash-user", "kind": "text",
         "content": "断电前的问题", "created_at": int(time.time()), "received_at": time.time(),
         "status": "received"}))
    await first.close()
    second = await start_box(config)
    for _ in range(100):
        if not second.app[WECHAT]._answering:
            break
        await asyncio.sleep(0.05)
    status, answer = await _send(second, Platform(MP), text_message(APP_ID, "crash-user", "在吗", 10))
    assert status == 200 and answer and "回答生成中" in answer


async def test_reset_command_and_unsubscribe_clear_the_memory(client):
    platform = Platform(MP)
    await _send(client, platform, text_message(APP_ID, "mem-user", "记住我叫小王", 1))
    user = client.app[STORE].vault.user_hash(APP_ID, "mem-user")
    count = lambda db: db.execute("SELECT count(*) FROM turns WHERE user = ?", [user]).fetchone()[0]  # noqa: E731
    assert await client.app[STORE].run(count) == 2
    assert (await _send(client, platform, text_message(APP_ID, "mem-user", "#清除记忆", 2)))[1] == "好的，之前的对话已清除。"
    assert await client.app[STORE].run(count) == 0
    await _send(client, platform, text_message(APP_ID, "mem-user", "再问一次", 3))
    assert (await _send(client, platform, event_message(APP_ID, "mem-user", "unsubscribe")))[1] is None
    assert await client.app[STORE].run(count) == 0


async def test_other_message_kinds_get_a_text_only_note(client):
    platform = Platform(MP)
    image = (f"<xml><ToUserName><![CDATA[{APP_ID}]]></ToUserName><FromUserName><![CDATA[pic-user]]></FromUserName>"
             f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[image]]></MsgType>"
             "<PicUrl><![CDATA[http://x/y.jpg]]></PicUrl><MediaId><![CDATA[m1]]></MediaId><MsgId>5</MsgId></xml>")
    assert "文字" in (await _send(client, platform, image))[1]
    assert (await _send(client, platform, event_message(APP_ID, "pic-user", "subscribe", key="qrscene_7")))[1]


async def test_previous_aes_key_still_decrypts(client):
    platform = Platform(Account("mp", APP_ID, TOKEN, OLD_KEY), "safe")
    request = platform.message(text_message(APP_ID, "rotating-user", "你好", 77))
    resp = await client.post(f"/wechat?{request.query}", data=request.body)
    assert resp.status == 200  # answered with the current key, which the platform also knows after rotation


@pytest.mark.parametrize("tamper, status", [
    (lambda q, b: (q.replace("msg_signature=", "msg_signature=0"), b), 403),
    (lambda q, b: (q, b.replace(b"<Encrypt><![CDATA[", b"<Encrypt><![CDATA[AAAA")), 403),
    (lambda q, b: (q, b.split(b"<Encrypt>")[0] + b"</xml>"), 400),
    (lambda q, b: (q.replace("signature=", "signature=1", 1), b), 403),
    (lambda q, b: ("&".join(p for p in q.split("&") if not p.startswith("nonce=")), b), 403),
])
async def test_forged_or_broken_encrypted_requests_get_a_4xx(client, tamper, status):
    request = Platform(MP, "safe").message(text_message(APP_ID, "u", "hi", 1))
    query, body = tamper(request.query, request.body)
    resp = await client.post(f"/wechat?{query}", data=body)
    assert resp.status == status


async def test_wrong_app_id_is_refused(client):
    other = Platform(Account("mp", "wx-someone-else", TOKEN, KEY), "safe")
    request = other.message(text_message("wx-someone-else", "u", "hi", 1))
    assert (await client.post(f"/wechat?{request.query}", data=request.body)).status == 403


@pytest.mark.parametrize("body, status", [
    (b"<xml><MsgType>text", 400),
    (b"not xml at all", 400),
    ('<!DOCTYPE x [<!ENTITY a "b">]><xml><Content>&a;</Content></xml>'.encode(), 400),
    (b"\xff\xfe", 400),
    (b"<xml>" + b"x" * (70 << 10) + b"</xml>", 413),
])
async def test_malformed_plain_bodies_get_a_4xx(client, body, status):
    request = Platform(MP).message("<xml/>")
    assert (await client.post(f"/wechat?{request.query}", data=body)).status == status


async def test_stale_timestamp_and_replayed_nonce_are_refused(client):
    platform = Platform(MP)
    old = platform.message(text_message(APP_ID, "u", "hi", 1), timestamp=int(time.time()) - 3600)
    assert (await client.post(f"/wechat?{old.query}", data=old.body)).status == 403
    first = platform.message(text_message(APP_ID, "u2", "hi", 2), nonce="1234")
    assert (await client.post(f"/wechat?{first.query}", data=first.body)).status == 200
    forged = Platform(MP, "safe").message(text_message(APP_ID, "u2", "hi", 3), nonce="1234",
                                          timestamp=int(first.query.split("timestamp=")[1].split("&")[0]))
    assert (await client.post(f"/wechat?{forged.query}", data=forged.body)).status == 403


async def test_the_configured_mode_is_enforced(start_box, config_file):
    strict = config_file.read_text().replace('mode = "compat"', 'mode = "safe"')
    config_file.write_text(strict)
    client = await start_box(load_config(config_file))
    plain = Platform(MP).message(text_message(APP_ID, "mode-user", "hi", 1))
    assert (await client.post(f"/wechat?{plain.query}", data=plain.body)).status == 403
    assert (await _send(client, Platform(MP, "safe"), text_message(APP_ID, "mode-user", "hi", 2)))[0] == 200


async def test_continue_hands_out_what_is_kept_without_a_model_call(client):
    service = client.app[WECHAT]
    service.deadline_s = 0.0
    platform = Platform(MP)
    await _send(client, platform, text_message(APP_ID, "cont-user", "讲个故事", 1))
    for _ in range(100):
        if not service._answering:
            break
        await asyncio.sleep(0.05)
    before = client.model.app[CHAT].engine.stats()["requests"]
    status, answer = await _send(client, platform, text_message(APP_ID, "cont-user", "继续", 2))
    assert answer and "回答生成中" not in answer
    assert (await _send(client, platform, text_message(APP_ID, "cont-user", "继续", 3)))[1] == "没有更多内容了，请直接提问。"
    assert client.model.app[CHAT].engine.stats()["requests"] == before


async def test_menu_click_and_welcome(client):
    platform = Platform(MP)
    click = event_message(APP_ID, "menu-user", "CLICK", key="#帮助")
    assert "继续" in (await _send(client, platform, click))[1]
    welcome = (await _send(client, platform, event_message(APP_ID, "menu-user", "subscribe")))[1]
    assert welcome.startswith("您好")


async def test_events_are_deduplicated_by_sender_and_create_time(client):
    platform = Platform(MP)
    created = int(time.time())
    first = await _send(client, platform, event_message(APP_ID, "ev-user", "subscribe", created=created))
    again = await _send(client, platform, event_message(APP_ID, "ev-user", "subscribe", created=created))
    assert first[1] and again[1] is None
    assert (await _send(client, platform, event_message(APP_ID, "ev-user2", "subscribe", created=created)))[1]


def _xml(user, kind, body, msg_id=None):
    ident = f"<MsgId>{msg_id}</MsgId>" if msg_id else ""
    return (f"<xml><ToUserName><![CDATA[{APP_ID}]]></ToUserName><FromUserName><![CDATA[{user}]]></FromUserName>"
            f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[{kind}]]></MsgType>{body}{ident}</xml>")


@pytest.mark.parametrize("kind, body, expect", [
    ("voice", "<MediaId><![CDATA[m]]></MediaId><Format><![CDATA[amr]]></Format>"
              "<Recognition><![CDATA[你们几点开门]]></Recognition>", "model"),
    ("voice", "<MediaId><![CDATA[m]]></MediaId><Format><![CDATA[amr]]></Format><Recognition><![CDATA[]]></Recognition>",
     "语音"),
    ("voice", "<MediaId><![CDATA[m]]></MediaId><Format><![CDATA[amr]]></Format>", "语音"),
    ("video", "<MediaId><![CDATA[m]]></MediaId><ThumbMediaId><![CDATA[t]]></ThumbMediaId>", "文字"),
    ("shortvideo", "<MediaId><![CDATA[m]]></MediaId><ThumbMediaId><![CDATA[t]]></ThumbMediaId>", "文字"),
    ("location", "<Location_X>23.1</Location_X><Location_Y>113.3</Location_Y><Scale>20</Scale>"
                 "<Label><![CDATA[x]]></Label>", "文字"),
    ("link", "<Title><![CDATA[t]]></Title><Description><![CDATA[d]]></Description><Url><![CDATA[http://x]]></Url>",
     "文字"),
    ("miniprogrampage", "<Title><![CDATA[t]]></Title>", "文字"),
])
async def test_every_message_kind_gets_an_answer(client, kind, body, expect):
    before = client.model.app[CHAT].engine.stats()["requests"]
    status, answer = await _send(client, Platform(MP), _xml(f"kind-{kind}", kind, body, 99))
    assert status == 200 and answer
    used_model = client.model.app[CHAT].engine.stats()["requests"] > before
    assert used_model if expect == "model" else (expect in answer and not used_model)


@pytest.mark.parametrize("event", ["VIEW", "SCAN", "LOCATION", "TEMPLATESENDJOBFINISH"])
async def test_other_events_are_acknowledged_silently(client, event):
    xml = event_message(APP_ID, "ev-quiet", event, key="x")
    assert await _send(client, Platform(MP), xml) == (200, None)
