"""The monitoring files HQ loads: alert rules that promtool accepts, and a Grafana board whose every query, like
every alert, names metrics that a running box really exposes."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.ha.replication import ReplicaBarrier
from appliance.ops.metrics import GpuCollector, HaCollector
from tests.conftest import write_config

MONITORING = Path(__file__).parent.parent / "appliance" / "ops" / "monitoring"
PROMQL_WORDS = {"sum", "by", "and", "rate", "increase", "histogram_quantile", "clamp_min", "avg", "max", "le", "instance",
                "status", "mode", "code", "gpu", "job", "up", "label_values"}


def _promtool() -> Path:
    tool = Path(os.environ.get("R1BOX_CACHE", Path.home() / ".cache/r1box")) / "tools" / "promtool"
    assert tool.exists(), "promtool is missing: `just test` fetches it (just promtool)"
    return tool


def test_promtool_accepts_the_alert_rules():
    result = subprocess.run([str(_promtool()), "check", "rules", str(MONITORING / "alerts.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = (MONITORING / "alerts.yml").read_text().count("- alert:")
    assert rules >= 9 and f"SUCCESS: {rules} rules found" in result.stdout


def test_the_grafana_board_is_well_formed():
    board = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    for panel in board["panels"]:
        assert panel["type"] == "timeseries" and {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])
    titles = " ".join(p["title"] for p in board["panels"]).lower()
    for topic in ("latency", "requests per second", "error rate", "gpu", "queue", "outbox"):
        assert topic in titles


class _FakeNvml:
    """Just enough of pynvml to list the GPU metric names on a machine without a GPU."""

    NVML_TEMPERATURE_GPU = 0

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetMemoryInfo(self, handle):
        return type("Memory", (), {"used": 1, "total": 2})()

    def nvmlDeviceGetUtilizationRates(self, handle):
        return type("Rates", (), {"gpu": 50})()

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 60


def _metric_names_in(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    words = set(re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", expr)) - PROMQL_WORDS
    return {re.sub(r"_(bucket|sum|count)$", "", w) for w in words if not w.isdigit()}


async def test_every_query_names_a_metric_the_box_exposes(client_with_conversation):
    exposed = await client_with_conversation()
    exposed |= {s.name for family in GpuCollector(_FakeNvml()).collect() for s in family.samples}
    barrier = ReplicaBarrier(Path("unused.sock"), Path("unused.db"), 1.0)  # a pair's box ([ha]) adds these
    exposed |= {s.name for family in HaCollector(lambda: {"role": "active"}, barrier).collect()
                for s in family.samples}
    board = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    exprs += re.findall(r"expr: (.+)", (MONITORING / "alerts.yml").read_text())
    for expr in exprs:
        missing = _metric_names_in(expr) - exposed - {"e"}
        assert not missing, f"{expr} names {missing}, which no box exposes"


@pytest.fixture
def client_with_conversation(start_box, tiny_fp32, tmp_path, monkeypatch):
    import base64

    import aiohttp

    from appliance.app_keys import METRICS_PORT
    from appliance.config import load_config
    from appliance.wechat.envelope import Account
    from appliance.wechat.sim import Platform, text_message

    key = base64.b64encode(bytes(32)).decode().rstrip("=")
    monkeypatch.setenv("R1BOX_WECHAT_TOKEN", "t")
    monkeypatch.setenv("R1BOX_WECHAT_ENCODING_AES_KEY", key)
    monkeypatch.setenv("R1BOX_WECHAT_APP_SECRET", "s")
    path = write_config(tmp_path, tiny_fp32, '[engine]\nmax_length = 256\n'
                        '[wechat]\napp_id = "wx-mon"\nmode = "plain"\ndelivery = "push"\napi_base_url = "http://127.0.0.1:9"\n'
                        '[dialog]\nmax_tokens = 4\n')

    async def run() -> set[str]:
        client = await start_box(load_config(path))
        request = Platform(Account("mp", "wx-mon", "t", key)).message(text_message("wx-mon", "u", "你好", 1))
        await client.post(f"/wechat?{request.query}", data=request.body)
        async with aiohttp.ClientSession() as session:  # serve's metrics, then the model process's
            async with session.get(f"http://127.0.0.1:{client.app[METRICS_PORT]}/metrics") as resp:
                text = await resp.text()
            async with session.get(str(client.model.make_url("/metrics"))) as resp:
                text += await resp.text()
        names = set()
        for family in text_string_to_metric_families(text):
            # a counter family is named without _total, and has no samples until something is counted
            names |= {family.name, family.name + "_total" * (family.type == "counter")}
            names |= {s.name for s in family.samples}
        names.add("up")
        return names

    return run
