"""Two boxes of a hot-standby pair on one machine: a network namespace each, joined to a bridge in this namespace (the
office's router, where the tests' fake WeChat API listens), each running `r1box model` on the real 0.5B and
`r1box ha run` (keepalived, sshd, serve and litestream while active). Root only: namespaces, veths, keepalived."""

from __future__ import annotations

import asyncio
import base64
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

import aiohttp
import pytest

from appliance.wechat.envelope import Account
from appliance.wechat.sim import Platform, text_message
from tests.fake_wechat_api import FakeWeChatApi

APP_ID = "wx-ha"
KEY = base64.b64encode(bytes(range(40, 72))).decode().rstrip("=")
PLATFORM = Platform(Account("mp", APP_ID, "ha-token", KEY), "safe")
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
        self.kill_processes()
        ip("-n", self.ns, "link", "set", "eth0", "down")

    def kill_processes(self) -> None:
        for pid in ip("netns", "pids", self.ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.processes.clear()

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
        self.start_model(box)
        box.run("ha", "ha", "run", env=self.env)

    def start_model(self, box: Box) -> None:
        box.run("model", "model", env=self.env)

    def serve_health(self, timeout: float = 2.0) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://{self.vip}:8080/healthz", timeout=timeout) as resp:
                return json.load(resp)
        except (OSError, ValueError):
            return None

    def tear_down(self) -> None:
        for box in self.boxes:
            box.kill_processes()
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


@pytest.fixture(scope="module")
def artifact():
    from export.artifacts import cached_artifact

    return cached_artifact("qwen2.5-coder-0.5b-instruct")


@pytest.fixture
async def pair(tmp_path, artifact, aiohttp_server):
    """Two boxes configured and paired, nothing started; the platform's fake API on the router as .api."""
    pair = Pair(tmp_path, artifact, APP_ID, KEY).build()
    try:
        pair.api = FakeWeChatApi()
        pair.api.server = await aiohttp_server(pair.api.app, host=pair.router)
        pair.configure(pair.api.server.port)
        yield pair
    finally:
        pair.tear_down()


async def started(pair: Pair) -> None:
    """Both boxes up: a active and serving at the address, b standby with its model loaded. a starts first: two
    boxes started together elect the higher priority only when neither is more than a fraction of a second ahead."""
    a, b = pair.boxes
    pair.start(a)
    assert await asyncio.to_thread(until, lambda: a.role()["role"] == "active", 240, 0.2), pair.logs()
    pair.start(b)
    assert await asyncio.to_thread(until, lambda: a.role()["role"] == "active" and pair.serve_health(), 240, 0.5), \
        pair.logs()
    assert await asyncio.to_thread(until, lambda: b.role()["role"] == "standby" and b.model_healthy(), 240, 0.5), \
        pair.logs()


def platform_session() -> aiohttp.ClientSession:
    """The platform's HTTP client: a new connection for every delivery. A kept-alive one would outlive a failover
    and be reset by the box that took the address over, a failure no retry of the platform's would meet."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


class Users:
    """The platform's side of a conversation with the pair: messages delivered as the platform does (up to three
    tries, each waiting 5 s for a reply, the next 5 s after), and what each user got back, passively or pushed."""

    def __init__(self, pair: Pair, session: aiohttp.ClientSession):
        self.pair, self.session = pair, session
        self.url = f"http://{pair.vip}:8080/wechat"
        self.taken: dict[str, int] = {}  # user: the try that was taken, 0 when none was (lost at the platform)
        self.passive: dict[str, str] = {}
        self.failed: list[str] = []  # each try that was not taken, and why
        self._ids = 7000

    async def ask(self, user: str, text: str) -> int:
        self._ids += 1
        msg_id = self._ids
        for attempt in range(1, 4):
            request = PLATFORM.message(text_message(APP_ID, user, text, msg_id))
            try:
                async with self.session.post(f"{self.url}?{request.query}", data=request.body,
                                             timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    body = await resp.text()
                    if resp.status == 200:
                        reply = PLATFORM.read_reply(body)
                        if reply:
                            self.passive[user] = reply
                        self.taken[user] = attempt
                        return attempt
                    self.failed.append(f"{user} try {attempt}: {resp.status} {body[:100]}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                self.failed.append(f"{user} try {attempt}: {e!r}")
            await asyncio.sleep(5)
        self.taken[user] = 0
        return 0

    def answers(self, user: str) -> list[str]:
        pushed = [s["text"]["content"] for s in self.pair.api.sent if s["touser"] == user]
        return ([self.passive[user]] if user in self.passive else []) + pushed

    async def all_answered(self, seconds: float) -> bool:
        """Every user whose message was taken has an answer (then 3 s more, for a wrong second push to show)."""
        def done():
            return all(self.answers(u) for u, t in self.taken.items() if t)
        ok = await asyncio.to_thread(until, done, seconds, 0.5)
        await asyncio.sleep(3)
        return ok is not None

    def tally(self) -> dict:
        counts = [len(self.answers(u)) for u in self.taken]
        return {"sent": len(self.taken), "answered": sum(c >= 1 for c in counts),
                "lost": sum(c == 0 for c in counts), "twice": sum(c > 1 for c in counts)}
