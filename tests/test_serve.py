"""`r1box model` and `r1box serve` as two processes, the way the appliance runs them: they come up healthy, serve
answers a message sent by `r1box wechat-sim` through the model process, and both stop cleanly on SIGTERM;
`r1box health` says so, before and after."""

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from tests.conftest import free_port, write_config


def test_serve_answers_wechat_sim_and_stops_on_sigterm(tiny_fp32, tmp_path):
    port = free_port()
    config = write_config(tmp_path, tiny_fp32, '[engine]\nmax_batch = 2\nmax_length = 256\n'
                          'think_budget = 4\n[wechat]\napp_id = "wx-serve-test"\nmode = "compat"\n'
                          '[wecom]\ncorp_id = "ww-serve"\n[dialog]\nmax_tokens = 8\n'
                          f'[server]\nport = {port}\n')
    key = base64.b64encode(bytes(32)).decode().rstrip("=")
    env = dict(os.environ, R1BOX_WECHAT_TOKEN="serve-token", R1BOX_WECHAT_ENCODING_AES_KEY=key,
               R1BOX_WECOM_TOKEN="serve-token", R1BOX_WECOM_ENCODING_AES_KEY=key)
    model = subprocess.Popen([sys.executable, "-m", "appliance.cli", "model", "--config", str(config)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--config", str(config)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = None
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                    health = json.load(resp)
                    if health["status"] == "ok":  # degraded while the model loads: questions would wait
                        break
            except OSError:
                assert server.poll() is None, server.stdout.read()
            time.sleep(0.1)
        assert health and health["status"] == "ok" and health["backends"][0]["name"] == "local"
        checked = subprocess.run([sys.executable, "-m", "appliance.cli", "health", "--model", "--config", str(config),
                                  "--wait", "60"], env=env, capture_output=True, text=True, timeout=90)
        assert checked.returncode == 0 and json.loads(checked.stdout)["queue"]["slots"] == 2, checked.stderr
        for mode in ("plain", "safe"):
            sim = subprocess.run([sys.executable, "-m", "appliance.cli", "wechat-sim", "你好", "--app-id",
                                  "wx-serve-test", "--mode", mode, "--url", f"http://127.0.0.1:{port}/wechat"],
                                 env=env, capture_output=True, text=True, timeout=60)
            assert sim.returncode == 0, sim.stderr
            assert sim.stdout.strip()
        sim = subprocess.run([sys.executable, "-m", "appliance.cli", "wechat-sim", "你好", "--wecom", "--app-id",
                              "ww-serve", "--url", f"http://127.0.0.1:{port}/wecom"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert sim.returncode == 0 and sim.stdout.strip(), sim.stderr
        # the platform's retry 5 s later finds the message answered: no second answer
        sim = subprocess.run([sys.executable, "-m", "appliance.cli", "wechat-sim", "再见", "--app-id", "wx-serve-test",
                              "--retries", "1", "--url", f"http://127.0.0.1:{port}/wechat"],
                             env=env, capture_output=True, text=True, timeout=60)
        first, _, second = sim.stdout.strip().rpartition("\n[delivery 2] ")  # the answer may span lines
        assert sim.returncode == 0 and first.startswith("[delivery 1] "), sim.stderr
        assert second == "(success: the answer comes later)" and "success" not in first
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=30)[0]
        model.send_signal(signal.SIGTERM)
        model_output = model.communicate(timeout=30)[0]
    assert server.returncode == 0 and model.returncode == 0, output + model_output
    gone = subprocess.run([sys.executable, "-m", "appliance.cli", "health", "--config", str(config), "--wait", "1"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and f"no healthy answer from http://127.0.0.1:{port}/healthz" in gone.stderr
    assert "serve-token" not in output + model_output  # secrets never in logs
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]  # not a tty: JSON lines
    answered = [r for r in records if r["msg"] == "answered"]
    assert len(answered) == 4 and all(r["request_id"] != "-" for r in answered)


def test_json_logs_carry_the_request_id():
    import logging

    from appliance.ops.logs import JsonFormatter, request_id

    token = request_id.set("abc123")
    try:
        record = logging.makeLogRecord({"msg": "answered", "levelname": "INFO", "name": "x", "chars": 12})
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id.reset(token)
    assert line["request_id"] == "abc123" and line["msg"] == "answered" and line["chars"] == 12
