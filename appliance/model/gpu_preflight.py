"""Before the model goes on an NVIDIA GPU: is the driver loaded, is `nvidia-smi` there, does the GPU have the memory
the model needs? When any answer is no, the service runs on the CPU and says why (in the log and in /healthz),
rather than refusing to serve or failing half-way through loading."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

DRIVER = Path("/proc/driver/nvidia/version")
HEADROOM = 1.25  # weights plus activations, the CUDA context and a small KV cache


def model_bytes(artifact: Path) -> int:
    return sum(f.stat().st_size for f in artifact.iterdir() if f.is_file())


def free_gpu_mib(nvidia_smi: str) -> int:
    """The most free memory on any visible GPU, in MiB."""
    out = subprocess.run([nvidia_smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    return max(int(line.strip()) for line in out.splitlines() if line.strip())


def nvidia_preflight(wanted: str, artifact: Path, providers: list[str] | None = None,
                     driver: Path = DRIVER) -> tuple[str, str | None]:
    """The provider to open (`wanted`, or "cpu") and why the GPU was passed over, if it was."""
    providers = ort.get_available_providers() if providers is None else providers
    if wanted == "cpu" or (wanted == "auto" and "CUDAExecutionProvider" not in providers):
        return wanted, None
    reason = None
    nvidia_smi = shutil.which("nvidia-smi")
    if not driver.exists():
        reason = "the NVIDIA driver is not loaded (no /proc/driver/nvidia/version)"
    elif not nvidia_smi:
        reason = "nvidia-smi is not installed"
    else:
        need = int(model_bytes(artifact) * HEADROOM) >> 20
        try:
            free = free_gpu_mib(nvidia_smi)
            if free < need:
                reason = f"the GPU has {free} MiB free and the model needs about {need} MiB"
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            reason = f"nvidia-smi did not answer ({type(e).__name__}: {e})"[:300]
    if reason:
        log.error("NVIDIA preflight failed: %s; serving on the CPU instead", reason)
        return "cpu", f"NVIDIA preflight: {reason}"
    return wanted, None
