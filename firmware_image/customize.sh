#!/usr/bin/env bash
# mmdebstrap customize hook: the runtime venv, the box's user, units and scripts, a read-only root's mount table.
#   customize.sh ROOT WHEELS_IN_ROOT
set -euo pipefail
root=$1 wheels=$2
here=$(cd "$(dirname "$0")" && pwd)

# the build machine's environment (PIP_* settings, its PATH) stays out of the box
in_root() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 chroot "$root" "$@"; }
in_root python3 -m venv /opt/r1box/venv
in_root /opt/r1box/venv/bin/pip install --quiet --no-index --no-compile --find-links "$wheels" r1box
in_root /opt/r1box/venv/bin/pip uninstall --quiet --yes pip
rm -rf "$root$wheels"
# bytecode now, into the read-only root, deterministic across builds
in_root /opt/r1box/venv/bin/python -m compileall -q --invalidation-mode unchecked-hash /opt/r1box/venv/lib

cp -r "$here/rootfs/." "$root/"
in_root useradd --system --home-dir /var/lib/r1box --no-create-home --shell /usr/sbin/nologin r1box
mkdir -p "$root/efi" "$root/config" "$root/var/lib/r1box"
echo r1box > "$root/etc/hostname"
: > "$root/etc/machine-id"  # empty on a read-only root: systemd makes one per boot
ln -sf /run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
mkdir -p "$root/etc/issue.d"  # agetty shows what is here above the login prompt
ln -sf /run/r1box/issue "$root/etc/issue.d/r1box.issue"
ln -sfn /var/lib/r1box/logs/journal "$root/var/log/journal"
in_root systemctl enable systemd-networkd systemd-resolved r1box.service r1box-model.service r1box-ha.service \
    r1box-health.service >/dev/null 2>&1
# keepalived and the replica sshd run under r1box-ha.service, with their configuration made from [ha]; a login sshd
# has no place on the box
in_root systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
    keepalived.service ssh.service ssh.socket >/dev/null 2>&1
rm -f "$root"/etc/ssh/ssh_host_* "$root/var/lib/dbus/machine-id"
