"""The model process dies and nobody notices but the log: `r1box model` on the real 0.5B, killed with SIGKILL while
ten WeChat users wait and restarted as systemd restarts it; `r1box serve` (the real app, the real store) re-asks
what was unfinished and every user gets exactly one answer. And with two model processes as two backends, the
first killed mid-answer: the answer comes whole from the second, and the time from the kill to its first token is
printed."""

import asyncio
import base64
import time

import aiohttp
import pytest

from appliance.app import create_app
from appliance.app_keys import BACKENDS, WECHAT
from appliance.backends.pool import Backends
from appliance.config import BackendConfig, load_config
from appliance.wechat.envelope import Account
from appliance.wechat.sim import Platform, text_message
from tests.conftest import free_port, write_config
from tests.model_process import ModelProcess

pytestmark = pytest.mark.slow

TOKEN, APP_ID = "crash-token", "wx-crash"
KEY = base64.b64encode(bytes(range(7, 39))).decode().rstrip("=")
PLATFORM = Platform(Account("mp", APP_ID, TOKEN, KEY), "safe")


@pytest.fixture(scope="module")
def artifact():
    from export.artifacts import cached_artifact

    return cached_artifact("qwen2.5-coder-0.5b-instruct")


async def _until(condition, seconds: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(every)
    return False


async def test_ten_users_each_get_one_answer_across_a_sigkill_of_the_model(aiohttp_client, artifact, tmp_path,
                                                                            monkeypatch, api):
    monkeypatch.setenv("R1BOX_WECHAT_TOKEN", TOKEN)
    monkeypatch.setenv("R1BOX_WECHAT_ENCODING_AES_KEY", KEY)
    monkeypatch.setenv("R1BOX_WECHAT_APP_SECRET", "crash-secret")
    path = write_config(tmp_path, artifact, '[engine]\nmax_batch = 4\nmax_length = 1024\n'
                        f'[wechat]\napp_id = "{APP_ID}"\ndelivery = "push"\n'
                        f'api_base_url = "http://127.0.0.1:{api.server.port}"\n'
                        '[dialog]\nmax_tokens = 48\nrate_per_minute = 0\n', threads=None)
    config = load_config(path)
    model = ModelProcess(path, config.model_server.port).start()
    try:
        client = await aiohttp_client(create_app(config))
        users = [f"user-{i}" for i in range(10)]
        requests = [PLATFORM.message(text_message(APP_ID, u, f"用一句话介绍数字{i}。", 5000 + i))
                    for i, u in enumerate(users)]

        async def deliver(request):
            resp = await client.post(f"/wechat?{request.query}", data=request.body)
            assert resp.status == 200
            return PLATFORM.read_reply(await resp.text())

        replies = asyncio.gather(*(deliver(r) for r in requests))
        assert await _until(lambda: model.running() > 0, 60)
        await asyncio.sleep(0.5)  # mid-answer
        model.kill()
        killed = time.monotonic()
        model.start()  # systemd: Restart=always
        restarted = time.monotonic() - killed
        passive = dict(zip(users, await replies))
        service = client.app[WECHAT]
        assert await _until(lambda: not service._answering and not service.dialog.waiting, 240, 0.2)
        assert await _until(lambda: len(api.sent) >= sum(r is None for r in passive.values()), 60, 0.2)
        await asyncio.sleep(1.0)  # a second push, if one were wrongly made, would be out by now
        for user in users:
            pushed = [s["text"]["content"] for s in api.sent if s["touser"] == user]
            answers = ([passive[user]] if passive[user] else []) + pushed
            assert len(answers) == 1 and answers[0].strip(), (user, answers)
        backend = client.app[BACKENDS].states()[0]
        print(f"\nmodel killed mid-answer with {len(users)} users waiting: restarted healthy in {restarted:.1f} s; "
              f"{sum(r is not None for r in passive.values())} answered in time, {len(api.sent)} pushed later; "
              f"backend errors {backend['errors']}")
        assert backend["errors"] >= 1
    finally:
        model.stop()


async def test_the_second_backend_gives_the_whole_answer_when_the_first_dies_mid_stream(artifact, tmp_path):
    path = write_config(tmp_path, artifact, '[engine]\nmax_batch = 2\nmax_length = 1024\n', threads=1)
    first, second = (ModelProcess(path, free_port()).start() for _ in range(2))
    try:
        async with aiohttp.ClientSession() as session:
            backends = Backends((BackendConfig(url=first.url, name="first", priority=0),
                                 BackendConfig(url=second.url, name="second", priority=1)), session)
            question = [{"role": "user", "content": "请列出五种常见的水果，并各用一句话介绍。"}]
            asking = asyncio.create_task(backends.complete(question, 96))
            assert await _until(lambda: first.running() > 0, 60)
            await asyncio.sleep(1.0)  # tokens are streaming from the first
            first.kill()
            killed = time.monotonic()
            completion = await asyncio.wait_for(asking, 120)
            done = time.monotonic()
        second_first_token = done - completion.total_s + completion.first_token_s - killed
        assert completion.backend == "second" and completion.finish_reason in ("stop", "length")
        assert completion.content.strip() and backends.stats["first"].errors == 1
        assert backends.stats["first"].failovers == 1 and backends.states()[0]["state"] == "down"
        print(f"\nfirst backend killed mid-stream: the second's first token {second_first_token * 1000:.0f} ms after "
              f"the kill, its whole answer ({len(completion.content)} chars) {(done - killed):.1f} s after")
    finally:
        first.stop()
        second.stop()
