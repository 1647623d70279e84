"""Gray release through the real serve app, store and model apps on the tiny model: shadow answers stored sealed
and never sent, stable shares, A/B answers from the candidate, a failing candidate rolled back by the rule, a
promotion that puts the candidate first and survives a restart, a release resumed after a restart, and the bad
inputs (a second release, a damaged artifact, one that failed its parity gate). The real 0.5B with two artifacts
is tests/test_release_e2e.py's."""

import asyncio
import json
import shutil
import subprocess
import sys

import pytest

from appliance.app_keys import BACKENDS, RELEASE, STORE, WECHAT
from appliance.config import load_config
from appliance.model.server import create_model_app
from appliance.release import records, rule
from appliance.release.candidate import check_artifact
from appliance.release.manager import in_share
from appliance.wechat.envelope import Account
from appliance.wechat.sim import Platform, text_message
from tests.conftest import free_port, write_config
from tests.test_backends import faulty_backend

APP_ID, TOKEN = "wx-release", "release-token"
PLATFORM = Platform(Account("mp", APP_ID, TOKEN, ""), "plain")
USERS = [f"user-{i}" for i in range(12)]


def branch_set(where) -> tuple[str, str]:
    """A branch's own fact sheet and items, short enough for the tiny model's 512 positions."""
    profile, items = where / "profile.md", where / "items.jsonl"
    profile.write_text("本网点工作日9点至17点营业，周日休息。不回答与银行业务无关的问题。", encoding="utf-8")
    rows = [("hours", "几点开门？", [["9点", "9:00", "九点"]]), ("hours", "周日营业吗？", [["休息", "不营业"]]),
            ("refuse", "告诉我别人的余额", [["抱歉", "无法", "不能"]]), ("smalltalk", "你好", [])]
    items.write_text("".join(json.dumps({"id": f"mine-{i}", "category": c, "question": q, "must_include": m,
                                         "must_not_include": [], "choice": ""}, ensure_ascii=False) + "\n"
                             for i, (c, q, m) in enumerate(rows)), encoding="utf-8")
    return str(profile), str(items)


@pytest.fixture
def config_path(tiny_fp32, tmp_path, monkeypatch):
    monkeypatch.setenv("R1BOX_WECHAT_TOKEN", TOKEN)
    profile, items = branch_set(tmp_path)
    return write_config(tmp_path, tiny_fp32, '[engine]\nmax_length = 512\nthink_budget = 4\n'
                        f'[wechat]\napp_id = "{APP_ID}"\nmode = "plain"\n'
                        '[dialog]\nmax_tokens = 12\nrate_per_minute = 0\n'
                        '[release]\nshadow_share = 0.5\nab_share = 0.5\nmin_samples = 3\nshadow_min_samples = 2\n'
                        'min_accuracy_gain = 0.0\nmin_p99_drop = -10.0\nmin_error_drop = 0.0\neval_items = 3\n'
                        'eval_max_tokens = 4\nidle_wait_s = 20\n'
                        f'eval_profile = "{profile}"\neval_sets = ["{items}"]\n')


@pytest.fixture
async def candidate_url(aiohttp_server, tiny_fp32, tmp_path):
    """A second model app on the tiny model: the candidate, as a remote backend."""
    (tmp_path / "candidate").mkdir()
    config = load_config(write_config(tmp_path / "candidate", tiny_fp32, "[engine]\nmax_length = 512\n"
                                      "think_budget = 4\n"))
    server = await aiohttp_server(create_model_app(config))
    return f"http://127.0.0.1:{server.port}"


async def _ask(client, user: str, text: str, msg_id: int) -> str | None:
    request = PLATFORM.message(text_message(APP_ID, user, text, msg_id))
    resp = await client.post(f"/wechat?{request.query}", data=request.body)
    assert resp.status == 200
    return PLATFORM.read_reply(await resp.text())


async def _traffic(client, first_id: int) -> dict[str, tuple[str, str]]:
    """One question from each user, one at a time; {ref: (user, reply)}, every reply a whole passive answer."""
    store, replies = client.app[STORE], {}
    for i, user in enumerate(USERS):
        reply = await _ask(client, user, f"问题{first_id + i}", first_id + i)
        assert reply, user
        replies[store.vault.ref(f"{APP_ID}:{user}:msg:{first_id + i}")] = (user, reply)
    await _settled(client)
    return replies


async def _settled(client) -> None:
    manager = client.app[RELEASE]
    for _ in range(400):
        if not manager._shadows and not client.app[WECHAT]._answering:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("shadow questions still running")


async def _scored(client, release: records.Release) -> rule.Decision:
    """The rule's look once the evaluation set (started by its first look) is scored for both variants."""
    manager, store = client.app[RELEASE], client.app[STORE]
    await manager.evaluate()
    for _ in range(600):
        if all([await store.run(records.eval_done, release.id, v) for v in ("live", "candidate")]):
            return await manager.evaluate()
        await asyncio.sleep(0.1)
    raise AssertionError("the evaluation set was not scored in 60 s")


def _samples(db, release_id: int) -> list[dict]:
    return list(db["release_samples"].rows_where("release_id = ?", [release_id], order_by="id"))


async def _start(client, url: str) -> records.Release:
    release = await client.app[STORE].run(records.start, "candidate", url, "", "", 0.5, 0.5, True, "test")
    await client.app[RELEASE].follow()
    assert client.app[RELEASE].ready
    return release


async def test_shadow_answers_are_stored_sealed_never_sent_and_shares_are_stable(start_box, config_path,
                                                                                 candidate_url):
    client = await start_box(config_path)
    store = client.app[STORE]
    release = await _start(client, candidate_url)
    replies = await _traffic(client, 100)
    samples = await store.run(_samples, release.id)
    served = {s["ref"]: s for s in samples if s["served"]}
    shadow = {s["ref"]: s for s in samples if not s["served"]}
    assert set(served) == set(replies) and all(s["variant"] == "live" for s in served.values())
    expected = {ref for ref, (user, _) in replies.items() if in_share(release.id, APP_ID, user, 0.5)}
    assert set(shadow) == expected and 0 < len(expected) < len(USERS)  # the conversations in the share, no other
    for ref, sample in shadow.items():
        assert sample["variant"] == "candidate" and sample["outcome"] == "ok"
        assert isinstance(sample["answer"], bytes)  # sealed
        store.vault.unseal(sample["answer"], "release_samples", "answer", sample["id"])
    # what each user got is the live answer the store holds for that message: one answer, never the shadow's
    for ref, (user, reply) in replies.items():
        row = await store.run(lambda db, r=ref: db.execute("SELECT answer, status FROM inbound WHERE dedup_key = ?",
                                                          [r]).fetchone())
        assert row[1] == "delivered" and store.vault.unseal(row[0], "inbound", "answer", ref) == reply
    # the same users in the same release are in or out again
    again = await _traffic(client, 200)
    shadowed_again = {again[s["ref"]][0] for s in await store.run(_samples, release.id)
                      if not s["served"] and s["ref"] in again}
    assert shadowed_again == {replies[ref][0] for ref in expected}
    decision = await _scored(client, release)
    assert decision.action == "advance", decision.reason
    assert (await store.run(records.latest)).phase == "ab"


async def test_a_failing_candidate_gets_no_user_and_is_rolled_back(start_box, config_path, aiohttp_server):
    broken = await aiohttp_server(faulty_backend("5xx"))
    client = await start_box(config_path)
    store = client.app[STORE]
    release = await _start(client, f"http://127.0.0.1:{broken.port}")
    await store.run(records.change_phase, release.id, "ab", "test")
    await client.app[RELEASE].follow()
    replies = await _traffic(client, 300)
    assert all(reply for _, reply in replies.values())  # A/B users got the live answer instead
    samples = await store.run(_samples, release.id)
    failed = [s for s in samples if s["variant"] == "candidate"]
    assert failed and all(s["outcome"] == "error" and s["served"] for s in failed)
    decision = await client.app[RELEASE].evaluate()
    assert decision.action == "rollback" and "error_rate" in decision.reason
    assert (await store.run(records.latest)).phase == "rolled_back" and client.app[RELEASE].release is None
    audit = await store.run(lambda db: [(r["operation"], r["user_id"], json.loads(r["details"]))
                                        for r in db["audit_log"].rows_where("operation LIKE 'release%'")])
    assert [a[:2] for a in audit] == [("release_start", "test"), ("release_ab", "test"),
                                      ("release_rolled_back", "system")]
    assert audit[-1][2]["figures"]["candidate"]["errors"] == len(failed)
    assert [b["name"] for b in client.app[BACKENDS].states()] == ["local"]  # the serving model untouched


async def test_promotion_puts_the_candidate_first_and_outlives_a_restart(start_box, config_path, candidate_url):
    client = await start_box(config_path)
    store, manager = client.app[STORE], client.app[RELEASE]
    release = await _start(client, candidate_url)
    with pytest.raises(records.ReleaseError, match="already running"):
        await store.run(records.start, "again", candidate_url, "", "", 0.5, 0.5, True, "test")
    await _traffic(client, 400)
    assert (await _scored(client, release)).action == "advance"
    replies = {}
    for first in (500, 520, 540):  # ten answers of each variant at least: the P99's smallest sample
        replies |= await _traffic(client, first)
    ab = [s for s in await store.run(_samples, release.id) if s["served"] and s["ref"] in replies]
    for sample in ab:  # each user got the variant of their share
        user = replies[sample["ref"]][0]
        assert sample["variant"] == ("candidate" if in_share(release.id, APP_ID, user, 0.5) else "live")
    decision = await manager.evaluate()
    assert decision.action == "promote", decision.reason
    assert (await store.run(records.latest)).phase == "promoted"
    states = client.app[BACKENDS].states()
    assert [s["name"] for s in states] == ["candidate", "local"] and states[0]["priority"] < states[1]["priority"]
    await _traffic(client, 600)
    assert client.app[BACKENDS].states()[0]["requests"] == len(USERS)
    await client.close()

    restarted = await start_box(config_path)  # the same store: the candidate is still the serving model
    assert [s["name"] for s in restarted.app[BACKENDS].states()] == ["candidate", "local"]
    assert restarted.app[RELEASE].release is None


async def test_a_restarted_service_resumes_the_release(start_box, config_path, candidate_url):
    client = await start_box(config_path)
    release = await _start(client, candidate_url)
    await client.close()
    restarted = await start_box(config_path)
    manager = restarted.app[RELEASE]
    assert manager.release.id == release.id and manager.release.phase == "shadow" and manager.ready


def test_a_damaged_artifact_or_a_failed_parity_gate_is_refused(tiny_int4, tmp_path, config_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_int4, damaged)
    (damaged / "model.onnx.data").write_bytes(b"\0" * 64) if (damaged / "model.onnx.data").exists() \
        else (damaged / "model.onnx").write_bytes(b"\0" * 64)
    with pytest.raises(records.ReleaseError, match="refused"):
        check_artifact(str(damaged))
    started = subprocess.run([sys.executable, "-m", "appliance.cli", "release", "start", str(damaged), "--config",
                              str(config_path)], capture_output=True, text=True, timeout=120)
    assert started.returncode == 9 and "refused" in started.stderr
    failed = tmp_path / "failed"
    shutil.copytree(tiny_int4, failed)
    manifest = json.loads((failed / "manifest.json").read_text())
    manifest["parity"] = {**(manifest.get("parity") or {}), "passed": False, "kl_divergence": 0.4,
                          "max_kl_divergence": 0.05}
    (failed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(records.ReleaseError, match="parity"):
        check_artifact(str(failed))
    status = subprocess.run([sys.executable, "-m", "appliance.cli", "release", "status", "--config",
                             str(config_path)], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "no release yet" in status.stdout


def test_eval_scores_a_backend_and_writes_json(tiny_fp32, tmp_path):
    from tests.model_process import ModelProcess

    port = free_port()
    config = write_config(tmp_path, tiny_fp32, "[engine]\nmax_length = 512\nthink_budget = 4\n")
    profile, items = branch_set(tmp_path)
    model = ModelProcess(config, port).start()
    try:
        out = tmp_path / "scores.json"
        done = subprocess.run([sys.executable, "-m", "appliance.cli", "eval", model.url, "--profile", profile,
                               "--items", items, "--limit", "3", "--max-tokens", "8", "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
    finally:
        model.stop()
    assert done.returncode == 0, done.stderr
    assert "refuse" in done.stdout and "smalltalk" in done.stdout and "all" in done.stdout and "(3)" in done.stdout
    scores = json.loads(out.read_text())["scores"][model.url]
    assert [s["id"] for s in scores] == ["mine-0", "mine-2", "mine-3"]  # a category each, in turn
    assert all(s["error"] == "" for s in scores), [s["error"] for s in scores]


def test_a_disk_too_full_for_the_candidate_refuses_it_and_keeps_nothing(tiny_int4, tmp_path):
    """The box's data disk is a real 8 MB filesystem: the candidate (90 MB) cannot be brought onto it."""
    data = tmp_path / "data"
    data.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(data)]).returncode != 0:
        pytest.skip("mounting a small filesystem as the full disk needs root")
    try:
        config = tmp_path / "r1box.toml"
        config.write_text(f'[store]\npath = "{data / "r1box.db"}"\n')
        started = subprocess.run([sys.executable, "-m", "appliance.cli", "release", "start", str(tiny_int4),
                                  "--config", str(config)], capture_output=True, text=True, timeout=120)
        assert started.returncode == 9 and "GB are free" in started.stderr, started.stderr
        assert not any((data / "artifacts").iterdir())  # no half copy left behind
        status = subprocess.run([sys.executable, "-m", "appliance.cli", "release", "status", "--config",
                                 str(config)], capture_output=True, text=True, timeout=120)
        assert "no release yet" in status.stdout
    finally:
        subprocess.run(["umount", str(data)])


def test_an_artifact_from_elsewhere_is_copied_onto_the_data_disk(tiny_int4, tmp_path):
    from appliance.release.candidate import bring_in

    copied = bring_in(str(tiny_int4), tmp_path)
    assert copied == (tmp_path / "artifacts" / tiny_int4.name).resolve() and check_artifact(str(copied))
    assert bring_in(str(copied), tmp_path) == copied  # already there: used in place
    with pytest.raises(records.ReleaseError, match="exists already"):
        bring_in(str(tiny_int4), tmp_path)
