"""The backends of `r1box serve`: a faulty backend first in the list (garbage, a cut stream, a hang, a 5xx, a wrong
key, another model), the real model app on the tiny model second. Each fault is one clear log line and a failover:
the answer comes whole from the model app. Then the breaker (down, trial, up), spill-over when a backend is full,
and a question that waits while no backend is up and is answered once one comes back."""

import asyncio
import json
import logging
import re

import aiohttp
import pytest
from aiohttp import web

from appliance.backends.pool import Backends
from appliance.config import BackendConfig, load_config
from appliance.errors import NoBackend
from appliance.model.server import create_model_app
from tests.admin_site import log_in, site  # noqa: F401  (site is a fixture)
from tests.conftest import free_port, write_config

HELLO = [{"role": "user", "content": "你好"}]


def _chunk(delta: dict, finish=None, model="tiny") -> bytes:
    body = {"object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def faulty_backend(fault: str) -> web.Application:
    """A server that speaks enough of OpenAI's API to be probed healthy, then fails its answer one way."""
    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    async def complete(request):
        if fault == "5xx":
            return web.json_response({"error": {"message": "out of memory"}}, status=500)
        if fault == "wrong key":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        if fault == "hang":
            await asyncio.sleep(30)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if fault == "hang mid-stream":
            await response.write(_chunk({"content": "半个"}))
            await asyncio.sleep(30)
        if fault == "garbage":
            await response.write(b"data: <html>502 Bad Gateway</html>\n\n")
        elif fault == "other model":
            await response.write(_chunk({"content": "hi"}, model="someone-else"))
        elif fault in ("cut", "reset"):
            await response.write(_chunk({"role": "assistant", "content": ""}))
            await response.write(_chunk({"content": "半个"}))  # half an answer that must never reach a user
            if fault == "reset":
                request.transport.abort()
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", complete)
    return app


@pytest.fixture
def model_config(tiny_fp32, tmp_path):
    return load_config(write_config(tmp_path, tiny_fp32, "[engine]\nmax_batch = 2\nmax_length = 256\n"
                                    "think_budget = 4\n"))


@pytest.fixture
async def model(aiohttp_server, model_config):
    return await aiohttp_server(create_model_app(model_config))


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


def _url(server) -> str:
    return str(server.make_url("")).rstrip("/")


@pytest.mark.parametrize("fault, logged", [
    ("garbage", "sent a line that is not JSON"),
    ("cut", "the stream ended before the answer did"),
    ("reset", "the stream broke off before the answer ended"),
    ("hang", "no answer within its timeouts"),
    ("hang mid-stream", "no answer within its timeouts"),
    ("5xx", "answered 500"),
    ("wrong key", "refused our key (401); put a key it accepts in $FAULTY_KEY"),
    ("other model", "answers with model 'someone-else', not the configured 'tiny'"),
])
async def test_a_faulty_backend_fails_over_to_the_next_with_the_whole_answer(aiohttp_server, model, session, fault,
                                                                             logged, caplog):
    faulty = await aiohttp_server(faulty_backend(fault))
    backends = Backends((BackendConfig(url=_url(faulty), name="faulty", key_env="FAULTY_KEY", idle_timeout_s=0.5,
                                       first_token_timeout_s=0.5, model="tiny" if fault == "other model" else ""),
                         BackendConfig(url=_url(model), name="local", priority=1)), session)
    with caplog.at_level(logging.WARNING):
        completion = await backends.complete(HELLO, 8)
    assert completion.backend == "local" and completion.finish_reason == "length"
    assert "半个" not in completion.content + completion.reasoning
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and logged in warnings[0] and "asking the next backend" in warnings[0]
    states = {s["name"]: s for s in backends.states()}
    assert states["faulty"]["state"] == "down" and states["faulty"]["errors"] == 1
    assert states["faulty"]["failovers"] == 1 and states["local"]["state"] == "up"
    again = await backends.complete(HELLO, 8)  # the open breaker keeps the next question away from it
    assert again.backend == "local" and backends.stats["faulty"].requests == 1


async def test_the_breaker_lets_a_recovered_backend_back_after_one_good_trial(aiohttp_server, model, model_config,
                                                                             session):
    port = free_port()
    backends = Backends((BackendConfig(url=f"http://127.0.0.1:{port}", name="first"),
                         BackendConfig(url=_url(model), name="second", priority=1)), session)
    assert (await backends.complete(HELLO, 4)).backend == "second"  # refused: down
    assert backends.states()[0]["state"] == "down"
    await aiohttp_server(create_model_app(model_config), port=port)  # the first comes back
    backends.breakers["first"].opened_at -= 60  # its cooldown has passed
    await backends.probe_all()
    assert backends.states()[0]["state"] == "trial"
    assert (await backends.complete(HELLO, 4)).backend == "first"  # the trial question
    assert backends.states()[0]["state"] == "up"


async def test_a_backend_that_only_missed_its_probe_is_up_again_without_a_trial(aiohttp_server, model_config,
                                                                                session):
    port = free_port()
    backends = Backends((BackendConfig(url=f"http://127.0.0.1:{port}", name="loading"),), session)
    await backends.probe_all()  # still loading its model: refused
    assert backends.states()[0]["state"] == "down" and not backends.any_up
    await aiohttp_server(create_model_app(model_config), port=port)
    backends.breakers["loading"].opened_at -= 60
    await backends.probe_all()
    assert backends.states()[0]["state"] == "up" and backends.any_up  # no answer of it ever failed


async def test_a_full_backend_spills_over_to_the_next(model, aiohttp_server, model_config, session):
    other = await aiohttp_server(create_model_app(model_config))
    backends = Backends((BackendConfig(url=_url(model), name="small", max_concurrent=1),
                         BackendConfig(url=_url(other), name="big", priority=1)), session)
    answers = await asyncio.gather(*(backends.complete(HELLO, 16) for _ in range(3)))
    used = sorted(a.backend for a in answers)
    assert "big" in used and "small" in used and not backends.stats["small"].errors


async def test_a_question_waits_while_no_backend_is_up_and_is_answered_once_one_is(aiohttp_server, model_config,
                                                                                   session):
    port = free_port()
    backends = Backends((BackendConfig(url=f"http://127.0.0.1:{port}", name="local"),), session,
                        probe_interval_s=0.1)
    with pytest.raises(NoBackend, match="no model backend could answer: backend local"):
        await backends.complete(HELLO, 4)
    assert not backends.any_up
    backends.start()
    try:
        waiting = asyncio.create_task(backends.wait_up())
        await asyncio.sleep(0.5)
        assert not waiting.done()  # nothing to answer with: it waits
        await aiohttp_server(create_model_app(model_config), port=port)
        backends.breakers["local"].opened_at -= 60
        await asyncio.wait_for(waiting, 10)
        assert (await backends.complete(HELLO, 4)).backend == "local"
    finally:
        await backends.stop()


async def test_the_admin_pages_show_each_backend_state(site):
    backends = site.backends
    backends.breakers["local"].failure(answering=True)
    backends.stats["local"].last_error = "backend local (http://127.0.0.1:9): unreachable (refused)"
    async with await log_in(site, "viewer") as http:
        page = await (await http.get("/backends")).text()
    rows = re.findall(r'<tr class="state-(\w+)"><td>(\w+)</td>', page)
    assert rows == [("down", "local"), ("up", "hq")] and "unreachable (refused)" in page
