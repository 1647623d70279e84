"""A candidate artifact served beside the serving model: its own `r1box model` process on loopback, started by
the service for the length of a release (and kept as the serving model once promoted).

It runs at a lower CPU priority (nice), so on a CPU box the serving model's work always goes first. Before it
starts, the artifact must pass its manifest (every file present and unchanged) and the parity gate its export
recorded: a candidate that fails either is refused, and the serving model is untouched. An artifact that is not
on the box's data disk yet is copied there first, when the disk has room for it. A candidate process that
dies is started again after a pause; its failures meanwhile are samples of its error rate, which the promotion rule
reads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
from pathlib import Path

from appliance.errors import ArtifactError
from appliance.model.manifest import load_manifest
from appliance.release.records import ReleaseError

log = logging.getLogger(__name__)


def check_artifact(path: str) -> str:
    """The artifact's model name, once its manifest verifies and its parity gate passed; else ReleaseError."""
    try:
        manifest = load_manifest(Path(path))
    except ArtifactError as e:
        raise ReleaseError(f"the candidate artifact is refused: {e}") from None
    parity = manifest.raw.get("parity") or {}
    if parity and not parity.get("passed", False):
        raise ReleaseError(f"the candidate artifact {path} failed its parity check at export (KL divergence "
                           f"{parity.get('kl_divergence')}, top-1 agreement {parity.get('agreement')}); export it "
                           "again")
    return manifest.raw.get("model", {}).get("name") or Path(path).name


def bring_in(artifact: str, data_dir: Path) -> Path:
    """The artifact on the box's own disk: one elsewhere (a USB stick, a share) is copied under
    data_dir/artifacts first, if the disk has room for it, and checked again there; the serving model's files are
    never touched, and a copy that fails leaves nothing behind."""
    source = Path(artifact).resolve()
    home = (data_dir / "artifacts").resolve()
    if source.is_relative_to(home):
        return source
    size = sum(p.stat().st_size for p in source.iterdir() if p.is_file())
    home.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(home).free
    if free < size * 1.1:
        raise ReleaseError(f"the candidate needs {size / 1e9:.2f} GB on {home} and {free / 1e9:.2f} GB are free; "
                           "free space (an old candidate under it, old backups) or start it from a backend URL")
    target, staging = home / source.name, home / f".{source.name}.copying"
    if target.exists():
        raise ReleaseError(f"{target} exists already; remove it or rename the candidate's directory")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(source, staging)
        check_artifact(str(staging))
        staging.rename(target)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ReleaseError(f"copying the candidate to {home} failed ({e.strerror or e}); nothing was kept") from None
    except ReleaseError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


class CandidateProcess:
    def __init__(self, artifact: str, port: int, nice: int, config_file: str | None):
        self.artifact, self.port, self.nice, self.config_file = artifact, port, nice, config_file
        self.url = f"http://127.0.0.1:{port}"
        self._task: asyncio.Task | None = None
        self._process: asyncio.subprocess.Process | None = None
        self.starts = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep_running())

    async def _keep_running(self) -> None:
        pause = 1.0
        while True:
            command = [sys.executable, "-m", "appliance.cli", "model", "--artifact", self.artifact,
                       "--host", "127.0.0.1", "--port", str(self.port), "--log-format", "json",
                       *(["--config", self.config_file] if self.config_file else [])]
            self.starts += 1
            log.info("starting the candidate model", extra={"artifact": self.artifact, "port": self.port})
            self._process = await asyncio.create_subprocess_exec(
                *command, env=dict(os.environ), preexec_fn=self._lower_priority,
                stdout=asyncio.subprocess.DEVNULL, stderr=None)
            code = await self._process.wait()
            log.error("the candidate model exited (%s); starting it again in %.0f s", code, pause,
                      extra={"artifact": self.artifact})
            await asyncio.sleep(pause)
            pause = min(pause * 2, 60.0)

    def _lower_priority(self) -> None:
        """In the child, before it runs: behind the serving model for the CPU, and ahead of everything for the
        out-of-memory killer (it inherits serve's -500, which protects the users' messages, not a candidate)."""
        os.nice(self.nice)
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("500")
        except OSError:
            pass  # not Linux, or a kernel without it: the priority alone

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._process and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 30)
            except asyncio.TimeoutError:
                self._process.kill()
                await self._process.wait()
