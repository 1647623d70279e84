"""keepalived's side of the pair: its configuration, the fence it runs every second, and the state lines it writes.

Both boxes start as BACKUP with nopreempt, so the address goes to the higher priority when both start and is never
taken back afterwards: a box that comes back after a failure stays standby. Health and fencing are one
`vrrp_script` with weight 0, so a failure puts the instance in FAULT (a priority drop would not move the address
under nopreempt):

- the node's health file, written by the node (appliance/ha/node.py) while the box's model answers;
- the fence: a box that cannot reach its peer may take the address only if nobody on the LAN answers ARP for it.
  VRRP runs over IP, so a cut between the two boxes that leaves both on the router's segment would otherwise make
  both MASTER; ARP's duplicate address detection (arping -D) still sees the holder there, and the box that would
  take the address goes to FAULT instead, in about a second, before its own down timer (3 adverts) runs out.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import shlex
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from appliance.errors import HaError
from appliance.ha.settings import HaConfig

log = logging.getLogger(__name__)

INSTANCE = "r1box"
ADDRESS_WAIT_S = 120.0  # [ha] interface left empty: how long the node waits for DHCP to give the box its address

# keepalived runs scripts only from paths nobody else may write; exit 1 puts the instance in FAULT
FENCE = """#!/bin/sh
# r1box's health and fence check for keepalived (appliance/ha/keepalived.py): exit 0 healthy, 1 FAULT.
[ -e {healthy} ] || exit 1
ip -4 -o addr show dev {interface} | grep -q " {vip}/" && exit 0
ping -c1 -W0.5 -q {peer} >/dev/null 2>&1 && exit 0
arping -q -D -c2 -w1 -I {interface} {vip} && exit 0
echo "$(date +%s) fence: {vip} is answered by another box and {peer} is unreachable; staying out" >> {log}
exit 1
"""


def render(ha: HaConfig, state: Path, auth_pass: str) -> str:
    """keepalived.conf for this box; `state` is the node's runtime folder (fifo, fence script, health file)."""
    vip = ipaddress.ip_interface(ha.virtual_address)
    return f"""# made by `r1box ha` from [ha] of the box's configuration; edits are overwritten
global_defs {{
    router_id r1box_{_token(ha.node or ha.address)}
    script_user root
    enable_script_security
    notify_fifo {fifo(state)}
}}
vrrp_script r1box_check {{
    script "{fence_script(state)}"
    interval 1
    timeout 3
    fall 1
    rise 1
    weight 0
}}
vrrp_instance {INSTANCE} {{
    state BACKUP
    nopreempt
    interface {ha.interface}
    virtual_router_id {ha.router_id}
    priority {ha.priority}
    advert_int {ha.advert_s:g}
    unicast_src_ip {ha.address}
    unicast_peer {{
        {ha.peer}
    }}
    authentication {{
        auth_type PASS
        auth_pass {auth_pass[:8]}
    }}
    virtual_ipaddress {{
        {vip.with_prefixlen} dev {ha.interface}
    }}
    track_script {{
        r1box_check
    }}
}}
"""


def write(ha: HaConfig, state: Path, auth_pass: str) -> Path:
    """The configuration and the fence script, in `state` (made 0700: keepalived refuses scripts others may
    change)."""
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    vip = ipaddress.ip_interface(ha.virtual_address).ip
    script = fence_script(state)
    script.write_text(FENCE.format(healthy=shlex.quote(str(health_file(state))), interface=ha.interface, vip=vip,
                                   peer=ha.peer, log=shlex.quote(str(state / "fence.log"))))
    script.chmod(0o700)
    conf = state / "keepalived.conf"
    conf.write_text(render(ha, state, auth_pass))
    conf.chmod(0o600)
    return conf


def interface_holding(address: str) -> str | None:
    """The interface that holds `address` now ([ha] interface left empty: the box's LAN port, whatever its name)."""
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True).stdout
    for link in json.loads(out or "[]"):
        if any(a.get("local") == address for a in link.get("addr_info", [])):
            return link["ifname"]
    return None


async def with_interface(ha: HaConfig, wait_s: float = ADDRESS_WAIT_S) -> HaConfig:
    """[ha] with its interface: as set, or the one holding `address` once DHCP has given it (up to wait_s)."""
    if ha.interface:
        return ha
    deadline = time.monotonic() + wait_s
    while (found := await asyncio.to_thread(interface_holding, ha.address)) is None:
        if time.monotonic() >= deadline:
            raise HaError(f"no interface of this box holds [ha] address {ha.address} (waited {wait_s:.0f} s): give "
                          "the box that address (a DHCP reservation or a static one), or set [ha] interface")
        await asyncio.sleep(1)
    log.info("[ha] address %s is on %s", ha.address, found)
    return replace(ha, interface=found)


def command(state: Path) -> list[str]:
    """keepalived in the foreground, VRRP only, its own pid files (two on one machine in tests do not clash)."""
    return ["keepalived", "--dont-fork", "--log-console", "--log-detail", "--no-syslog", "--vrrp",
            f"--use-file={state / 'keepalived.conf'}", f"--pid={state / 'keepalived.pid'}",
            f"--vrrp_pid={state / 'keepalived-vrrp.pid'}", f"--checkers_pid={state / 'keepalived-chk.pid'}"]


def parse(line: str) -> str | None:
    """The state of a notify_fifo line (`INSTANCE "r1box" MASTER 150`): MASTER, BACKUP, FAULT or STOP; None for
    other lines."""
    parts = line.split()
    if len(parts) >= 3 and parts[0] == "INSTANCE" and parts[1].strip('"') == INSTANCE:
        return parts[2] if parts[2] in ("MASTER", "BACKUP", "FAULT", "STOP") else None
    return None


def fifo(state: Path) -> Path:
    return state / "keepalived.fifo"


def fence_script(state: Path) -> Path:
    return state / "check.sh"


def health_file(state: Path) -> Path:
    return state / "healthy"


def _token(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)[:32]
