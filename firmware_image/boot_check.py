"""`just image-test`: boot the image in QEMU, wait for /healthz, send a WeChat message with `r1box wechat-sim`,
check the answer, keep the serial log, and print how long boot-to-healthy took.

    python -m firmware_image.boot_check [--arch amd64|arm64] [--logs DIR]
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from firmware_image.images import build
from firmware_image.vm import Vm, prepare_disk

APP_ID = "wx-image-test"
# small enough for a 2 GiB VM: two KV slots of 1024 tokens; a short prompt and a two-token answer, because without
# KVM (TCG emulates every vector instruction) the 0.5B takes about 10 s a token
CONFIG = f"""[server]
host = "0.0.0.0"
port = 8080
[engine]
max_batch = 2
max_length = 1024
[dialog]
system_prompt = "简答。"
max_tokens = 2
rate_per_minute = 100
[wechat]
app_id = "{APP_ID}"
mode = "safe"
"""


def box_secrets() -> dict[str, str]:
    """A fresh WeChat token and EncodingAESKey for one test box (never printed)."""
    return {"R1BOX_WECHAT_TOKEN": secrets.token_hex(16),
            "R1BOX_WECHAT_ENCODING_AES_KEY": base64.b64encode(secrets.token_bytes(32)).decode().rstrip("="),
            "R1BOX_API_KEYS": secrets.token_urlsafe(24)}


def box_disk(image: Path, workdir: Path, env: dict[str, str], more_config: str = "") -> Path:
    """A writable copy of the image with the test's config.toml (and `more_config` after it) and secrets.env on its
    CONFIG drive."""
    return prepare_disk(image, workdir / "disk.img", {
        "config.toml": CONFIG + more_config, "secrets.env": "".join(f"{k}={v}\n" for k, v in env.items())})


LATER = "(success: the answer comes later)"
NOTHING_PENDING = "没有更多内容了，请直接提问。"


def _sim(vm: Vm, env: dict[str, str], text: str, retries: int) -> list[str]:
    sim = subprocess.run([sys.executable, "-m", "appliance.cli", "wechat-sim", text, "--app-id", APP_ID, "--mode",
                          "safe", "--retries", str(retries), "--url", f"{vm.url}/wechat",
                          "--fingerprint", vm.fingerprint()],
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    if sim.returncode != 0:
        raise RuntimeError(f"wechat-sim failed: {sim.stderr.strip()}")
    return [line.split("] ", 1)[-1] if line.startswith("[delivery") else line for line in sim.stdout.splitlines()]


def wechat_sim(vm: Vm, env: dict[str, str], text: str, patience_s: float = 400) -> str:
    """Send `text` to the box as the platform would (safe mode: encrypted and signed, retried twice 5 s apart when
    the box says "later"); the decrypted answer. An answer later still is pulled with 继续, as a user would."""
    replies = [r for r in _sim(vm, env, text, retries=2) if r != LATER]
    deadline = time.monotonic() + patience_s
    while not replies and time.monotonic() < deadline:
        time.sleep(10)
        replies = [r for r in _sim(vm, env, "继续", retries=0) if r not in (LATER, NOTHING_PENDING)]
    return replies[0] if replies else LATER


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["amd64", "arm64"], default="amd64")
    parser.add_argument("--logs", type=Path, help="keep the serial log here (default: a temporary folder)")
    args = parser.parse_args()
    image = build(args.arch)
    logs = args.logs or Path("image-test-logs")
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="r1box-image-test.") as tmp:
        workdir = Path(tmp)
        env = box_secrets()
        with Vm(box_disk(image, workdir, env), workdir, arch=args.arch) as vm:
            print(f"==> booting {image.name} in QEMU ({vm.accel}), service port forwarded to {vm.port}",
                  file=sys.stderr)
            # a foreign architecture under TCG emulates every instruction: several times slower to boot
            patience = 600 if vm.accel == "kvm" or args.arch == "amd64" else 1800
            try:
                took = vm.wait_healthy(timeout=patience)
                print(f"==> boot to healthy: {took:.1f} s", file=sys.stderr)
                reply = wechat_sim(vm, env, "你好")
                print(f"==> WeChat reply: {reply}", file=sys.stderr)
            finally:
                (logs / "serial.log").write_text(vm.serial())
                print(f"==> serial log: {logs / 'serial.log'}", file=sys.stderr)
        ok = bool(reply) and reply != LATER
        print(f'{{"arch": "{args.arch}", "boot_to_healthy_s": {took:.1f}, "accel": "{vm.accel}", '
              f'"answered": {str(ok).lower()}}}')
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
