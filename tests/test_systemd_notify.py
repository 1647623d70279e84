"""`r1box serve` and `r1box model` under systemd's notify protocol, against a real datagram socket: the watchdog
stretched while they start, READY=1 (and WatchdogSec= again) only once the listener answers, WATCHDOG=1 while it
runs, STOPPING=1 on SIGTERM. And the NVIDIA preflight's fall back to the CPU."""

import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request

import pytest

from appliance.model.gpu_preflight import nvidia_preflight
from tests.conftest import free_port, write_config


@pytest.mark.parametrize("command", ["serve", "model"])
def test_ready_after_listening_then_watchdog_then_stopping(tiny_fp32, tmp_path, command):
    port = free_port()
    section = "server" if command == "serve" else "model_server"
    config = write_config(tmp_path, tiny_fp32, f"[{section}]\nport = {port}\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(120)
    server = subprocess.Popen([sys.executable, "-m", "appliance.cli", command, "--config", str(config)],
                              env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="400000"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    states = []
    try:
        while "READY=1" not in states:
            states += notify.recv(4096).decode().splitlines()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            assert resp.status == 200  # ready means answering, not merely loaded
        assert "WATCHDOG=1" in states  # fed while the model loaded
        assert states[0] == "WATCHDOG_USEC=900000000"  # stretched first: a load may hold the loop for long
        assert "WATCHDOG_USEC=400000" in states  # and WatchdogSec= again with READY=1
        pings, start = 0, time.monotonic()
        while time.monotonic() - start < 1.5:
            pings += notify.recv(4096).decode().splitlines().count("WATCHDOG=1")
        assert pings >= 4  # every 0.2 s: half of WATCHDOG_USEC
        server.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in states:
            states += notify.recv(4096).decode().splitlines()
    finally:
        if server.poll() is None and "STOPPING=1" not in states:  # one SIGTERM, as systemd sends it
            server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=30)[0]
    assert server.returncode == 0, output


def _fake_nvidia_smi(folder, free_mib: int) -> None:
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho {free_mib}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_nvidia_preflight_falls_back_to_the_cpu_with_a_reason(tiny_fp32, tmp_path, monkeypatch):
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert nvidia_preflight("cpu", tiny_fp32, cuda) == ("cpu", None)
    assert nvidia_preflight("auto", tiny_fp32, ["CPUExecutionProvider"]) == ("auto", None)
    provider, reason = nvidia_preflight("auto", tiny_fp32, cuda, driver=tmp_path / "absent")
    assert provider == "cpu" and "driver is not loaded" in reason
    driver = tmp_path / "version"
    driver.write_text("NVRM version: 550\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    provider, reason = nvidia_preflight("cuda", tiny_fp32, cuda, driver=driver)
    assert provider == "cpu" and "nvidia-smi is not installed" in reason
    _fake_nvidia_smi(tmp_path, 1)
    provider, reason = nvidia_preflight("cuda", tiny_fp32, cuda, driver=driver)
    assert provider == "cpu" and "1 MiB free" in reason
    _fake_nvidia_smi(tmp_path, 80000)
    assert nvidia_preflight("cuda", tiny_fp32, cuda, driver=driver) == ("cuda", None)
