"""The image in QEMU, for `just image-test` and tests/test_image.py: UEFI firmware (OVMF, or AAVMF for arm64), KVM
when /dev/kvm works and TCG otherwise, user-mode networking with the service's port forwarded, the serial console in
a file, and the QEMU guest agent to run commands inside the box (virtio-serial: a real box has no such port, so no
such door).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.ops import health


@dataclass(frozen=True)
class Machine:
    """What QEMU emulates for one of the image's architectures."""

    qemu: str
    machine: str
    firmware: Path  # UEFI code (read-only) and its variable store, copied per boot
    variables: Path
    native: str  # `uname -m` of a host that can run it under KVM


MACHINES = {
    "amd64": Machine("qemu-system-x86_64", "q35", Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
                     Path("/usr/share/OVMF/OVMF_VARS_4M.fd"), "x86_64"),
    "arm64": Machine("qemu-system-aarch64", "virt", Path("/usr/share/AAVMF/AAVMF_CODE.fd"),
                     Path("/usr/share/AAVMF/AAVMF_VARS.fd"), "aarch64"),
}


_kvm: dict[str, bool] = {}


def kvm_works(arch: str = "amd64") -> bool:
    """/dev/kvm opens, the host is of the image's architecture, and the firmware runs under it: some nested hosts
    expose a KVM that fails OVMF's first instructions ("KVM internal error"), so a few seconds of real firmware
    decide, once per process."""
    if arch not in _kvm:
        _kvm[arch] = os.uname().machine == MACHINES[arch].native and os.access("/dev/kvm", os.R_OK | os.W_OK) \
            and _firmware_runs_under_kvm(MACHINES[arch])
    return _kvm[arch]


def _firmware_runs_under_kvm(m: Machine) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        vars_file = Path(tmp) / "vars.fd"
        shutil.copy(m.variables, vars_file)
        probe = subprocess.Popen(
            [m.qemu, "-machine", m.machine, "-accel", "kvm", "-cpu", "host", "-m", "256",
             "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={m.firmware}",
             "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}", "-display", "none", "-monitor", "none",
             "-serial", "none", "-nodefaults"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            probe.wait(5)
            return False
        except subprocess.TimeoutExpired:
            probe.kill()  # QEMU pauses rather than exits on a KVM error: its words tell
            return "KVM internal error" not in probe.communicate()[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def partitions(disk: Path) -> dict[str, dict]:
    """The GPT's partitions by name, as sfdisk reads them (start and size in 512-byte sectors)."""
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    return {p["name"]: p for p in table["partitions"]}


def prepare_disk(image: Path, dest: Path, files: dict[str, str]) -> Path:
    """A sparse copy of the image with `files` written onto its CONFIG drive, as a person would from a PC."""
    subprocess.run(["cp", "--sparse=always", str(image), str(dest)], check=True)
    offset = partitions(dest)["config"]["start"] * 512
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            path = Path(tmp) / name
            path.write_text(text.replace("\n", "\r\n"))
            subprocess.run(["mcopy", "-o", "-i", f"{dest}@@{offset}", str(path), f"::/{name}"], check=True)
    return dest


class GuestAgent:
    """Just enough of the QEMU guest agent's protocol to run a command and read its output."""

    def __init__(self, path: Path):
        self.path, self.ids = path, itertools.count(1)

    def _call(self, sock: socket.socket, reader, message: dict) -> dict:
        sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            line = reader.readline()
            if not line:
                raise ConnectionError("guest agent closed the connection")
            reply = json.loads(line)
            if "error" in reply:
                raise RuntimeError(f"guest agent: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def run(self, command: str, timeout: float = 120) -> tuple[int, str]:
        """`sh -c command` in the guest: its exit status and its stdout+stderr."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.path))
            reader = sock.makefile("rb")
            sync = next(self.ids) + int(time.time())
            # a reply an earlier, interrupted client never read may come first: wait for this sync's own
            while self._call(sock, reader, {"execute": "guest-sync", "arguments": {"id": sync}}) != sync:
                pass
            pid = self._call(sock, reader, {"execute": "guest-exec", "arguments": {
                "path": "/bin/sh", "arg": ["-c", command + " 2>&1"], "capture-output": True}})["pid"]
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                status = self._call(sock, reader, {"execute": "guest-exec-status", "arguments": {"pid": pid}})
                if status["exited"]:
                    out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
                    return status.get("exitcode", -1), out
                time.sleep(0.3)
        raise TimeoutError(f"guest command did not finish in {timeout} s: {command}")


class Vm:
    def __init__(self, disk: Path, workdir: Path, extra_disks: list[Path] = (), memory_mib: int = 2048,
                 arch: str = "amd64", service_address: str = ""):
        """service_address: the guest address the service port is forwarded to (a pair's virtual address on
        QEMU's 10.0.2.0/24); empty: the address DHCP gives the guest."""
        self.disk, self.workdir, self.extra_disks, self.memory_mib = disk, workdir, list(extra_disks), memory_mib
        self.service_address = service_address
        self.machine = MACHINES[arch]
        self.port = free_port()
        self.serial_log = workdir / "serial.log"
        self.agent = GuestAgent(workdir / "qga.sock")
        self.accel = "kvm" if kvm_works(arch) else "tcg"
        self.process: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> Vm:
        m = self.machine
        vars_file = self.workdir / "UEFI_VARS.fd"
        shutil.copy(m.variables, vars_file)
        # TCG with a thread per vCPU lost a cross-vCPU code patch once in a few boots here (CPU 0 spinning in
        # the int3 handler at 1 s, an RCU stall, no boot); one thread for both vCPUs keeps such patches ordered
        accel = "tcg,thread=single" if self.accel == "tcg" else self.accel
        command = [
            m.qemu, "-machine", m.machine, "-accel", accel,
            "-cpu", "host" if self.accel == "kvm" else "max", "-smp", "2", "-m", str(self.memory_mib),
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={m.firmware}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}",
            "-drive", f"if=virtio,format=raw,file={self.disk}",
            "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.port}-{self.service_address}:8080",
            "-device", "virtio-net-pci,netdev=net0",
            "-chardev", f"socket,path={self.agent.path},server=on,wait=off,id=qga0",
            "-device", "virtio-serial", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-serial", f"file:{self.serial_log}", "-display", "none", "-monitor", "none",
        ]
        for extra in self.extra_disks:  # /dev/vdb, /dev/vdc...: update images, as a USB stick would bring them
            command += ["-drive", f"if=virtio,format=raw,readonly=on,file={extra}"]
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=open(self.workdir / "qemu.log", "w"), stderr=subprocess.STDOUT)
        return self

    def serial(self) -> str:
        return self.serial_log.read_text(errors="replace") if self.serial_log.exists() else ""

    @property
    def url(self) -> str:
        """The service as the office sees it: TLS 1.3, since it listens beyond loopback."""
        return f"https://127.0.0.1:{self.port}"

    def fingerprint(self, timeout: float = 120) -> str:
        """The certificate's SHA-256 as the box's console banner shows it (what a person would check)."""
        found = self.wait_for(lambda: re.search(r"certificate: ((?:[0-9A-F]{2}:){31}[0-9A-F]{2})", self.serial()),
                              timeout, "the certificate's fingerprint on the console")
        return found.group(1)

    def healthz(self) -> dict | None:
        # a probe of health only, as the box's own check asks: the answer is trusted by the fingerprint where it
        # matters (wechat-sim)
        return health.probe(self.url)

    def wait_healthy(self, timeout: float) -> float:
        """Seconds from now until /healthz answers ok."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.process.poll() is not None:
                log = (self.workdir / "qemu.log").read_text()
                raise RuntimeError(f"QEMU exited ({self.process.returncode}): {log}")
            health = self.healthz()
            if health and health["status"] == "ok":
                return time.monotonic() - start
            time.sleep(1)
        raise TimeoutError(f"no healthy /healthz in {timeout:.0f} s; serial log: {self.serial_log}")

    def reboot(self) -> None:
        """Reboot the guest two seconds from now, so that the agent answers before it goes down."""
        rc, out = self.agent.run("systemd-run --on-active=2s --timer-property=AccuracySec=100ms systemctl reboot")
        if rc != 0:
            raise RuntimeError(f"reboot not scheduled: {out.strip()}")

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                found = predicate()
            except (OSError, RuntimeError, ValueError):  # the guest is rebooting: no agent for a while
                found = None
            if found:
                return found
            time.sleep(2)
        raise TimeoutError(f"{what}: not within {timeout:.0f} s; serial log: {self.serial_log}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Vm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
