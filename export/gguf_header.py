"""Read the key/value header of a GGUF file, and nothing else.

The mirror's DeepSeek-R1 tokenizer lives in a GGUF whose tensor data is truncated; gguf's own reader maps the tensors
and fails on it. The header alone holds the architecture, tokenizer and chat template, so this reader stops after it.
Format: magic "GGUF", version (u32), tensor count (u64), key/value count (u64), then typed key/value pairs.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from appliance.errors import UnsupportedModelError

_SCALARS = {  # GGUF value type -> struct format
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise UnsupportedModelError(
                f"{self.path}: GGUF header is truncated at byte {self.pos}; the file is corrupt or not a GGUF model. "
                "Delete it and fetch it again (r1box fetch NAME).")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _NUMPY:
                width = np.dtype(_NUMPY[item_type]).itemsize
                return np.frombuffer(self.take(width * count), dtype=_NUMPY[item_type]).copy()
            return [self.value(item_type) for _ in range(count)]
        raise UnsupportedModelError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}; "
                                    "the file is corrupt or from a newer GGUF version.")


def read_gguf_header(path: str | Path, max_bytes: int = 256 << 20) -> dict:
    """Return the header's key/value pairs, plus `gguf.version` and `gguf.tensor_count`."""
    path = Path(path)
    if not path.is_file():
        raise UnsupportedModelError(f"{path}: no such GGUF file.")
    with path.open("rb") as f:
        data = f.read(max_bytes)
    cur = _Cursor(data, path)
    if cur.take(4) != b"GGUF":
        raise UnsupportedModelError(f"{path}: not a GGUF file (bad magic). Pass a .gguf model, a Hugging Face "
                                    "directory, or a catalog name (r1box models).")
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise UnsupportedModelError(f"{path}: GGUF version {version} is not supported (2 and 3 are).")
    header = {"gguf.version": version, "gguf.tensor_count": cur.unpack("<Q")}
    for _ in range(cur.unpack("<Q")):
        key = cur.string()
        header[key] = cur.value(cur.unpack("<I"))
    return header
