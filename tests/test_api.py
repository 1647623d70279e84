"""The local API on the real aiohttp app over the tiny artifact: OpenAI-shaped answers, streaming with reasoning
apart, health, API keys, and bad requests answered with a clear 4xx while the engine keeps serving."""

import asyncio
import json

import pytest

from appliance.config import load_config
from appliance.model.server import create_model_app
from tests.conftest import read_manifest, write_config

GREEDY = {"temperature": 0, "max_tokens": 8}
HELLO = [{"role": "user", "content": "你好"}]


@pytest.fixture
def config(tiny_fp32, tmp_path):
    return write_config(tmp_path, tiny_fp32, '[engine]\nmax_batch = 2\nmax_waiting = 2\nmax_length = 128\n'
                        '[model_server]\nmax_body_kb = 16\n')


@pytest.fixture
async def client(aiohttp_client, config):
    return await aiohttp_client(create_model_app(load_config(config)))


async def test_health_and_models(client, tiny_fp32):
    name = read_manifest(tiny_fp32)["model"]["name"]
    health = await (await client.get("/healthz")).json()
    assert health["status"] == "ok" and health["provider"] == "cpu" and health["model"] == name
    assert health["queue"] == {"running": 0, "waiting": 0, "slots": 2, "free_slots": 2}
    models = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == [name]


async def test_completion_keeps_reasoning_apart(client):
    resp = await client.post("/v1/chat/completions", json={"messages": HELLO, **GREEDY})
    body = await resp.json()
    assert resp.status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 8
    message = choice["message"]
    # the tiny random model never closes its think block, so all it says is reasoning
    assert message["role"] == "assistant" and "reasoning_content" in message
    assert "</think>" not in message["content"] + message["reasoning_content"]


async def test_streaming_equals_the_plain_answer(client):
    plain = await (await client.post("/v1/chat/completions", json={"messages": HELLO, **GREEDY})).json()
    resp = await client.post("/v1/chat/completions", json={"messages": HELLO, "stream": True,
                                                           "stream_options": {"include_usage": True}, **GREEDY})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = [line[6:] for line in (await resp.text()).splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    assert reasoning == plain["choices"][0]["message"]["reasoning_content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"messages": HELLO, "temprature": 1}).encode(), "unknown field 'temprature'"),
    (json.dumps({"messages": []}).encode(), "messages is required"),
    (json.dumps({"messages": HELLO, "max_tokens": -5}).encode(), "max_tokens must be"),
    (json.dumps({"messages": HELLO, "max_tokens": 10 ** 9}).encode(), "max_tokens must be"),
    (json.dumps({"messages": HELLO, "temperature": "hot"}).encode(), "temperature must be a number"),
    (json.dumps({"messages": HELLO, "top_p": 0}).encode(), "top_p"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "role"),
    (json.dumps({"messages": [{"role": "user", "content": "长" * 300}]}).encode(), "Shorten the conversation"),
])
async def test_bad_requests_get_a_clear_400(client, body, fragment):
    resp = await client.post("/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    error = (await resp.json())["error"]
    assert resp.status == 400 and fragment in error["message"]
    assert (await client.post("/v1/chat/completions", json={"messages": HELLO, **GREEDY})).status == 200


async def test_oversized_body_is_refused(client):
    resp = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 20000}]})
    assert resp.status == 413 and "error" in await resp.json()


async def test_a_thousand_at_once_get_answers_or_busy_and_nothing_leaks(client):
    async def ask():
        resp = await client.post("/v1/chat/completions", json={"messages": HELLO, "temperature": 0, "max_tokens": 4})
        await resp.read()
        return resp.status, resp.headers.get("Retry-After")

    results = await asyncio.gather(*(ask() for _ in range(1000)))
    assert {s for s, _ in results} <= {200, 503} and (200, None) in results and (503, "2") in results
    health = await (await client.get("/healthz")).json()
    assert health["queue"] == {"running": 0, "waiting": 0, "slots": 2, "free_slots": 2}
    assert health["kv_cache_usage"] == 0.0
    # and it still answers
    assert (await client.post("/v1/chat/completions", json={"messages": HELLO, **GREEDY})).status == 200


async def test_client_leaving_mid_stream_frees_the_slot(client):
    resp = await client.post("/v1/chat/completions", json={"messages": HELLO, "stream": True, "temperature": 0,
                                                           "max_tokens": 100})
    await resp.content.readline()
    resp.close()
    for _ in range(200):
        health = await (await client.get("/healthz")).json()
        if health["queue"]["free_slots"] == 2:
            break
        await asyncio.sleep(0.05)
    assert health["queue"]["free_slots"] == 2 and health["queue"]["running"] == 0


async def test_api_keys_are_required_when_configured(aiohttp_client, config, monkeypatch):
    monkeypatch.setenv("R1BOX_API_KEYS", "k-one,k-two")
    client = await aiohttp_client(create_model_app(load_config(config)))
    assert (await client.get("/v1/models")).status == 401
    assert (await client.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status == 401
    assert (await client.get("/v1/models", headers={"Authorization": "Bearer k-two"})).status == 200
    assert (await client.get("/healthz")).status == 200


async def test_a_silent_stream_says_keep_alive_until_its_first_token(client, monkeypatch):
    from appliance.model import api

    monkeypatch.setattr(api, "KEEPALIVE_S", 0.01)
    long = {"messages": HELLO, "temperature": 0, "max_tokens": 100}
    busy = [asyncio.create_task(client.post("/v1/chat/completions", json=long)) for _ in range(2)]  # both slots
    await asyncio.sleep(0.05)
    resp = await client.post("/v1/chat/completions", json={**long, "max_tokens": 4, "stream": True})
    lines = (await resp.text()).splitlines()
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert resp.status == 200 and ": keep-alive" in lines[:first_data] and "data: [DONE]" in lines
    for task in busy:
        assert (await task).status == 200
