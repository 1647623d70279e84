# r1box: the front door. `just` lists the recipes.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".venv"
python := venv / "bin" / "python"

# list the recipes
default:
    @just --list

# install everything, fetch and export the default model (once), and chat with it
chat *ARGS: install kernel
    {{venv}}/bin/r1box chat {{ARGS}}

# install everything and run the whole test suite (the real 0.5B model and the firmware image included); the
# drills of many minutes are `just drill`'s
test *ARGS: install kernel promtool chromium image-tools ha-tools
    {{python}} -m pytest -m "not drill" {{ARGS}}

# the fault drills of many minutes, each printing what it measured: the hot-standby pair's fault plan (a table,
# also in drill-results/ha.json; `just drill tests/test_ha_drills.py` for it alone, about 10 minutes), and an
# update of the booted image kept, then a broken one rolled back (about 20 minutes under emulation)
drill *ARGS: install kernel image-tools ha-tools
    {{python}} -m pytest -m drill -s {{ARGS}}

# what a hot-standby pair runs beside r1box, from Debian: keepalived, sshd (the store's copy arrives through it),
# arping (the fence) and nftables (the drills cut links with it); their services are not started by the install
[private]
ha-tools:
    #!/usr/bin/env bash
    set -euo pipefail
    tools=(keepalived:keepalived /usr/sbin/sshd:openssh-server arping:iputils-arping ping:iputils-ping nft:nftables
           ip:iproute2)
    missing=()
    for t in "${tools[@]}"; do command -v "${t%%:*}" >/dev/null || [ -e "${t%%:*}" ] || missing+=("${t#*:}"); done
    [ ${#missing[@]} -eq 0 ] && exit 0
    echo "installing ${missing[*]} for the hot-standby pair" >&2
    [ "$(id -u)" -eq 0 ] || { echo "run as root, or: sudo apt-get install ${missing[*]}" >&2; exit 1; }
    blocker=/usr/sbin/policy-rc.d  # no daemon of these starts by itself: the node runs them
    [ -e "$blocker" ] || { printf '#!/bin/sh\nexit 101\n' > "$blocker" && chmod +x "$blocker" && trap 'rm -f "$blocker"' EXIT; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }

# fast tests only: the tiny random model, no 0.5 GB download
test-fast *ARGS: install kernel promtool chromium ha-tools
    {{python}} -m pytest -m "not slow" {{ARGS}}

# promtool, for the alert-rule test: unpacked (not installed) from Debian's prometheus package into the cache
[private]
promtool:
    #!/usr/bin/env bash
    set -euo pipefail
    dest="${R1BOX_CACHE:-$HOME/.cache/r1box}/tools"
    [ -x "$dest/promtool" ] && exit 0
    work=$(mktemp -d) && trap 'rm -rf "$work"' EXIT
    cd "$work"
    echo "fetching promtool from Debian's prometheus package" >&2
    apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null; }
    dpkg-deb -x prometheus_*.deb root
    mkdir -p "$dest" && cp root/usr/bin/promtool "$dest/promtool"

# Debian's chromium and its driver, for the admin pages' browser test (installed once; apt lists refreshed if stale)
[private]
chromium:
    #!/usr/bin/env bash
    set -euo pipefail
    command -v chromium >/dev/null && command -v chromedriver >/dev/null && exit 0
    echo "installing chromium and chromium-driver from Debian" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || {
        apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }

# the analytics dashboard's queries on a generated year of 1,000,000 messages; each must stay under 200 ms
bench-analytics MESSAGES="1000000": install
    {{python}} -m appliance.admin.bench_analytics --messages {{MESSAGES}}

# add a user of the admin pages (the password is asked for, or read from stdin)
admin-add-user NAME ROLE="admin" *ARGS: install
    {{venv}}/bin/r1box admin add-user {{NAME}} --role {{ROLE}} {{ARGS}}

# the model service: the engine behind its OpenAI-compatible API ([model_server], 127.0.0.1:8081 by default)
model *ARGS: install kernel
    {{venv}}/bin/r1box model {{ARGS}}

# the service: WeChat callbacks, dialog, store, admin pages ([server], 127.0.0.1:8080); its model is `just model`
serve *ARGS: install kernel
    {{venv}}/bin/r1box serve {{ARGS}}

# r1box against onnxruntime-genai and llama.cpp (built natively once, about 20 minutes) on the same model and
# machine (default: the 1.5B); ends with one JSON line
bench MODEL="qwen2.5-coder-1.5b-instruct" THREADS="2": install build-tools kernel
    #!/usr/bin/env bash
    set -euo pipefail
    cache="${R1BOX_CACHE:-$HOME/.cache/r1box}"
    artifact=$({{python}} -c 'import sys; from export.artifacts import cached_artifact; print(cached_artifact(sys.argv[1]))' "{{MODEL}}")
    gguf=$({{venv}}/bin/r1box fetch "{{MODEL}}")
    anchor_python=$(bash appliance/bench/anchor_setup.sh "$gguf" "$cache/genai-models/{{MODEL}}-int4")
    llama_bin=$(bash appliance/bench/llama_setup.sh)
    {{python}} -m appliance.bench.run --artifact "$artifact" --threads {{THREADS}} --out bench-results \
        --anchor-python "$anchor_python" --anchor-model "$cache/genai-models/{{MODEL}}-int4" \
        --llama-bin "$llama_bin" --gguf "$gguf"

# r1box's int4 kernel for x86 CPUs with AVX2 or AVX512-VNNI (appliance/model/int4_kernel.py), built once per source
# with g++ against Debian's onnxruntime headers, in seconds; without g++ and root it is skipped and MatMulNBits serves
kernel: install
    #!/usr/bin/env bash
    set -euo pipefail
    [ "$(uname -m)" = x86_64 ] || exit 0
    if ! command -v g++ >/dev/null; then
        [ "$(id -u)" -eq 0 ] || { echo "no g++: the int4 kernel is skipped (sudo apt-get install g++, then just kernel)" >&2; exit 0; }
        echo "installing g++ for the int4 kernel" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq --no-install-recommends g++ >/dev/null 2>&1 || {
            apt-get update -qq && apt-get install -y -qq --no-install-recommends g++ >/dev/null; }
    fi
    {{python}} -m appliance.model.int4_kernel >/dev/null

# cmake and a C++ compiler, from Debian, for llama.cpp's native build (a no-op once installed)
[private]
build-tools:
    #!/usr/bin/env bash
    set -euo pipefail
    missing=()
    for t in cmake:cmake g++:g++ make:make; do command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}"); done
    [ ${#missing[@]} -eq 0 ] && exit 0
    echo "installing ${missing[*]} to build llama.cpp" >&2
    [ "$(id -u)" -eq 0 ] || { echo "run as root, or: sudo apt-get install ${missing[*]}" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }

# the quick bench: the same on the 0.5B
bench-quick THREADS="2": (bench "qwen2.5-coder-0.5b-instruct" THREADS)

# score artifacts or backend URLs on the evaluation set (appliance/release/evalset/): a table, and --out JSON
eval *TARGETS: install kernel
    {{venv}}/bin/r1box eval {{TARGETS}}

# export a model (catalog name, HF directory or .gguf) into an artifact directory
export SOURCE OUT *FLAGS: install
    {{venv}}/bin/r1box export {{SOURCE}} --out {{OUT}} {{FLAGS}}

# the runtime, the export stage and the test tools in .venv (a no-op when pyproject.toml has not changed)
install:
    #!/usr/bin/env bash
    set -euo pipefail
    stamp="{{venv}}/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
    [ -f "$stamp" ] && exit 0
    [ -x "{{python}}" ] || python3 -m venv "{{venv}}"
    echo "installing r1box with the export stage into {{venv}} (first time: a few minutes)" >&2
    "{{python}}" -m pip install --quiet --upgrade pip
    "{{python}}" -m pip install --quiet --editable ".[export,dev]"
    rm -f "{{venv}}"/.installed-* && touch "$stamp"

# CUDA 13 and cuDNN 9 come as nvidia-* wheels that the decoder preloads, so the box needs only NVIDIA's driver; not
# `.[gpu]`, which would bring the CPU build back.
# swap the CPU onnxruntime for onnxruntime-gpu on an NVIDIA box
install-gpu: install
    {{python}} -m pip uninstall --yes --quiet onnxruntime
    {{python}} -m pip install --quiet "onnxruntime-gpu[cuda,cudnn]" "nvidia-ml-py>=12"

# r1box's side of the bench on an NVIDIA GPU: the model exported in float16 (cached), the CUDA provider
bench-gpu MODEL="qwen2.5-coder-1.5b-instruct": install-gpu
    #!/usr/bin/env bash
    set -euo pipefail
    artifact=$({{python}} -c 'import sys; from export.artifacts import cached_artifact; print(cached_artifact(sys.argv[1], dtype="float16"))' "{{MODEL}}")
    {{python}} -m appliance.bench.run --artifact "$artifact" --provider cuda --out bench-results

# the firmware image (x86-64 UEFI, A/B root slots, data and CONFIG partitions): `just image` or `just image arch=arm64`
image ARCH="amd64": install kernel (image-tools trim_start_match(ARCH, "arch="))
    {{python}} -m firmware_image.images --arch "{{trim_start_match(ARCH, "arch=")}}"

# boot the image in QEMU, wait for /healthz, answer a WeChat message; prints boot-to-healthy, keeps the serial log
image-test ARCH="amd64": install kernel (image-tools trim_start_match(ARCH, "arch="))
    {{python}} -m firmware_image.boot_check --arch "{{trim_start_match(ARCH, "arch=")}}" --logs image-test-logs

# what building and booting the image needs, from Debian (a no-op once installed); a foreign architecture also
# needs qemu-user registered with binfmt_misc, for mmdebstrap's foreign root
[private]
image-tools ARCH="amd64":
    #!/usr/bin/env bash
    set -euo pipefail
    tools=(mmdebstrap:mmdebstrap qemu-system-x86_64:qemu-system-x86 /usr/share/OVMF/OVMF_CODE_4M.fd:ovmf
           /usr/lib/systemd/boot/efi/linuxx64.efi.stub:systemd-boot-efi mcopy:mtools mkfs.vfat:dosfstools
           sfdisk:fdisk mkfs.ext4:e2fsprogs objcopy:binutils)
    if [ "{{ARCH}}" = arm64 ]; then
        tools+=(qemu-aarch64-static:qemu-user-static arch-test:arch-test
                aarch64-linux-gnu-objcopy:binutils-aarch64-linux-gnu qemu-system-aarch64:qemu-system-arm
                /usr/share/AAVMF/AAVMF_CODE.fd:qemu-efi-aarch64)
    fi
    missing=()
    for t in "${tools[@]}"; do command -v "${t%%:*}" >/dev/null || [ -e "${t%%:*}" ] || missing+=("${t#*:}"); done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]} for the firmware image" >&2
        [ "$(id -u)" -eq 0 ] || { echo "run as root, or: sudo apt-get install ${missing[*]}" >&2; exit 1; }
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if [ "{{ARCH}}" = arm64 ] && ! grep -qs enabled /proc/sys/fs/binfmt_misc/qemu-aarch64; then
        echo "registering qemu-aarch64 with binfmt_misc" >&2
        [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
        cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
    fi
