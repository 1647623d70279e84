"""The image as one box of a hot-standby pair: [ha] on its CONFIG drive, booted in QEMU with its peer away. The pair's
behaviour (failover, fencing, the store following the address) is tests/test_ha.py's, on two namespaces; this is
the image's side of it: r1box-setup makes the pair's keys and writes them to the CONFIG drive for the other box,
r1box-ha.service runs in place of r1box.service, keepalived (fenced by ARP: nobody holds the address) takes the
virtual address, and serve answers WeChat on it, run as r1box beside litestream."""

import json

import pytest

from firmware_image.boot_check import LATER, box_disk, box_secrets, wechat_sim
from firmware_image.images import build
from firmware_image.vm import Vm

pytestmark = [pytest.mark.image, pytest.mark.slow]

# QEMU's user network: the guest is 10.0.2.15 by DHCP; nobody is at the peer's address or the virtual one
HA = """
[ha]
enabled = true
address = "10.0.2.15"
peer = "10.0.2.16"
virtual_address = "10.0.2.50/24"
priority = 150
"""
VIRTUAL = "10.0.2.50"
PAIR_FILES = {"r1box-ha.key", "r1box-ha.key.pub", "r1box-ha.key.host", "r1box-ha.key.host.pub", "r1box.keys"}

# serve, keepalived and sshd under the pair's unit, each with its user
PROCESSES = r"""for p in /proc/[0-9]*; do
  [ "$p" = /proc/$$ ] && continue
  cmd=$( { tr '\0' ' ' < $p/cmdline; } 2>/dev/null )  # a process gone meanwhile (litestream restarts) says nothing
  case "$cmd" in *"appliance.cli serve"*|*keepalived*|*sshd*) echo "$(stat -c %U $p) $cmd";;
  esac
done"""


def test_box_alone_takes_the_virtual_address_and_serves_on_it(tmp_path):
    env = box_secrets()
    image = build("amd64")
    with Vm(box_disk(image, tmp_path, env, HA), tmp_path, service_address=VIRTUAL) as vm:
        took = vm.wait_healthy(timeout=600)
        print(f"boot to healthy on the virtual address: {took:.1f} s ({vm.accel})")
        reply = wechat_sim(vm, env, "你好")
        assert reply and reply != LATER, vm.agent.run("journalctl -b -u r1box-ha --no-pager -o cat | tail -40")[1]

        rc, out = vm.agent.run("/opt/r1box/venv/bin/r1box ha status --config /run/r1box/config.toml")
        role = json.loads(out)
        assert rc == 0 and role["role"] == "active" and role["epoch"] == 1, out
        assert role["last_takeover"]["source"] == "new"
        vm.wait_for(lambda: "pair:        active, virtual address 10.0.2.50/24" in vm.serial(), 60,
                    "the pair's role in the console banner")
        # the model came up on its first start: its load holds the interpreter past WatchdogSec= under emulation, and
        # until READY=1 the watchdog is stretched (appliance/ops/systemd.py)
        rc, out = vm.agent.run("systemctl show r1box-model -p NRestarts --value")
        assert out.strip() == "0", vm.agent.run("journalctl -b -u r1box-model --no-pager -o cat | tail -20")[1]
        rc, out = vm.agent.run("systemctl is-active r1box.service r1box-ha.service; ls /config/ha-pair")
        lines = out.split()
        assert lines[:2] == ["inactive", "active"], out  # serve runs under the node, not its own unit
        assert set(lines[2:]) == PAIR_FILES, out

        rc, out = vm.agent.run(PROCESSES)
        users = {("serve" if "appliance.cli serve" in line else "keepalived" if "keepalived" in line else "sshd"):
                 line.split()[0] for line in out.splitlines()}
        assert users == {"serve": "r1box", "keepalived": "root", "sshd": "root"}, out
        # litestream, alone, starts again every few seconds and stops at dialling the peer: as r1box, it got that
        # far (its configuration, the pair's key and the store were readable)
        rc, out = vm.agent.run("stat -c %U /run/r1box/ha/litestream; journalctl -b -u r1box-ha -o cat | "
                               "grep -c 'dial tcp 10.0.2.16:22'; journalctl -b -u r1box-ha -o cat | "
                               "grep -ci 'permission denied'")
        assert out.split()[:1] == ["r1box"] and int(out.split()[1]) > 0 and out.split()[2] == "0", out
        rc, out = vm.agent.run("ss -ltnH")
        assert "10.0.2.15:22 " in out and "10.0.2.15:8090 " in out, out  # the replica sshd and the node's status
        rc, out = vm.agent.run("ls -ln /var/lib/r1box/db/r1box.db /var/lib/r1box/db/replica -d")
        assert all(line.split()[2] != "0" for line in out.splitlines()), out  # the store and the replica: r1box's
        for secret in env.values():
            assert secret not in vm.serial()
