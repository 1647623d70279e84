"""`r1box model` as a real process for tests that kill it: started, asked how it is, killed with SIGKILL, and
restarted, the way systemd's Restart=always treats it on the box."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


class ModelProcess:
    def __init__(self, config: Path, port: int, env: dict | None = None):
        self.config, self.port, self.env = config, port, env
        self.process: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self, wait_s: float = 180) -> "ModelProcess":
        self.process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "model", "--config", str(self.config),
                                         "--port", str(self.port), "--log-format", "json"],
                                        env=self.env or dict(os.environ), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + wait_s
        while self.health() is None:
            assert self.process.poll() is None, self.process.stdout.read()
            assert time.monotonic() < deadline, f"r1box model on {self.port} not healthy in {wait_s} s"
            time.sleep(0.1)
        return self

    def health(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1) as resp:
                return json.load(resp)
        except OSError:
            return None

    def running(self) -> int:
        """Sequences the engine is decoding now."""
        answer = self.health()
        return answer["queue"]["running"] if answer else 0

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> str:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.communicate(timeout=30)[0]
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.communicate()[0] if self.process else ""
