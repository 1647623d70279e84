"""The artifact manifest: the one contract between the export stage and the runtime.

The runtime reads graph input/output names, KV layout, tokenizer files, stop ids and think tags from here and
never guesses them from naming conventions. Every file of the artifact is listed with its sha256; `load_manifest`
refuses an artifact whose files are missing or changed, naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ArtifactError

FORMAT = "r1box-artifact"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_HASH_BLOCK = 8 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def file_entries(directory: Path) -> dict[str, dict]:
    """sha256 and size of every file in the artifact directory except the manifest itself."""
    return {p.name: {"sha256": sha256_of(p), "size": p.stat().st_size}
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}


@dataclass(frozen=True)
class KvLayout:
    """Names and shape of the KV cache: one key and one value tensor per layer, [batch, kv_heads, seq, head_dim]."""

    kind: str  # "past-present": present = concat(past, new), fed back as the next step's past
    dtype: str
    past_key: tuple[str, ...]
    past_value: tuple[str, ...]
    present_key: tuple[str, ...]
    present_value: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    directory: Path
    raw: dict

    @property
    def graph_path(self) -> Path:
        return self.directory / self.raw["graph"]["file"]

    @property
    def io(self) -> dict[str, str]:
        """Role -> tensor name: input_ids, attention_mask, position_ids, logits."""
        return self.raw["graph"]["roles"]

    @property
    def kv(self) -> KvLayout:
        kv = self.raw["kv_cache"]
        return KvLayout(kv["layout"], kv["dtype"], tuple(kv["past_key"]), tuple(kv["past_value"]),
                        tuple(kv["present_key"]), tuple(kv["present_value"]))

    @property
    def arch(self) -> dict:
        return self.raw["architecture"]

    @property
    def chat(self) -> dict:
        return self.raw["chat"]

    @property
    def tokenizer(self) -> dict:
        return self.raw["tokenizer"]

    @property
    def name(self) -> str:
        return self.raw["model"]["name"]

    @property
    def kept_gguf_blocks(self) -> int:
        """MatMuls holding a GGUF's own Q4_K blocks, with float zero points (export/gguf_blocks.py)."""
        return self.raw.get("quantization", {}).get("gguf_blocks_kept", 0)

    @property
    def six_bit_layers(self) -> bool:
        """Whether the MatMuls kept wider than int4 hold 6-bit levels in 8-bit MatMulNBits (export's
        int8_layers_bits), which r1box's int4 kernel reads at 6 bits."""
        return self.raw.get("quantization", {}).get("int8_layers_bits") == 6


def load_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    redo = "Export it again (r1box export SOURCE --out DIR)."
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory. {redo}")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing, so {directory} is not a finished artifact. {redo}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}). {redo}") from None
    if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format {raw.get('format')!r} version {raw.get('format_version')!r} is not "
                            f"{FORMAT} version {FORMAT_VERSION}. {redo}")
    for key in ("model", "architecture", "graph", "kv_cache", "tokenizer", "chat", "files"):
        if key not in raw:
            raise ArtifactError(f"{path} lacks the {key!r} section. {redo}")
    if verify:
        _verify_files(directory, raw["files"], redo)
    return Manifest(directory, raw)


def _verify_files(directory: Path, files: dict[str, dict], redo: str) -> None:
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing. {redo}")
        if path.stat().st_size != entry["size"]:
            raise ArtifactError(f"{path} has {path.stat().st_size} bytes, the manifest says {entry['size']}: the "
                                f"file is truncated or was replaced. {redo}")
        if sha256_of(path) != entry["sha256"]:
            raise ArtifactError(f"{path} does not match its sha256 in the manifest: the file was changed or "
                                f"corrupted. {redo}")
