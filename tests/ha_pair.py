"""Two boxes of a hot-standby pair on one machine: a network namespace each, joined to a bridge in this namespace (the
office's router, where the tests' fake WeChat API listens), each running `r1box model` on the real 0.5B and
`r1box ha run` (keepalived, sshd, serve and litestream while active). Root only: namespaces, veths, keepalived."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

SECRETS = {"R1BOX_WECHAT_TOKEN": "ha-token", "R1BOX_WECHAT_ENCODING_AES_KEY": "",
           "R1BOX_WECHAT_APP_SECRET": "ha-secret"}


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class Box:
    name: str
    ns: str
    address: str
    root: Path
    config: Path = None
    processes: dict = field(default_factory=dict)
    logs: dict = field(default_factory=dict)

    @property
    def db(self) -> Path:
        return self.root / "data" / "r1box.db"

    def run(self, what: str, *argv: str, env: dict) -> None:
        log = open(self.root / f"{what}.log", "ab")
        self.logs[what] = self.root / f"{what}.log"
        self.processes[what] = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-m",
                                                 "appliance.cli", *argv, "--config", str(self.config)],
                                                stdout=log, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True)

    def role(self) -> dict:
        try:
            return json.loads((self.db.parent / "ha" / "role.json").read_text())
        except (OSError, ValueError):
            return {"role": "off"}

    def holds(self, vip: str) -> bool:
        out = ip("-n", self.ns, "-4", "-o", "addr", "show", "dev", "eth0", check=False).stdout
        return f" {vip}/" in out

    def kill_all(self) -> None:
        """The whole box dies: every process of its namespace, and its link (a dead box answers no ARP)."""
        pids = ip("netns", "pids", self.ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.processes.values():
            process.wait(timeout=30)
        self.processes.clear()
        ip("-n", self.ns, "link", "set", "eth0", "down")

    def model_healthy(self) -> bool:
        ask = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=2)"
        return subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", ask],
                              capture_output=True).returncode == 0

    def table_rows(self, table: str) -> int:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        finally:
            conn.close()

    def epoch(self) -> int:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT max(epoch) FROM ha_takeovers").fetchone()[0] or 0
        finally:
            conn.close()


class Pair:
    """The LAN 10.79.N.0/24: the bridge .254 here, box a .1 (priority 150), box b .2 (100), the address .100."""

    def __init__(self, root: Path, artifact: Path, app_id: str, aes_key: str):
        self.tag = f"{os.getpid() % 10000}"
        self.net = f"10.79.{os.getpid() % 200 + 1}"
        self.bridge = f"r1br{self.tag}"
        self.vip = f"{self.net}.100"
        self.root, self.artifact, self.app_id = root, artifact, app_id
        self.env = {**os.environ, **SECRETS, "R1BOX_WECHAT_ENCODING_AES_KEY": aes_key}
        self.boxes = [Box("a", f"r1ha{self.tag}a", f"{self.net}.1", root / "a"),
                      Box("b", f"r1ha{self.tag}b", f"{self.net}.2", root / "b")]

    @property
    def router(self) -> str:
        return f"{self.net}.254"

    def build(self) -> "Pair":
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.router}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for box in self.boxes:
            ip("netns", "add", box.ns)
            ip("link", "add", f"{box.ns}h", "type", "veth", "peer", "name", "eth0", "netns", box.ns)
            ip("link", "set", f"{box.ns}h", "master", self.bridge, "up")
            ip("-n", box.ns, "addr", "add", f"{box.address}/24", "dev", "eth0")
            ip("-n", box.ns, "link", "set", "eth0", "up")
            ip("-n", box.ns, "link", "set", "lo", "up")
            ip("-n", box.ns, "route", "add", "default", "via", self.router)
        return self

    def configure(self, api_port: int) -> None:
        """Both boxes' configurations, the platform's API at api_port on the router; then the pair's keys."""
        for box, peer, priority in ((self.boxes[0], self.boxes[1], 150), (self.boxes[1], self.boxes[0], 100)):
            box.root.mkdir(parents=True, exist_ok=True)
            box.config = box.root / "r1box.toml"
            box.config.write_text(self._config(box, peer, priority, api_port))
        self._pair()

    def _config(self, box: Box, peer: Box, priority: int, api_port: int) -> str:
        return f"""[model]
artifact = "{self.artifact}"
threads = 1
[engine]
max_batch = 4
max_length = 1024
[server]
host = "0.0.0.0"
tls = "off"
[wechat]
app_id = "{self.app_id}"
delivery = "push"
deadline_s = 1.0
api_base_url = "http://{self.router}:{api_port}"
[dialog]
max_tokens = 32
rate_per_minute = 0
[metrics]
port = 0
[admin]
port = 0
[store]
path = "{box.db}"
[ha]
enabled = true
node = "{box.name}"
interface = "eth0"
address = "{box.address}"
peer = "{peer.address}"
virtual_address = "{self.vip}/24"
priority = {priority}
ssh_port = 2222
ssh_user = "root"
replica_dir = "{box.root / 'replica'}"
peer_replica_dir = "{peer.root / 'replica'}"
resync_s = 2.0
"""

    def _pair(self) -> None:
        """`r1box ha pair` on box a; its files and the store's key file copied to b (the CONFIG drive's job)."""
        a, b = self.boxes
        out = subprocess.run([sys.executable, "-m", "appliance.cli", "ha", "pair", "--config", str(a.config)],
                             capture_output=True, text=True, env=self.env, check=True).stdout
        for line in out.splitlines():
            path = line.strip()
            if path.startswith(str(a.root)):
                target = b.root / Path(path).relative_to(a.root)
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                shutil.copy2(path, target)

    def start(self, box: Box) -> None:
        box.run("model", "model", env=self.env)
        box.run("ha", "ha", "run", env=self.env)

    def serve_health(self, timeout: float = 2.0) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://{self.vip}:8080/healthz", timeout=timeout) as resp:
                return json.load(resp)
        except (OSError, ValueError):
            return None

    def tear_down(self) -> None:
        for box in self.boxes:
            pids = ip("netns", "pids", box.ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for process in box.processes.values():
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            ip("netns", "del", box.ns, check=False)
            ip("link", "del", f"{box.ns}h", check=False)
        ip("link", "del", self.bridge, check=False)

    def logs(self) -> str:
        out = []
        for box in self.boxes:
            for what, path in box.logs.items():
                text = path.read_text(errors="replace") if path.exists() else ""
                out.append(f"--- box {box.name} {what} (last 3000 chars) ---\n{text[-3000:]}")
        return "\n".join(out)


def until(condition, seconds: float, every: float = 0.1) -> float | None:
    """Seconds until `condition()` held, or None when it did not within `seconds`."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if condition():
            return time.monotonic() - start
        time.sleep(every)
    return None
