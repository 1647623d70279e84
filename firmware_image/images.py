"""The image, built once per set of inputs: ~/.cache/r1box/image/<key>/ where the key hashes everything that goes
into it (the build scripts, rootfs/ and config/, the runtime's sources, pyproject.toml, the model artifact's
manifest, the architecture).

    python -m firmware_image.images [--arch amd64|arm64]     build or reuse; prints the image's path
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = "qwen2.5-coder-0.5b-instruct"
KEEP = 2  # images kept besides a new one: each is about 3 GB, and every edit of appliance/ makes another


def cache_root() -> Path:
    return Path(os.environ.get("R1BOX_CACHE") or Path.home() / ".cache/r1box") / "image"


def inputs_key(arch: str, artifact: Path) -> str:
    digest = hashlib.sha256(arch.encode())
    image = REPO / "firmware_image"
    sources = [REPO / "pyproject.toml", artifact / "manifest.json", *image.glob("*.sh")]
    for folder in (image / "rootfs", image / "config", REPO / "appliance"):
        sources += sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in sources:
        digest.update(str(path.relative_to(REPO) if path.is_relative_to(REPO) else path.name).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build(arch: str = "amd64") -> Path:
    """The disk image for `arch`, from the cache when its inputs have not changed."""
    from export.artifacts import cached_artifact

    artifact = Path(cached_artifact(MODEL))
    out = cache_root() / inputs_key(arch, artifact)
    image = out / f"r1box-{arch}.img"
    if image.exists():
        print(f"==> reusing {image} (inputs unchanged)", file=sys.stderr)
        return image
    _prune(keep=out)
    kernel = []
    if arch == "amd64":  # the box's CPU decides at boot whether it runs; the library goes in either way
        from appliance.model.int4_kernel import build as build_int4_kernel

        kernel = ["--int4-kernel", str(build_int4_kernel())]
    subprocess.run([str(REPO / "firmware_image/build.sh"), "--arch", arch, "--artifact", str(artifact),
                    "--out", str(out), *kernel], check=True, stdin=subprocess.DEVNULL)
    return image


def _prune(keep: Path) -> None:
    """Delete all but the KEEP newest images of earlier inputs, before a new one takes its room."""
    if not cache_root().is_dir():
        return
    built = sorted((d for d in cache_root().iterdir() if d.is_dir() and d != keep and any(d.glob("r1box-*.img"))),
                   key=lambda d: d.stat().st_mtime, reverse=True)
    for old in built[KEEP:]:
        print(f"==> removing the image of earlier inputs {old}", file=sys.stderr)
        shutil.rmtree(old, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["amd64", "arm64"], default="amd64")
    print(build(parser.parse_args().arch))


if __name__ == "__main__":
    main()
