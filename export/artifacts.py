"""Exported artifacts kept in the cache, keyed by the source's checksum and the export settings, so that the
first `r1box chat` exports and every later one starts at once."""

from __future__ import annotations

from pathlib import Path

from appliance.errors import ArtifactError
from appliance.model.manifest import load_manifest
from export.catalog import lookup
from export.fetch import cache_root
from export.pipeline import export_model
from export.progress import say
from export.quantize import QuantConfig


def cached_artifact(name: str, quant: QuantConfig | None = None, dtype: str = "float32") -> Path:
    """dtype: float32 for the CPU, float16 for CUDA (export_model's)."""
    entry = lookup(name)
    quant = quant or QuantConfig(block_size=entry.block_size, int8_layers=entry.int8_layers)
    key = entry.mirror.sha256[:16] if entry.mirror else "hub"
    out = cache_root() / "artifacts" / f"{name}-{key}-{quant.tag}{'-fp16' if dtype == 'float16' else ''}"
    if (out / "manifest.json").is_file():
        try:
            load_manifest(out)
            return out
        except ArtifactError as e:
            say(f"cached artifact is damaged, exporting again: {e}")
    say(f"exporting {name} once into {out}; later starts reuse it")
    return export_model(name, out, quant, force=True, dtype=dtype)
