"""[ha]: one box of a hot-standby pair. The pair owns its section; appliance/config.py reads it with the others, so
it imports nothing but the standard library."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class HaConfig:
    """Hot standby of two boxes (appliance/ha/): keepalived moves the virtual address, litestream carries the store
    to the peer. The same section on both boxes but for address, peer and priority."""

    enabled: bool = False
    node: str = ""  # this box's name in logs, pages and the store's takeover records; empty: the host name
    interface: str = ""  # the LAN interface that carries the virtual address; empty: the one that holds `address`
    address: str = ""  # this box's own address on it (VRRP's unicast source)
    peer: str = ""  # the other box's address
    virtual_address: str = ""  # with its prefix (192.168.1.50/24): where the office's router sends WeChat callbacks
    router_id: int = 51  # VRRP's virtual router id: the same on both boxes, unique on the LAN
    priority: int = 100  # the higher takes the address when both start; an address is never taken back
    advert_s: float = 1.0  # VRRP advertisements; the peer is declared dead after about 3 of them
    state_dir: str = ""  # runtime files (keepalived's, litestream's, the role); empty: ha/ beside the database
    replica_dir: str = ""  # where the peer's litestream writes its store to this box; empty: replica/ beside it
    peer_replica_dir: str = ""  # the peer's replica_dir, where this box writes; empty: the same as this box's
    ssh_port: int = 22  # the peer's sshd, which litestream's sftp replica writes through
    ssh_user: str = "r1box"
    ssh_key: str = ""  # the pair's private key (made once by `r1box ha pair`); empty: r1box-ha.key beside the db
    sync_timeout_s: float = 2.0  # an acknowledgement to the platform waits this long for the peer's copy
    resync_s: float = 5.0  # the standby takes the peer's newest copy as its own store this often
    health_every_s: float = 1.0  # the node's health check (model, service), which keepalived follows
    status_port: int = 8090  # the node's own state on [ha] address, read by the peer (role, health; no secrets)
    degraded_grace_s: float = 10.0  # a degraded model (its GPU failed) hands the address to a healthy peer after

    def __post_init__(self):
        if not 1 <= self.router_id <= 255 or not 1 <= self.priority <= 254:
            raise ValueError("router_id must be between 1 and 255, priority between 1 and 254")
        if min(self.advert_s, self.sync_timeout_s, self.resync_s, self.health_every_s) <= 0 \
                or self.degraded_grace_s < 0:
            raise ValueError("advert_s, sync_timeout_s, resync_s and health_every_s must be positive, "
                             "degraded_grace_s not negative")
        if self.enabled:
            for key in ("address", "peer", "virtual_address"):
                if not getattr(self, key):
                    raise ValueError(f"{key} is required when enabled")
            try:
                ipaddress.ip_address(self.address), ipaddress.ip_address(self.peer)
                ipaddress.ip_interface(self.virtual_address)
            except ValueError as e:
                raise ValueError(f"address, peer and virtual_address must be addresses ({e})") from None
            if "/" not in self.virtual_address:
                raise ValueError("virtual_address needs its prefix length (192.168.1.50/24)")
