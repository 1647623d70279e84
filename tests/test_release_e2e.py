"""A gray release on the real 0.5B with two artifacts (the serving int8, a faster int4 candidate), driven by WeChat
traffic: `r1box release start` from the shell, the candidate's own `r1box model` started by serve, shadow answers
stored and never sent, A/B by user, the rule promoting it by itself on its schedule; and a candidate killed during
A/B, rolled back by the rule. Across both, every message is answered exactly once and every decision is audited. The
thresholds here ask "no worse" of errors and nothing of accuracy and latency (three evaluation items and a few dozen
answers, to keep the test short, tell nothing of those), so that two artifacts of one model can pass; the rule's
statistics on real differences are tests/test_release_rule.py's, the full evaluation set's scores the README's."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.app import create_app
from appliance.app_keys import BACKENDS, RELEASE, STORE, WECHAT
from appliance.config import load_config
from appliance.release import records
from appliance.release.manager import in_share
from appliance.wechat.envelope import Account
from appliance.wechat.sim import Platform, text_message
from tests.conftest import free_port, write_config
from tests.model_process import ModelProcess
from tests.test_release import branch_set

pytestmark = pytest.mark.slow

APP_ID, TOKEN = "wx-gray", "gray-token"
PLATFORM = Platform(Account("mp", APP_ID, TOKEN, ""), "plain")
MODEL = "qwen2.5-coder-0.5b-instruct"
USERS = [f"branch-user-{i}" for i in range(8)]


@pytest.fixture(scope="module")
def artifacts():
    from export.artifacts import cached_artifact
    from export.quantize import QuantConfig

    return cached_artifact(MODEL), cached_artifact(MODEL, QuantConfig(precision="int8"))


class Box:
    """serve in this process (the real app) beside its live `r1box model` process; the WeChat platform's side:
    what each message got, passively or pushed."""

    def __init__(self, client, api):
        self.client, self.api, self.next_id = client, api, 1000
        self.messages: dict[str, tuple[str, int]] = {}  # ref -> (user, msg id)
        self.passive: dict[int, str] = {}

    async def ask(self, user: str) -> None:
        msg_id, self.next_id = self.next_id, self.next_id + 1
        ref = self.client.app[STORE].vault.ref(f"{APP_ID}:{user}:msg:{msg_id}")
        self.messages[ref] = (user, msg_id)
        request = PLATFORM.message(text_message(APP_ID, user, f"请用一句话介绍第{msg_id % 97}号窗口。", msg_id))
        resp = await self.client.post(f"/wechat?{request.query}", data=request.body)
        assert resp.status == 200
        if reply := PLATFORM.read_reply(await resp.text()):
            self.passive[msg_id] = reply

    async def round(self, spaced: bool = True) -> None:
        """A message from each user; spaced: each after the last one's answer and shadow are done (shadow work
        yields to every live question, so back-to-back messages leave it no idle moment)."""
        for user in USERS:
            await self.ask(user)
            if spaced:
                await self.settle(pause=0)

    async def settle(self, timeout: float = 300, pause: float = 1.0) -> None:
        service = self.client.app[WECHAT]
        deadline = time.monotonic() + timeout
        while service._answering or self.client.app[RELEASE]._shadows:
            assert time.monotonic() < deadline, "answers still running"
            await asyncio.sleep(0.1)
        await asyncio.sleep(pause)  # the outbox's last push

    def delivered(self) -> dict[str, list[str]]:
        """Every answer each message got, passive or pushed."""
        got = {ref: ([self.passive[msg]] if msg in self.passive else []) for ref, (_, msg) in self.messages.items()}
        by_user: dict[str, list[str]] = {}
        for sent in self.api.sent:
            by_user.setdefault(sent["touser"], []).append(sent["text"]["content"])
        for ref, (user, msg) in self.messages.items():
            if msg not in self.passive:  # pushes go out in the order the answers came, one per late message
                got[ref] = by_user.get(user, [])[:1]
                by_user[user] = by_user.get(user, [])[1:]
        return got


async def _box(aiohttp_client, api, tmp_path, artifact, monkeypatch, release: str):
    monkeypatch.setenv("R1BOX_WECHAT_TOKEN", TOKEN)
    monkeypatch.setenv("R1BOX_WECHAT_APP_SECRET", "gray-secret")
    monkeypatch.setenv("R1BOX_MODEL_KEY", "gray-model-key")
    profile, items = branch_set(tmp_path)  # a branch's own short fact sheet: the shipped one is `r1box eval`'s
    path = write_config(tmp_path, artifact, '[engine]\nmax_batch = 2\nmax_length = 2304\n'
                        f'[wechat]\napp_id = "{APP_ID}"\nmode = "plain"\ndelivery = "push"\n'
                        f'api_base_url = "http://127.0.0.1:{api.server.port}"\n'
                        '[dialog]\nmax_tokens = 24\nrate_per_minute = 0\n'
                        f'[release]\ncandidate_port = {free_port()}\nevaluate_every_s = 2\neval_items = 3\n'
                        f'eval_profile = "{profile}"\neval_sets = ["{items}"]\n'
                        'eval_max_tokens = 24\nidle_wait_s = 120\nmin_accuracy_gain = -1.0\nmin_p99_drop = -10.0\n'
                        'min_error_drop = 0.0\n' + release, threads=None)
    config = load_config(path)
    model = ModelProcess(path, config.model_server.port, env=dict(os.environ)).start()
    client = await aiohttp_client(create_app(config, str(path)))
    return Box(client, api), model, path


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True,
                          timeout=300)


async def _until(check, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(every)
    return result


def _audit(db) -> list[tuple[str, str, dict]]:
    return [(r["operation"], r["user_id"], json.loads(r["details"]))
            for r in db["audit_log"].rows_where("operation LIKE 'release%'", order_by="id")]


async def test_shadow_then_ab_then_promotion_with_every_message_answered_once(aiohttp_client, api, artifacts,
                                                                                tmp_path, monkeypatch):
    int4, int8 = artifacts
    box, model, path = await _box(aiohttp_client, api, tmp_path, int8, monkeypatch,
                                  "shadow_share = 0.5\nab_share = 0.5\nshadow_min_samples = 3\nmin_samples = 10\n")
    store, manager = box.client.app[STORE], box.client.app[RELEASE]
    try:
        started = await asyncio.to_thread(_cli, "release", "start", str(int4), "--config", str(path))
        assert started.returncode == 0 and '"phase": "shadow"' in started.stdout, started.stderr
        await _until(lambda: _ready(manager), 300, "the candidate model started")
        release = manager.release
        phases, began = [], time.monotonic()
        while (latest := await store.run(records.latest)).phase != "promoted":
            assert latest.phase in ("shadow", "ab"), latest.figures
            assert time.monotonic() - began < 1200, f"no decision in 20 minutes: {latest.figures}"
            phases.append(latest.phase)
            await box.round()
            await asyncio.sleep(3)  # the rule's next look
        print(f"\nrelease promoted after {len(box.messages)} messages in {time.monotonic() - began:.0f} s: "
              f"{latest.figures.get('reason')}; live {latest.figures.get('live')}, candidate "
              f"{latest.figures.get('candidate')}")
        assert "shadow" in phases and "ab" in phases
        states = box.client.app[BACKENDS].states()
        assert states[0]["name"] == release.candidate and states[0]["url"] == release.url
        await box.round()  # answered by the promoted model, none dropped across the switch
        await box.settle()
        assert box.client.app[BACKENDS].states()[0]["requests"] >= len(USERS)

        samples = await store.run(lambda db: list(db["release_samples"].rows_where("release_id = ?", [release.id])))
        ab_at = next(r for r in await store.run(_audit) if r[0] == "release_ab")[2]
        shadow = [s for s in samples if not s["served"]]
        assert shadow and all(s["variant"] == "candidate" for s in shadow)
        for s in samples:
            user = box.messages[s["ref"]][0] if s["ref"] in box.messages else None
            if s["served"] and s["variant"] == "candidate":
                assert in_share(release.id, APP_ID, user, 0.5)  # A/B answers only to users in the share
            if not s["served"]:
                assert in_share(release.id, APP_ID, user, 0.5)
        assert ab_at["from"] == "shadow"

        delivered = box.delivered()
        assert all(len(answers) == 1 and answers[0].strip() for answers in delivered.values()), delivered
        for s in shadow:  # a shadow answer is kept, sealed, and never what the user got
            kept = store.vault.unseal(s["answer"], "release_samples", "answer", s["id"])
            row = await store.run(lambda db, r=s["ref"]: db.execute("SELECT answer FROM inbound WHERE dedup_key = ?",
                                                                    [r]).fetchone()[0])
            assert delivered[s["ref"]][0].startswith(store.vault.unseal(row, "inbound", "answer", s["ref"])[:20])
            assert kept is not None
        audit = await store.run(_audit)
        assert [(op, who.split(":")[0]) for op, who, _ in audit] == [
            ("release_start", "cli"), ("release_ab", "system"), ("release_promoted", "system")]
        assert audit[-1][2]["figures"]["action"] == "promote" and audit[-1][2]["figures"]["checks"]
    finally:
        await box.client.close()
        model.stop()


async def test_a_candidate_that_crashes_during_ab_is_rolled_back(aiohttp_client, api, artifacts, tmp_path,
                                                                   monkeypatch):
    int4, int8 = artifacts
    box, model, path = await _box(aiohttp_client, api, tmp_path, int8, monkeypatch,
                                  "shadow_share = 0.0\nab_share = 1.0\nmin_samples = 50\n")
    store, manager = box.client.app[STORE], box.client.app[RELEASE]
    try:
        assert (await asyncio.to_thread(_cli, "release", "start", str(int4), "--config", str(path))).returncode == 0
        await _until(lambda: _ready(manager), 300, "the candidate model started")
        assert (await asyncio.to_thread(_cli, "release", "ab", "--config", str(path))).returncode == 0
        await manager.follow()
        release = manager.release
        await box.round()  # every user is in A/B: the candidate answers them
        await box.settle()
        process = manager.processes[release.id]
        crashed = time.monotonic()
        copy = Path(release.artifact)  # brought onto the box's data disk at start
        assert copy.parent == tmp_path / "artifacts"
        (copy / "model.onnx").rename(copy / "model.onnx.gone")  # its restarts fail: it stays down
        os.kill(process._process.pid, signal.SIGKILL)
        while (latest := await store.run(records.latest)).phase == "ab":
            assert time.monotonic() - crashed < 300, latest.figures
            await box.round(spaced=False)
            await asyncio.sleep(1)
        await box.settle()
        print(f"\ncandidate killed during A/B: {latest.phase} after {time.monotonic() - crashed:.1f} s "
              f"({latest.figures.get('reason')})")
        assert latest.phase == "rolled_back"
        assert [b["name"] for b in box.client.app[BACKENDS].states()] == ["local"]
        delivered = box.delivered()
        assert all(len(answers) == 1 and answers[0].strip() for answers in delivered.values()), delivered
        audit = await store.run(_audit)
        assert [op for op, _, _ in audit] == ["release_start", "release_ab", "release_rolled_back"]
        assert audit[-1][1] == "system" and audit[-1][2]["figures"]["candidate"]["errors"] > 0
        await asyncio.sleep(3)
        assert process._process.returncode is not None  # the candidate's process is gone
    finally:
        await box.client.close()
        model.stop()


async def _ready(manager) -> bool:
    await manager.follow()
    return manager.ready
