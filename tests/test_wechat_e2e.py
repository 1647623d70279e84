"""End to end on the real 0.5B model: the real server, real crypto, the real SQLite file and a local fake of the
platform's API. One message delivered three times, with a restart between the second and third delivery, is
answered exactly once; a slow answer arrives by push; a network cut delays it and loses nothing."""

import asyncio
import base64
import time

import pytest

from appliance.app_keys import CHAT, WECHAT
from appliance.config import load_config
from appliance.wechat.envelope import Account
from appliance.wechat.sim import Platform, text_message
from tests.conftest import free_port, write_config
from tests.model_process import ModelProcess

pytestmark = pytest.mark.slow

TOKEN = "e2e-token"
KEY = base64.b64encode(bytes(range(100, 132))).decode().rstrip("=")
APP_ID = "wx-e2e"
SAFE = Platform(Account("mp", APP_ID, TOKEN, KEY), "safe")


@pytest.fixture(scope="module")
def artifact():
    from export.artifacts import cached_artifact

    return cached_artifact("qwen2.5-coder-0.5b-instruct")


@pytest.fixture
def config(artifact, tmp_path, monkeypatch, api):
    monkeypatch.setenv("R1BOX_WECHAT_TOKEN", TOKEN)
    monkeypatch.setenv("R1BOX_WECHAT_ENCODING_AES_KEY", KEY)
    monkeypatch.setenv("R1BOX_WECHAT_APP_SECRET", "e2e-secret")
    path = write_config(tmp_path, artifact, f'[engine]\nmax_batch = 4\nmax_length = 1024\n'
                        f'[wechat]\napp_id = "{APP_ID}"\ndelivery = "push"\n'
                        f'api_base_url = "http://127.0.0.1:{api.server.port}"\n[dialog]\nmax_tokens = 48\n', threads=None)
    return load_config(path)


async def _deliver(client, request):
    resp = await client.post(f"/wechat?{request.query}", data=request.body)
    assert resp.status == 200
    return SAFE.read_reply(await resp.text())


async def _until(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.1)
    return False


async def test_three_deliveries_across_a_restart_give_one_answer(start_box, config, api):
    request = SAFE.message(text_message(APP_ID, "e2e-user", "一句话介绍一下长城。", 880001))
    first = await start_box(config)
    replies = [await _deliver(first, request), await _deliver(first, request)]  # the platform's retry
    calls = first.model.app[CHAT].engine.stats()["requests"]
    await _until(lambda: not first.app[WECHAT]._answering)
    await first.close()
    second = await start_box(config)  # r1box serve restarted before the third delivery (its model process did not)
    replies.append(await _deliver(second, request))
    await _until(lambda: not second.app[WECHAT]._answering, 30)
    await asyncio.sleep(1.0)  # a push, if one were wrongly made, would be out by now
    answers = [r for r in replies if r] + [s["text"]["content"] for s in api.sent if s["touser"] == "e2e-user"]
    assert len(answers) == 1 and "长城" in answers[0]
    assert calls == 1 and second.model.app[CHAT].engine.stats()["requests"] == 1  # the model was asked once in all


async def test_a_slow_answer_arrives_by_push_and_survives_a_network_cut(start_box, config, api):
    client = await start_box(config)
    client.app[WECHAT].deadline_s = 0.5  # this model needs longer than that
    client.app[WECHAT].outbox.max_backoff_s = 0.5
    port = api.server.port
    await api.server.close()  # the office's internet is down
    reply = await _deliver(client, SAFE.message(text_message(APP_ID, "push-user", "写一个Python函数，计算两个数的和。",
                                                             880002)))
    assert reply is None
    assert await _until(lambda: client.app[WECHAT].outbox.results.get(-1, 0) >= 1)
    from aiohttp.test_utils import TestServer

    api.server = TestServer(api.app, port=port)
    await api.server.start_server()  # and back
    assert await _until(lambda: any(s["touser"] == "push-user" for s in api.sent))
    assert "def" in api.sent[0]["text"]["content"]


def test_the_readme_trial_config_answers_in_every_mode(tmp_path):
    import json
    import os
    import re
    import signal
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"<!-- trial-config -->\s*```toml\n(.*?)```", readme, re.S).group(1)
    port, model_port = free_port(), free_port()
    config = tmp_path / "trial.toml"
    # the README's block as it is; the test adds free ports, and a short answer so it fits the 5-second reply
    config.write_text(block + f"\n[server]\nport = {port}\n[model_server]\nport = {model_port}\n[metrics]\nport = 0\n"
                      "[admin]\nport = 0\n[dialog]\nmax_tokens = 64\n")
    env = dict(os.environ, R1BOX_DATA=str(tmp_path))
    cli = [sys.executable, "-m", "appliance.cli"]
    model = ModelProcess(config, model_port, env).start()
    server = subprocess.Popen(cli + ["serve", "--config", str(config)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                    if json.load(resp)["status"] == "ok":
                        break
            except OSError:
                assert server.poll() is None, server.stdout.read()
            time.sleep(0.2)
        for mode in ("plain", "compat", "safe"):
            sim = subprocess.run(cli + ["wechat-sim", "一加一等于几？", "--config", str(config), "--mode", mode],
                                 env=env, capture_output=True, text=True, timeout=60)
            assert sim.returncode == 0, sim.stderr
            assert sim.stdout.strip() and "success" not in sim.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
        model.stop()
