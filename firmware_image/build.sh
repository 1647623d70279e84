#!/usr/bin/env bash
# Build the r1box disk image: a Debian root tree from packages (mmdebstrap), the runtime's wheels in a venv, the
# exported model, then a GPT disk assembled from partition-sized files: no loop devices, no mounts.
#
#   build.sh --arch amd64|arm64 --artifact DIR --out DIR
#
# Writes DIR/r1box-ARCH.img (the disk) and DIR/r1box-ARCH.root.ext4 (the root slot alone: what r1box-update
# takes). SOURCE_DATE_EPOCH (default: the last commit's time) fixes every timestamp and identifier that the tools
# would otherwise draw at random, so two builds from the same inputs and the same Debian snapshot match.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
arch=amd64 artifact="" out="" int4_kernel=""
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arch=$2; shift 2 ;;
        --artifact) artifact=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --int4-kernel) int4_kernel=$2; shift 2 ;;  # appliance/model/int4_kernel.py's library (x86-64)
        *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -f "$artifact/manifest.json" ] || { echo "build.sh: --artifact must be an exported model directory" >&2; exit 2; }
[ -n "$out" ] || { echo "build.sh: --out is required" >&2; exit 2; }
case "$arch" in
    amd64) efi_arch=x64 py_platform=x86_64 root_type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709 console=ttyS0 cross="" ;;
    arm64) efi_arch=aa64 py_platform=aarch64 root_type=b921b045-1df0-41c3-af44-4c6f280d3fae console=ttyAMA0
           cross=aarch64-linux-gnu- ;;
    *) echo "build.sh: arch must be amd64 or arm64" >&2; exit 2 ;;
esac
if [ "$arch" != "$(dpkg --print-architecture)" ] && ! grep -qs enabled "/proc/sys/fs/binfmt_misc/qemu-$py_platform"; then
    # mmdebstrap runs the foreign root's maintainer scripts through qemu-user, which binfmt_misc hands them to
    echo "build.sh: a $arch root needs qemu-user-static registered with binfmt_misc: run \`just image arch=$arch\`," \
         "which installs and registers it" >&2
    exit 2
fi

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct)}
export E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH
# partition sizes in MiB; both root slots are the same size so that any slot takes any update
esp_mib=256 root_mib=2560 config_mib=32 data_mib=512
# fixed identifiers: the loader entries and fstab name partitions by these, and repeatable builds need them fixed
disk_guid=5a1c0b0e-7231-4b6f-9d1e-000000000000
declare -A partuuid=([esp]=5a1c0b0e-7231-4b6f-9d1e-000000000001 [root-a]=5a1c0b0e-7231-4b6f-9d1e-00000000000a
                     [root-b]=5a1c0b0e-7231-4b6f-9d1e-00000000000b [config]=5a1c0b0e-7231-4b6f-9d1e-0000000000c0
                     [data]=5a1c0b0e-7231-4b6f-9d1e-0000000000d0)
cache="${R1BOX_CACHE:-$HOME/.cache/r1box}/image"
work=$(mktemp -d "${TMPDIR:-/var/tmp}/r1box-image.XXXXXX")
# mmdebstrap mounts /proc, /sys and /dev inside the tree while it runs; an interrupted run may leave them there
cleanup() {
    awk -v w="$work/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT
started=$SECONDS
step() { printf '==> [%3ds] %s\n' $((SECONDS - started)) "$*" >&2; }

step "1/6 wheelhouse: the runtime's wheels for cp311 $py_platform (no export stack)"
python3 -m pip wheel --quiet --no-deps --wheel-dir "$work/wheels" "$repo" 2>&1 | grep -v WARNING >&2 || true
python3 -m pip download --quiet --dest "$work/wheels" --only-binary=:all: --python-version 3.11 \
    --implementation cp --abi cp311 --platform "manylinux_2_28_$py_platform" \
    --platform "manylinux_2_17_$py_platform" --platform "manylinux2014_$py_platform" --platform any \
    "$work"/wheels/r1box-*.whl 2>&1 | grep -v WARNING >&2 || true
ls "$work"/wheels/onnxruntime-*.whl >/dev/null

step "2/6 root tree: Debian bookworm $arch with mmdebstrap (packages cached in $cache/debs-$arch)"
mkdir -p "$cache/debs-$arch"
# keepalived, openssh-server, iputils-arping and -ping: a hot-standby pair's (r1box-ha.service, run by [ha] alone)
packages=(systemd systemd-sysv systemd-resolved systemd-boot udev dbus linux-image-$arch initramfs-tools
          python3 python3-venv ca-certificates iproute2 kmod e2fsprogs qemu-guest-agent
          keepalived openssh-server iputils-arping iputils-ping)
log=$cache/mmdebstrap-$arch.log
# docs, man pages and translations: nobody reads them on the box
if ! mmdebstrap --variant=minbase --arch="$arch" --include="$(IFS=,; echo "${packages[*]}")" \
    --aptopt='APT::Sandbox::User "root"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --skip=download/empty --skip=essential/unlink \
    --setup-hook='mkdir -p "$1/var/cache/apt/archives"' \
    --setup-hook="sync-in $cache/debs-$arch /var/cache/apt/archives/" \
    --customize-hook="sync-out /var/cache/apt/archives $cache/debs-$arch" \
    --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb' \
    --customize-hook="copy-in $work/wheels /tmp" \
    --customize-hook="$here/customize.sh \"\$1\" /tmp/wheels" \
    bookworm "$work/root" http://deb.debian.org/debian 2>&1 | tee "$log" | { grep --line-buffered -E '^(I:|E:|W:)' >&2 || true; }
then
    echo "build.sh: mmdebstrap failed; its last lines (all of them in $log):" >&2
    tail -n 25 "$log" >&2
    exit 1
fi

step "3/6 model artifact and unified kernel image"
mkdir -p "$work/root/usr/share/r1box/model"
cp -r "$artifact"/. "$work/root/usr/share/r1box/model/"
chmod -R u=rwX,go=rX "$work/root/usr/share/r1box/model"  # the cache's files may be the builder's alone
[ -z "$int4_kernel" ] || install -m 0644 "$int4_kernel" "$work/root/usr/lib/r1box/libr1box_int4.so"
kernel=$(ls "$work"/root/boot/vmlinuz-* | sort -V | tail -1)
initrd=$(ls "$work"/root/boot/initrd.img-* | sort -V | tail -1)
if [ "$(od -An -N2 -tx1 "$kernel" | tr -d ' ')" = 1f8b ]; then
    # Debian's arm64 kernel is a gzipped Image; the stub loads the PE image inside it
    zcat "$kernel" > "$work/vmlinux.efi"
    kernel=$work/vmlinux.efi
fi
# the root's own stub (systemd-boot-efi of the same release as its systemd), so any build host will do
CROSS=$cross "$here/uki.sh" "$work/root/usr/lib/systemd/boot/efi/linux$efi_arch.efi.stub" "$kernel" "$initrd" \
    "$work/root/etc/os-release" "$work/root/usr/lib/r1box/r1box.efi"
find "$work/root" -newermt "@$SOURCE_DATE_EPOCH" -print0 | xargs -0r touch -h -d "@$SOURCE_DATE_EPOCH"

step "4/6 file systems: root (ext4, read-only slot), data (ext4), EFI and CONFIG (FAT)"
mkfs_ext4() {  # NAME SIZE_MIB SOURCE_DIR UUID FEATURES
    truncate -s "${2}M" "$work/$1.part"
    mkfs.ext4 -q -L "$1" -U "$4" -E "hash_seed=$4,root_owner=0:0" -T default -O "$5" -d "$3" "$work/$1.part"
}
used_mib=$(du -sm "$work/root" | cut -f1)
[ "$used_mib" -lt $((root_mib * 9 / 10)) ] || { echo "build.sh: the root tree ($used_mib MiB) outgrew its slot" >&2; exit 1; }
mkfs_ext4 root "$root_mib" "$work/root" "${partuuid[root-a]}" ^has_journal  # never written once installed
mkdir -p "$work/data/logs/journal"
mkfs_ext4 data "$data_mib" "$work/data" "${partuuid[data]}" has_journal
fat() {  # NAME SIZE_MIB LABEL VOLUME_ID
    truncate -s "${2}M" "$work/$1.part"
    mkfs.vfat -n "$3" -i "$4" --invariant "$work/$1.part" >/dev/null
}
fat esp "$esp_mib" ESP 5a1c0e51
mmd -i "$work/esp.part" ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/EFI/r1box ::/loader ::/loader/entries
bootloader="$work/root/usr/lib/systemd/boot/efi/systemd-boot$efi_arch.efi"
mcopy -m -i "$work/esp.part" "$bootloader" "::/EFI/BOOT/BOOT${efi_arch^^}.EFI"
mcopy -m -i "$work/esp.part" "$bootloader" "::/EFI/systemd/systemd-boot$efi_arch.efi"
mcopy -m -i "$work/esp.part" "$work/root/usr/lib/r1box/r1box.efi" ::/EFI/r1box/slot-a.efi
printf 'timeout 0\neditor no\nconsole-mode keep\n' > "$work/loader.conf"
"$here/rootfs/usr/lib/r1box/r1box-entry" a 1 "${partuuid[root-a]}" "$console" > "$work/r1box-a.conf"
touch -d "@$SOURCE_DATE_EPOCH" "$work/loader.conf" "$work/r1box-a.conf"
mcopy -m -i "$work/esp.part" "$work/loader.conf" ::/loader/loader.conf
mcopy -m -i "$work/esp.part" "$work/r1box-a.conf" ::/loader/entries/r1box-a.conf
fat config "$config_mib" CONFIG 5a1c0c0f
for f in config.toml secrets.env README.txt; do
    sed 's/$/\r/' "$here/config/$f" > "$work/$f"  # CRLF: the person editing it may use Notepad
    touch -d "@$SOURCE_DATE_EPOCH" "$work/$f"
    mcopy -m -i "$work/config.part" "$work/$f" "::/$f"
done

step "5/6 disk: GPT with EFI, root-a, root-b, config, data"
disk="$work/disk.img"
total_mib=$((1 + esp_mib + 2 * root_mib + config_mib + data_mib + 1))
truncate -s "${total_mib}M" "$disk"
sfdisk --quiet "$disk" <<GPT
label: gpt
label-id: $disk_guid
unit: sectors
first-lba: 2048
size=${esp_mib}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=${partuuid[esp]}, name=esp
size=${root_mib}MiB, type=$root_type, uuid=${partuuid[root-a]}, name=root-a
size=${root_mib}MiB, type=$root_type, uuid=${partuuid[root-b]}, name=root-b
size=${config_mib}MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, uuid=${partuuid[config]}, name=config
size=${data_mib}MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=${partuuid[data]}, name=data
GPT
place() {  # PARTFILE PARTITION_NUMBER
    start=$(sfdisk --json "$disk" | python3 -c 'import json,sys; print(json.load(sys.stdin)["partitiontable"]["partitions"][int(sys.argv[1])-1]["start"])' "$2")
    dd if="$1" of="$disk" bs=1M seek=$((start * 512)) oflag=seek_bytes conv=notrunc,sparse status=none
}
place "$work/esp.part" 1
place "$work/root.part" 2
place "$work/config.part" 4
place "$work/data.part" 5

step "6/6 done"
mkdir -p "$out"
mv "$disk" "$out/r1box-$arch.img"
mv "$work/root.part" "$out/r1box-$arch.root.ext4"
(cd "$out" && sha256sum "r1box-$arch.root.ext4" > "r1box-$arch.root.ext4.sha256")
printf '%s: %s MiB on disk (%s MiB apparent); root tree %s MiB, of which the model %s MiB\n' "$out/r1box-$arch.img" \
    "$(du -m "$out/r1box-$arch.img" | cut -f1)" "$total_mib" "$used_mib" "$(du -sm "$artifact" | cut -f1)" >&2
