"""Exported artifacts kept in the cache, keyed by the source's checksum and the export settings, so that the
first `r1box chat` exports and every later one starts at once."""

from __future__ import annotations

import fcntl
from pathlib import Path

from appliance.errors import ArtifactError
from appliance.model import int4_kernel
from appliance.model.manifest import load_manifest
from export.catalog import lookup
from export.fetch import cache_root
from export.pipeline import export_model
from export.progress import say
from export.quantize import QuantConfig


def artifact_path(name: str, quant: QuantConfig | None = None, dtype: str = "float32") -> tuple[Path, QuantConfig]:
    """Where the cache keeps a catalog model's export, and the recipe it is exported by. The export is this box's
    own, so a GGUF's blocks are kept only where its CPU serves their float zero points as they are (r1box's int4
    kernel: x86 with AVX2); a GPU or an ARM box gets them quantized anew."""
    entry = lookup(name)
    keep = entry.keep_gguf_blocks and dtype == "float32" and int4_kernel.cpu_supports()
    quant = quant or QuantConfig(block_size=entry.block_size, int8_layers=entry.int8_layers,
                                 int8_layers_bits=entry.int8_layers_bits, gptq=entry.gptq, gguf_blocks=keep)
    key = entry.mirror.sha256[:16] if entry.mirror else "hub"
    return cache_root() / "artifacts" / f"{name}-{key}-{quant.tag}{'-fp16' if dtype == 'float16' else ''}", quant


def cached_artifact(name: str, quant: QuantConfig | None = None, dtype: str = "float32") -> Path:
    """dtype: float32 for the CPU, float16 for CUDA (export_model's)."""
    out, quant = artifact_path(name, quant, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a second process (a test run beside `r1box chat`, two services starting) must not clear the first's staging
    # folder: it waits for that export and then reuses it
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another process is exporting {name} into {out}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "manifest.json").is_file():
            try:
                load_manifest(out)
                return out
            except ArtifactError as e:
                say(f"cached artifact is damaged, exporting again: {e}")
        say(f"exporting {name} once into {out}; later starts reuse it")
        return export_model(name, out, quant, force=True, dtype=dtype)
