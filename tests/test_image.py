"""The firmware image, built by `just image` (or reused from ~/.cache/r1box/image) and booted for real in QEMU:
its partition layout; one boot that serves a WeChat message, outlives a killed model process and shows the
restart policy; and, as a drill (`just drill`), one that installs an update, keeps it, then installs a broken one
and watches the box go back to the previous slot by itself."""

import subprocess
import time
from pathlib import Path

import pytest

from appliance.admin.tls import fingerprint
from firmware_image.boot_check import LATER, box_disk, box_secrets, wechat_sim
from firmware_image.images import build
from firmware_image.vm import Vm, partitions

pytestmark = [pytest.mark.image, pytest.mark.slow]

ROOT_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"


@pytest.fixture(scope="session")
def image() -> Path:
    return build("amd64")


def test_partition_layout(image):
    parts = partitions(image)
    assert list(parts) == ["esp", "root-a", "root-b", "config", "data"]
    assert parts["esp"]["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" and parts["esp"]["size"] * 512 >= 256 << 20
    assert parts["root-a"]["type"] == parts["root-b"]["type"] == ROOT_TYPE
    assert parts["root-a"]["size"] == parts["root-b"]["size"]
    assert parts["config"]["type"] == "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"  # Windows shows it as a drive
    kinds = {}
    for name, part in parts.items():
        probe = subprocess.run(["blkid", "--probe", "--offset", str(part["start"] * 512), "--size",
                                str(part["size"] * 512), "-o", "export", str(image)], capture_output=True, text=True)
        kinds[name] = dict(line.split("=", 1) for line in probe.stdout.split()).get("TYPE")
    assert kinds == {"esp": "vfat", "root-a": "ext4", "root-b": None, "config": "vfat", "data": "ext4"}
    config = subprocess.run(["mdir", "-b", "-i", f"{image}@@{parts['config']['start'] * 512}", "::/"],
                            capture_output=True, text=True, check=True).stdout
    assert "config.toml" in config and "secrets.env" in config
    assert (image.parent / f"{image.stem}.root.ext4").exists()


def _unit(vm: Vm, name: str = "r1box") -> dict:
    rc, out = vm.agent.run(f"systemctl show {name} -p MainPID,ActiveState,SubState,Result,NRestarts")
    assert rc == 0, out
    return dict(line.split("=", 1) for line in out.split())


def _journal(vm: Vm) -> str:
    """The services' last log lines, for a failure's message."""
    return vm.agent.run("journalctl -b -u r1box -u r1box-model --no-pager -o cat | tail -40")[1]


def test_box_serves_wechat_and_keeps_its_restart_policy(image, tmp_path):
    env = box_secrets()
    with Vm(box_disk(image, tmp_path, env), tmp_path) as vm:
        took = vm.wait_healthy(timeout=600)
        print(f"boot to healthy: {took:.1f} s ({vm.accel})")
        reply = wechat_sim(vm, env, "你好")
        assert reply and reply != LATER, _journal(vm)
        vm.wait_for(lambda: "r1box is up on slot a" in vm.serial(), 60, "the console banner")
        # the fingerprint on the console is that of the certificate first boot made on the data partition
        rc, pem = vm.agent.run("cat /var/lib/r1box/keys/cert.pem")
        assert rc == 0
        (tmp_path / "cert.pem").write_text(pem)
        assert vm.fingerprint() == fingerprint(tmp_path / "cert.pem")
        for secret in env.values():
            assert secret not in vm.serial()
        rc, security = vm.agent.run("systemd-analyze security r1box.service --no-pager | tail -1")
        print(security.strip())

        # the model process killed: systemd restarts it, serve lives on and finds it again (answers across a kill
        # are tests/test_model_crash.py's, without the emulator's minutes a question)
        model = _unit(vm, "r1box-model")
        assert model["ActiveState"] == "active" and model["NRestarts"] == "0"
        vm.agent.run(f"kill -9 {model['MainPID']}")
        vm.wait_for(lambda: (h := vm.healthz()) and h["status"] == "degraded", 60, "serve seeing its model gone")
        vm.wait_for(lambda: (u := _unit(vm, "r1box-model"))["ActiveState"] == "active" and u["MainPID"] not in
                    ("0", model["MainPID"]) and u, 300, "the model's restart")
        vm.wait_for(lambda: (h := vm.healthz()) and h["backends"][0]["state"] == "up", 60, "serve finding it again")
        assert _unit(vm)["NRestarts"] == "0" and _unit(vm, "r1box-model")["NRestarts"] == "1"

        # one crash of serve: systemd restarts it, and it comes back healthy
        first = _unit(vm)
        assert first["ActiveState"] == "active" and first["NRestarts"] == "0"
        vm.agent.run(f"kill -9 {first['MainPID']}")
        unit = vm.wait_for(lambda: (u := _unit(vm))["ActiveState"] == "active" and u["MainPID"] not in
                           ("0", first["MainPID"]) and u, 300, "the restart after one crash")
        assert unit["NRestarts"] == "1"
        vm.wait_healthy(timeout=300)
        restarted = time.monotonic()

        # three crashes within 30 s (once the window of the last start has passed): failed, and it says so
        time.sleep(max(0.0, 31 - (time.monotonic() - restarted)))
        started, pid = time.monotonic(), unit["MainPID"]
        for crash in range(3):
            vm.agent.run(f"kill -9 {pid}")
            if crash < 2:
                pid = vm.wait_for(lambda: (u := _unit(vm))["MainPID"] not in ("0", pid) and u["MainPID"], 30,
                                  f"the restart after crash {crash + 1}")
        final = vm.wait_for(lambda: (u := _unit(vm))["ActiveState"] == "failed" and u, 30, "the failed state")
        assert time.monotonic() - started < 30
        assert final["Result"] in ("signal", "start-limit-hit")  # systemd 252 keeps the last crash's result
        rc, journal = vm.agent.run("journalctl -b -u r1box --no-pager")
        assert "Start request repeated too quickly" in journal
        vm.wait_for(lambda: "r1box FAILED" in vm.serial(), 30, "the failure on the console")
        assert vm.healthz() is None


@pytest.mark.drill  # two updates and four boots under emulation: about 20 minutes
def test_update_is_kept_when_healthy_and_rolled_back_when_broken(image, tmp_path):
    good = image.parent / f"{image.stem}.root.ext4"
    broken = tmp_path / "broken.root.ext4"
    subprocess.run(["cp", "--sparse=always", str(good), str(broken)], check=True)
    # a runtime that cannot start: the service fails, the health check with it
    subprocess.run(["debugfs", "-w", "-R", "rm /opt/r1box/venv/bin/r1box", str(broken)], check=True,
                   capture_output=True)
    env = box_secrets()
    with Vm(box_disk(image, tmp_path, env), tmp_path, extra_disks=[good, broken]) as vm:
        vm.wait_healthy(timeout=600)

        def booted(slot: str, entry: str):
            rc, out = vm.agent.run("cat /proc/cmdline; ls /efi/loader/entries")
            health = vm.healthz()
            return rc == 0 and f"r1box.slot={slot}" in out and entry in out.split() and health \
                and health["status"] == "ok" and out

        rc, out = vm.agent.run("r1box-update /dev/vdb --no-reboot", timeout=600)
        assert rc == 0, out
        vm.reboot()
        entries = vm.wait_for(lambda: booted("b", "r1box-b.conf"), 600, "slot b booted, healthy and marked good")
        assert "r1box-a.conf" in entries.split()  # the previous slot stays as the fallback

        rc, out = vm.agent.run("r1box-update /dev/vdc --no-reboot", timeout=600)
        assert rc == 0, out
        vm.reboot()
        entries = vm.wait_for(lambda: booted("b", "r1box-a+0-3.conf"), 900, "back on slot b after 3 failed tries")
        assert vm.serial().count("this slot is on trial; rebooting") == 3
        assert wechat_sim(vm, env, "还在吗") != LATER
