#!/usr/bin/env bash
# A unified kernel image: systemd's EFI stub with the kernel, the initrd and os-release as PE sections (what
# ukify does; bookworm has no ukify). No .cmdline section: the loader entry passes the slot's root= instead.
#   [CROSS=aarch64-linux-gnu-] uki.sh STUB KERNEL INITRD OS_RELEASE OUT
# CROSS: the binutils that know the stub's PE flavour (the host's own know only the host's)
set -euo pipefail
stub=$1 kernel=$2 initrd=$3 osrel=$4 out=$5
objdump=${CROSS:-}objdump objcopy=${CROSS:-}objcopy
align=$((16#$($objdump -p "$stub" | awk '$1 == "SectionAlignment" {print $2}')))
last=$($objdump -h "$stub" | awk '$1 ~ /^[0-9]+$/ {size=$3; vma=$4} END {print size, vma}')
offset=$((16#${last% *} + 16#${last#* }))
args=()
for section in ".osrel=$osrel" ".linux=$kernel" ".initrd=$initrd"; do
    offset=$(( (offset + align - 1) / align * align ))
    args+=(--add-section "$section" --change-section-vma "${section%%=*}=$(printf 0x%x $offset)")
    offset=$((offset + $(stat -Lc %s "${section#*=}")))
done
mkdir -p "$(dirname "$out")"
$objcopy "${args[@]}" "$stub" "$out"
