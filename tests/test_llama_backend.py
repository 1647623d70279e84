"""llama.cpp's server as the box's only backend: the same 0.5B GGUF that r1box exports, served by `llama-server`
(the xllamacpp wheel), asked by the real `r1box serve` app over OpenAI's streaming API with its key and model
name checked; a WeChat message answered end to end through it."""

import asyncio
import base64

import pytest

from appliance.app import create_app
from appliance.app_keys import BACKENDS, WECHAT
from appliance.config import load_config
from appliance.wechat.envelope import Account
from appliance.wechat.sim import Platform, text_message
from tests.llama_server import LlamaServer

pytestmark = pytest.mark.slow

APP_ID, TOKEN = "wx-llama", "llama-token"
KEY = base64.b64encode(bytes(range(90, 122))).decode().rstrip("=")
PLATFORM = Platform(Account("mp", APP_ID, TOKEN, KEY), "safe")
ALIAS = "qwen2.5-coder-0.5b-instruct-q4_k_m"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from export.catalog import lookup
    from export.fetch import fetch

    gguf = fetch(lookup("qwen2.5-coder-0.5b-instruct")).path
    server = LlamaServer(gguf, api_key="llama-test-key", alias=ALIAS,
                         log=tmp_path_factory.mktemp("llama") / "llama-server.log").start()
    yield server
    server.stop()


async def test_a_wechat_message_answered_through_llama_server(aiohttp_client, llama, tmp_path, monkeypatch):
    monkeypatch.setenv("R1BOX_WECHAT_TOKEN", TOKEN)
    monkeypatch.setenv("R1BOX_WECHAT_ENCODING_AES_KEY", KEY)
    monkeypatch.setenv("LLAMA_KEY", "llama-test-key")
    config = tmp_path / "r1box.toml"
    config.write_text(f'[[backends]]\nname = "llama"\nurl = "{llama.url}"\nkey_env = "LLAMA_KEY"\n'
                      f'model = "{ALIAS}"\n[wechat]\napp_id = "{APP_ID}"\n[dialog]\nmax_tokens = 64\n'
                      f'[metrics]\nport = 0\n[admin]\nport = 0\n[store]\npath = "{tmp_path / "r1box.db"}"\n')
    client = await aiohttp_client(create_app(load_config(config)))
    assert (await (await client.get("/healthz")).json())["status"] == "ok"  # probed: key and model name accepted

    async def say(text: str, msg_id: int) -> str | None:
        request = PLATFORM.message(text_message(APP_ID, "llama-user", text, msg_id))
        resp = await client.post(f"/wechat?{request.query}", data=request.body)
        assert resp.status == 200
        return PLATFORM.read_reply(await resp.text())

    reply = await say("用一句话介绍一下长城。", 7001)
    if reply is None:  # later than the platform's 5 s on a slow machine: pulled with the next message
        while client.app[WECHAT]._answering:
            await asyncio.sleep(0.2)
        reply = await say("继续", 7002)
    assert reply and reply.strip() and "success" not in reply  # the engine samples: any whole answer will do
    (state,) = client.app[BACKENDS].states()
    assert state["name"] == "llama" and state["state"] == "up" and state["requests"] == 1 and state["errors"] == 0
    print(f"\nthrough llama-server: first token {state['last_first_token_s'] * 1000:.0f} ms, whole answer "
          f"{state['last_latency_s']:.2f} s: {reply!r}")
