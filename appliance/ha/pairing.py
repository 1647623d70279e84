"""What two boxes of a pair share, made once on one of them by `r1box ha pair` and copied to the other with the
store's key file: an SSH key pair that the active box's litestream logs in to the peer with, and the host key of
both boxes' replica sshd (one key, so each knows the other's without a first-contact question). The VRRP password
is derived from the same key. The sshd is Debian's, run by the node: key-only, SFTP-only, on [ha] address only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.ha.settings import HaConfig
from appliance.errors import HaError


@dataclass(frozen=True)
class PairFiles:
    key: Path  # the client key; .pub beside it

    @classmethod
    def of(cls, ha: HaConfig, db: Path) -> "PairFiles":
        return cls(Path(ha.ssh_key).expanduser() if ha.ssh_key else db.parent / "r1box-ha.key")

    @property
    def host_key(self) -> Path:
        return self.key.with_name(self.key.name + ".host")

    @property
    def files(self) -> tuple[Path, ...]:
        return self.key, _pub(self.key), self.host_key, _pub(self.host_key)

    def check(self) -> None:
        missing = [str(p) for p in self.files if not p.exists()]
        if missing:
            raise HaError(f"the pair's keys are missing ({', '.join(missing)}): run `r1box ha pair` on one box and "
                          "copy the files it names, with the store's key file, to the other.")

    def host_public(self) -> str:
        """The host key as litestream's host-key wants it (`ssh-ed25519 AAAA...`)."""
        return " ".join(_pub(self.host_key).read_text().split()[:2])

    def auth_pass(self) -> str:
        return hashlib.sha256(self.key.read_bytes()).hexdigest()[:8]


def pair(files: PairFiles) -> list[Path]:
    """Makes the pair's keys (never over existing ones); the files to copy to the peer."""
    if any(p.exists() for p in files.files):
        raise HaError(f"{files.key} (or its companions) exists already: this box is paired. Copy those files to the "
                      "peer; delete them first only to pair anew, on both boxes.")
    for path in (files.key, files.host_key):
        _new_key(path)
    return list(files.files)


def _new_key(path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _pub(path).write_bytes(public + b" r1box-ha\n")


def _pub(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


def sshd_config(ha: HaConfig, state: Path, files: PairFiles) -> Path:
    """The replica sshd's configuration: the peer's key only, SFTP only, no forwarding, on this box's address."""
    authorized = state / "authorized_keys"
    authorized.write_text(_pub(files.key).read_text())
    authorized.chmod(0o600)
    conf = state / "sshd_config"
    conf.write_text(f"""# made by `r1box ha` from [ha]; edits are overwritten
Port {ha.ssh_port}
ListenAddress {ha.address}
HostKey {files.host_key}
PidFile {state / 'sshd.pid'}
AuthorizedKeysFile {authorized}
AllowUsers {ha.ssh_user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
ForceCommand internal-sftp
Subsystem sftp internal-sftp
AllowTcpForwarding no
AllowAgentForwarding no
X11Forwarding no
PermitTTY no
# the keys file is written by the node, 0600 in its 0700 folder; sshd's own check would also refuse a parent such
# as /tmp (world-writable), where tests keep a box's files
StrictModes no
""")
    conf.chmod(0o600)
    return conf


def sshd_command(conf: Path) -> list[str]:
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists():
        raise HaError("sshd is not installed: `apt-get install openssh-server` (the image has it); the peer's "
                      "litestream writes the store's copy through it.")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege separation folder
    return [sshd, "-D", "-e", "-f", str(conf)]
