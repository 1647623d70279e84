"""Both processes' metrics after a simulated WeChat conversation: serve's /metrics listener (WeChat, backends) and
the model's /metrics (the engine), every metric present with the values the conversation implies, GPU metrics
absent on a machine without one."""

import base64

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.app_keys import METRICS_PORT
from appliance.config import load_config
from appliance.wechat.envelope import Account
from appliance.wechat.sim import Platform, text_message
from tests.conftest import write_config

TOKEN = "metrics-token"
KEY = base64.b64encode(bytes(range(50, 82))).decode().rstrip("=")
APP_ID = "wx-metrics"


@pytest.fixture
async def client(start_box, tiny_fp32, tmp_path, monkeypatch):
    monkeypatch.setenv("R1BOX_WECHAT_TOKEN", TOKEN)
    monkeypatch.setenv("R1BOX_WECHAT_ENCODING_AES_KEY", KEY)
    path = write_config(tmp_path, tiny_fp32, f'[engine]\nmax_length = 256\nthink_budget = 4\n'
                        f'[wechat]\napp_id = "{APP_ID}"\n[dialog]\nmax_tokens = 8\n')
    return await start_box(load_config(path))


async def _scrape(url: str) -> dict[tuple, float]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            assert resp.status == 200
            text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_after_a_conversation(client):
    platform = Platform(Account("mp", APP_ID, TOKEN, KEY), "safe")
    request = platform.message(text_message(APP_ID, "m-user", "你好", 31))
    for _ in range(2):  # the platform's retry: one answer, one duplicate
        assert (await client.post(f"/wechat?{request.query}", data=request.body)).status == 200
    m = await _scrape(str(client.model.make_url("/metrics")))
    assert m[("llm_requests_total", (("status", "length"),))] == 1
    assert m[("llm_time_to_first_token_seconds_count", ())] == 1
    assert m[("llm_response_time_seconds_count", ())] == 1
    assert m[("llm_inter_token_latency_seconds_count", ())] == 7  # 8 tokens, 7 gaps
    assert m[("llm_generation_tokens_total", ())] == 8 and m[("llm_prompt_tokens_total", ())] > 0
    assert m[("llm_requests_running", ())] == 0 and m[("llm_requests_waiting", ())] == 0
    assert m[("llm_kv_cache_usage_ratio", ())] == 0.0
    assert m[("llm_prefix_cache_queries_total", ())] == 1 and m[("llm_prefix_cache_hits_total", ())] == 0
    assert m[("llm_execution_provider_info", (("provider", "cpu"),))] == 1
    assert m[("llm_provider_fallbacks_total", ())] == 0
    assert ("process_resident_memory_bytes", ()) in m and not any(name.startswith("gpu_") for name, _ in m)
    m = await _scrape(f"http://127.0.0.1:{client.app[METRICS_PORT]}/metrics")
    assert m[("r1box_backend_requests_total", (("backend", "local"),))] == 1
    assert m[("r1box_backend_errors_total", (("backend", "local"),))] == 0
    assert m[("r1box_backend_up", (("backend", "local"),))] == 1
    assert m[("r1box_backend_state", (("backend", "local"), ("state", "up")))] == 1
    assert m[("r1box_backend_response_seconds_count", (("backend", "local"),))] == 1
    assert m[("wechat_messages_received_total", (("type", "text"),))] == 2
    assert m[("wechat_duplicates_dropped_total", ())] == 1
    assert m[("wechat_replies_total", (("mode", "passive"),))] == 1
    assert ("process_resident_memory_bytes", ()) in m
    assert not any(name.startswith("gpu_") for name, _ in m)  # no GPU here: absent, not zero
