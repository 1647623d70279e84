"""`r1box ha run`: one box of a hot-standby pair. It runs keepalived, the replica sshd and, while this box holds the
virtual address, `r1box serve` with litestream carrying the store to the peer. The box's `r1box model` runs apart
(its own unit) on both boxes, so the standby's model is loaded and warm when it takes over.

keepalived decides who is active; this node follows the state lines it writes:
- MASTER: take over. The newest copy of the store this box holds (its own, or the peer's last replicated one,
  whichever has the higher takeover epoch) becomes the store, a takeover row is added, litestream starts carrying it
  to the peer, and serve starts: pending questions, the outbox, dialog memory and the platform's de-duplication keys
  come with the store.
- BACKUP, FAULT, STOP: serve and litestream stop; the box follows the peer's copy as its own store every
  [ha] resync_s, so it never serves from a store older than what it received.
Health: keepalived asks every second (appliance/ha/keepalived.py); the box is healthy while its model answers, or
has been down for less than MODEL_GRACE_S (systemd restarts a crashed model well within it), or is still loading
after the box started (MODEL_LOAD_S: a slow box takes minutes, and serve keeps what arrives meanwhile).

Run as root (keepalived moves addresses, sshd switches users), the node starts serve and litestream as the owner of
the store's folder (the image's r1box user), and every store file it restores or writes is handed to that owner.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from aiohttp import web

from appliance.config import Config
from appliance.errors import HaError
from appliance.ha import keepalived, replication
from appliance.ha.pairing import PairFiles, sshd_command, sshd_config
from appliance.ops.health import probe
from appliance.store.database import lock_file, open_database

log = logging.getLogger(__name__)

MODEL_GRACE_S = 30.0  # the fault plan: a crashed model is restarted within 30 s, else the peer takes over
MODEL_LOAD_S = 600.0  # a model that has not answered since the node started is loading, up to this long
SERVE_RESTARTS = 3  # in RESTART_WINDOW_S, then the box gives the address up
RESTART_WINDOW_S = 60.0
FAILED_S = 30.0  # a takeover that failed: the box stays out this long, then may try again


def state_dir(config: Config) -> Path:
    return Path(config.ha.state_dir).expanduser() if config.ha.state_dir else config.store.file.parent / "ha"


def litestream_socket(config: Config) -> Path:
    """litestream's control socket, which serve's acknowledgements ask; in a folder of the store's owner, who runs
    both."""
    return state_dir(config) / "litestream" / "litestream.sock"


def read_role(config: Config) -> dict:
    """What the node last wrote of itself ({"role": "standby", ...}); {"role": "off"} when no node runs here."""
    try:
        return json.loads((state_dir(config) / "role.json").read_text())
    except (OSError, ValueError):
        return {"role": "off"}


class Node:
    def __init__(self, config: Config, config_file: Path):
        self.config, self.config_file, self.ha = config, config_file, config.ha
        self.db = config.store.file
        self.state = state_dir(config)
        self.files = PairFiles.of(self.ha, self.db)
        self.role, self.epoch, self.since = "starting", replication.epoch_of(self.db), time.time()
        self.takeovers: list[dict] = []
        self.keepalived: subprocess.Popen | None = None
        self.sshd: subprocess.Popen | None = None
        self.serve: subprocess.Popen | None = None
        self.litestream: subprocess.Popen | None = None
        self.serve_starts: list[float] = []
        self.model_down_since: float | None = None
        self.model_answered = False  # since the node started: before that, a silent model is one still loading
        self.litestream_failing = False
        self.degraded_since: float | None = None
        self.degraded, self.healthy = False, True
        self.replica_seen: tuple | None = None
        self.states: asyncio.Queue[str] = asyncio.Queue()
        self.store_lock = asyncio.Lock()
        self.stop = asyncio.Event()
        self.fatal = ""  # why the node stops by itself (systemd starts it again)
        self.failed: tuple[float, str] | None = None  # when and why the last takeover failed
        self.owner: tuple[int, int] | None = None  # who serve and litestream run as; None: as the node
        self.copy = replication.ReplicaBarrier(litestream_socket(config), self.db, self.ha.sync_timeout_s)
        self.replicated_at: float | None = None  # when the peer last confirmed it had the store's copy

    async def run(self) -> None:
        self.files.check()
        self.ha = await keepalived.with_interface(self.ha)
        # keepalived runs the check script only from a folder nobody else may write; serve may pass (role.json)
        self.state.mkdir(parents=True, exist_ok=True, mode=0o711)
        os.chmod(self.state, 0o711)
        self._prepare_folders()
        conf = keepalived.write(self.ha, self.state, self.files.auth_pass())
        try:
            self.sshd = _spawn(sshd_command(sshd_config(self.ha, self.state, self.files)), "sshd")
            await self._check_health()
            fifo = keepalived.fifo(self.state)
            fifo.unlink(missing_ok=True)
            self.keepalived = _spawn(keepalived.command(self.state), "keepalived")
            log.info("ha node %s: keepalived (%s) for %s with peer %s, priority %d", self.name, conf,
                     self.ha.virtual_address, self.ha.peer, self.ha.priority)
            loop = asyncio.get_running_loop()
            threading.Thread(target=self._read_fifo, args=(fifo, loop), daemon=True, name="r1box-ha-fifo").start()
            self._write_role()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop.set)
            await self.copy.start()
            status = await self._serve_status()
            tasks = [asyncio.create_task(self._follow_states()), asyncio.create_task(self._watch())]
            await self.stop.wait()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await status.cleanup()
        finally:
            await self._step_down("stopped")
            await self.copy.close()
            for process in (self.keepalived, self.sshd):
                _stop(process)
        if self.fatal:
            raise HaError(self.fatal)

    @property
    def name(self) -> str:
        return self.ha.node or socket.gethostname()

    def _prepare_folders(self) -> None:
        """litestream's folder and the pair's client key belong to the store's owner, who runs litestream; the
        replica folder to [ha] ssh_user, as whom the peer's litestream writes through this box's sshd."""
        replica = replication.replica_root(self.ha, self.db)
        replica.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.owner = replication.owner_of(self.db.parent)
        self._litestream_dir.mkdir(exist_ok=True, mode=0o700)
        if os.geteuid() != 0:
            return
        try:
            writer = pwd.getpwnam(self.ha.ssh_user)
            os.chown(replica, writer.pw_uid, writer.pw_gid)
        except KeyError:
            raise HaError(f"[ha] ssh_user {self.ha.ssh_user!r} is not a user of this box; the peer's litestream "
                          "logs in as it") from None
        if self.owner:
            for path in (self._litestream_dir, self.files.key):
                os.chown(path, *self.owner)

    def _read_fifo(self, fifo: Path, loop: asyncio.AbstractEventLoop) -> None:
        while not fifo.exists():
            if self.keepalived.poll() is not None:
                loop.call_soon_threadsafe(self.states.put_nowait, "EXITED")
                return
            time.sleep(0.05)
        with open(fifo) as lines:
            for line in lines:
                state = keepalived.parse(line)
                if state:
                    loop.call_soon_threadsafe(self.states.put_nowait, state)

    async def _follow_states(self) -> None:
        while True:
            state = await self.states.get()
            log.info("ha node %s: keepalived says %s", self.name, state)
            if state == "EXITED":
                self.fatal = ("keepalived exited at start; its output above says why (its configuration is "
                              f"{self.state / 'keepalived.conf'})")
                self.stop.set()
                return
            try:
                async with self.store_lock:  # a resync never swaps the store under a takeover
                    if state == "MASTER":
                        await self._take_over()
                    else:
                        await self._step_down({"BACKUP": "standby", "FAULT": "fault", "STOP": "stopped"}[state])
            except Exception as e:  # never a silent end: give the address up, try again after FAILED_S
                log.exception("ha node %s: %s failed (%s); giving the address up for %.0f s", self.name,
                              "the takeover" if state == "MASTER" else "stepping down", e, FAILED_S)
                self.failed = (time.monotonic(), str(e))
                await self._step_down("fault")

    async def _take_over(self) -> None:
        if self.role == "active":
            return
        started = time.monotonic()
        source, epoch = await asyncio.to_thread(self._newest_store)
        self.epoch = epoch + 1
        await asyncio.to_thread(self._record_takeover, source)
        _write(self._litestream_dir / "litestream.yml", replication.render(
            self.db, self.ha, self.epoch, self._socket, self.files.key, self.files.host_public()), 0o600,
            self.owner)
        replication.forget_position(self.db)  # a new epoch's copy starts from a whole snapshot
        # litestream is up in well under a second when the peer is there, before serve's first acknowledgement;
        # when the peer is dead it hangs dialling it, and serve must not wait for that
        self.litestream = self._start_litestream()
        self._start_serve()
        took = time.monotonic() - started
        self.takeovers.append({"at": time.time(), "epoch": self.epoch, "source": source, "took_s": round(took, 2)})
        self._set_role("active")
        log.info("ha node %s: active at epoch %d, the store from %s, in %.1f s", self.name, self.epoch, source, took)

    def _start_litestream(self, quiet: bool = False) -> subprocess.Popen:
        self._socket.unlink(missing_ok=True)
        return _spawn([replication.litestream_binary(), "replicate", "-config",
                       str(self._litestream_dir / "litestream.yml")], "litestream", self.owner, quiet)

    def _newest_store(self) -> tuple[str, int]:
        """The newer of this box's store and the peer's last copy becomes the store; its source and epoch."""
        theirs = replication.take_newer(replication.replica_root(self.ha, self.db), self.db)
        if theirs is not None:
            return "peer", theirs
        return ("own" if self.db.exists() else "new"), replication.epoch_of(self.db)

    def _record_takeover(self, source: str) -> None:
        db = open_database(self.db)
        try:
            db["ha_takeovers"].insert({"epoch": self.epoch, "node": self.name, "source": source, "at": time.time()})
        finally:
            db.conn.close()
        replication.hand_over(self.db, self.owner)

    async def _step_down(self, role: str) -> None:
        if self.serve or self.litestream:
            await asyncio.to_thread(_stop, self.serve, 20)
            await asyncio.to_thread(_stop, self.litestream, 10)  # litestream syncs once more as it stops
            self.serve = self.litestream = None
        self._set_role(role)

    def _start_serve(self) -> None:
        now = time.monotonic()
        self.serve_starts = [t for t in self.serve_starts if now - t < RESTART_WINDOW_S] + [now]
        self.serve = _spawn([sys.executable, "-m", "appliance.cli", "serve", "--config", str(self.config_file)],
                            "serve", self.owner)

    async def _watch(self) -> None:
        """Health for keepalived, a serve that died restarted (then given up), the active's copy to the peer
        checked (which also wakes litestream's reconnection, whose backoff grows to minutes), the standby's store
        kept fresh."""
        last_resync = last_sync = 0.0
        while True:
            try:
                await self._check_health()
                if self.role == "active" and time.monotonic() - last_sync >= self.ha.resync_s:
                    last_sync = time.monotonic()
                    await self._check_copy()
                if self.role == "active" and self.serve and self.serve.poll() is not None:
                    log.error("ha node %s: serve exited with %s", self.name, self.serve.returncode)
                    if len(self.serve_starts) < SERVE_RESTARTS:
                        self._start_serve()
                if self.role in ("standby", "fault") and time.monotonic() - last_resync >= self.ha.resync_s:
                    last_resync = time.monotonic()
                    async with self.store_lock:
                        if self.role != "active":
                            await asyncio.to_thread(self._resync)
            except HaError as e:  # a copy that will not restore yet (its first snapshot on the way)
                log.warning("ha node %s: %s", self.name, e)
            except Exception:  # a round that failed is logged; the next one runs
                log.exception("ha node %s: a health round failed", self.name)
            await asyncio.sleep(self.ha.health_every_s)

    async def _check_copy(self) -> None:
        if self.litestream and self.litestream.poll() is not None:
            # it exits when it cannot reach the peer at start (a takeover from a dead box): said once, then
            # started again quietly every resync_s until the peer is back
            if not self.litestream_failing:
                log.warning("ha node %s: litestream exited with %s; starting it again every %.0f s until the peer "
                            "answers", self.name, self.litestream.returncode, self.ha.resync_s)
            self.litestream_failing = True
            self.litestream = self._start_litestream(quiet=True)
        if await self.copy.reached_peer():
            self.litestream_failing = False
            self.replicated_at = time.time()
            self._write_role()

    async def _check_health(self) -> None:
        """Healthy while the model answers (or has been down less than MODEL_GRACE_S) and serve runs; a degraded
        model (its GPU failed, answers from the CPU) hands over only to a peer that says it is healthy and not
        degraded itself, after degraded_grace_s: a slow answer beats none."""
        answer = await asyncio.to_thread(probe, self.config.model_server.own_url, 2.0)
        now = time.monotonic()
        self.model_down_since = None if answer else (self.model_down_since or now)
        self.model_answered = self.model_answered or answer is not None
        degraded = bool(answer) and answer.get("status") == "degraded"
        self.degraded_since = (self.degraded_since or now) if degraded else None
        self.degraded = degraded
        problem = None
        if self.failed and now - self.failed[0] < FAILED_S:
            problem = f"the takeover failed ({self.failed[1]})"
        elif answer is None and now - self.model_down_since >= (MODEL_GRACE_S if self.model_answered
                                                               else MODEL_LOAD_S):
            problem = f"the model has not answered for {now - self.model_down_since:.0f} s"
        elif self.role == "active" and self.serve and self.serve.poll() is not None \
                and len(self.serve_starts) >= SERVE_RESTARTS:
            problem = f"serve exited {SERVE_RESTARTS} times in {RESTART_WINDOW_S:.0f} s"
        elif degraded and now - self.degraded_since >= self.ha.degraded_grace_s:
            peer = await asyncio.to_thread(_peer_status, self.ha)
            if peer and peer.get("healthy") and not peer.get("degraded"):
                problem = f"the model is degraded ({answer.get('fallback_reason')}) and the peer is healthy"
        healthy = keepalived.health_file(self.state)
        self.healthy = problem is None
        if self.healthy:
            healthy.touch()
        elif healthy.exists():
            healthy.unlink()
            log.error("ha node %s: unhealthy: %s; keepalived hands the address to the peer", self.name, problem)

    def _resync(self) -> None:
        """The standby's store becomes the peer's newest copy, when that has changed (and nobody holds the store:
        a backup or a command running here skips one round)."""
        root = replication.replica_root(self.ha, self.db)
        found = replication.newest(root)
        if not found:
            return
        seen = (found[0], max((p.stat().st_mtime_ns for p in found[1].rglob("*") if p.is_file()), default=0))
        if seen == self.replica_seen:
            return
        fd = os.open(lock_file(self.db), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            theirs = replication.take_newer(root, self.db)
            if theirs is not None:
                replication.hand_over(self.db, self.owner)
                self.epoch, self.replica_seen = theirs, seen
                self._write_role()
        finally:
            os.close(fd)

    async def _serve_status(self) -> web.AppRunner:
        """GET /ha on [ha] address and status_port: what the peer asks before it hands its address over."""
        async def status(request: web.Request) -> web.Response:
            return web.json_response({"node": self.name, "role": self.role, "healthy": self.healthy,
                                      "degraded": self.degraded, "epoch": self.epoch})

        app = web.Application()
        app.router.add_get("/ha", status)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.ha.address, self.ha.status_port).start()
        return runner

    @property
    def _socket(self) -> Path:
        return litestream_socket(self.config)

    @property
    def _litestream_dir(self) -> Path:
        return self._socket.parent

    def _set_role(self, role: str) -> None:
        if role != self.role:
            self.role, self.since = role, time.time()
        self._write_role()

    def _write_role(self) -> None:
        _write(self.state / "role.json", json.dumps({
            "role": self.role, "node": self.name, "since": self.since, "epoch": self.epoch,
            "virtual_address": self.ha.virtual_address, "peer": self.ha.peer,
            "last_takeover": self.takeovers[-1] if self.takeovers else None, "replicated_at": self.replicated_at,
            "pid": os.getpid(),
        }), 0o644)


def _peer_status(ha) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{ha.peer}:{ha.status_port}/ha", timeout=2) as resp:
            return json.load(resp)
    except (OSError, ValueError):
        return None


def _spawn(argv: list[str], name: str, owner: tuple[int, int] | None = None, quiet: bool = False
           ) -> subprocess.Popen:
    log.log(logging.DEBUG if quiet else logging.INFO, "starting %s: %s", name, " ".join(argv[:3]))
    as_owner = {"user": owner[0], "group": owner[1], "extra_groups": []} if owner else {}
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, **as_owner)
    except FileNotFoundError:
        raise HaError(f"{argv[0]} is not installed; `just ha-tools` (or apt-get install keepalived "
                      "openssh-server arping) installs what a pair needs.") from None


def _stop(process: subprocess.Popen | None, wait_s: float = 10) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(wait_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _write(path: Path, text: str, mode: int, owner: tuple[int, int] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    if owner:
        os.chown(tmp, *owner)
    os.replace(tmp, path)
