"""The KV cache: one preallocated buffer per layer and kind, cut into slots, one slot per running sequence.

    key[layer], value[layer]: [slots, kv_heads, max_length, head_dim]

The graph's attention writes new positions into the buffer in place (past and present are bound to the same
memory), so a decode step never reallocates or copies the cache. A slot is a row; a batch of rows lo..hi is bound as
one contiguous view, which is why sequences are given the lowest free slot. On CUDA the buffers live on the device.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class KvCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, slots: int, max_length: int, dtype=np.float32,
                 device: str = "cpu"):
        assert slots >= 1 and max_length >= 2
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.slots, self.max_length, self.dtype, self.device = slots, max_length, np.dtype(dtype), device
        shape = (slots, kv_heads, max_length, head_dim)
        # 2·layers buffers in graph order: layer 0 key, layer 0 value, layer 1 key, …
        if device == "cpu":
            self._host = [np.zeros(shape, self.dtype) for _ in range(2 * layers)]
            self._ptrs = [a.ctypes.data for a in self._host]
        else:
            self._device = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, device, 0)
                            for _ in range(2 * layers)]
            self._ptrs = [v.data_ptr() for v in self._device]
        self.row_bytes = kv_heads * max_length * head_dim * self.dtype.itemsize
        self.lengths = np.zeros(slots, np.int64)  # valid positions per slot
        self.free = set(range(slots))
        self.bindings: dict[tuple, ort.IOBinding] = {}  # the decoder's, per row range: at most slots² of them

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return 2 * self.layers * self.slots * self.row_bytes

    def usage(self) -> float:
        """Share of the cache's positions that hold a sequence's tokens."""
        return float(self.lengths.sum()) / (self.slots * self.max_length)

    def allocate(self) -> int:
        assert self.free, "no free slot: the scheduler admits only as many sequences as there are slots"
        slot = min(self.free)
        self.free.remove(slot)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        assert slot not in self.free
        self.lengths[slot] = 0
        self.free.add(slot)

    def bind(self, binding: ort.IOBinding, names: list[tuple[str, str]], first: int, rows: int) -> None:
        """Bind rows first..first+rows-1 of every buffer as both past (input) and present (output)."""
        assert 0 <= first and first + rows <= self.slots
        shape = [rows, self.kv_heads, self.max_length, self.head_dim]
        for ptr, (past, present) in zip(self._ptrs, names):
            address = ptr + first * self.row_bytes
            binding.bind_input(past, self.device, 0, self.dtype, shape, address)
            binding.bind_output(present, self.device, 0, self.dtype, shape, address)

    def read(self, slot: int, length: int) -> list[np.ndarray]:
        """Copy of a slot's first `length` positions, per buffer [kv_heads, length, head_dim] (for the prefix cache)."""
        assert self.device == "cpu", "prefix reuse copies host memory; the engine turns it off on a GPU"
        assert length <= self.max_length
        return [a[slot, :, :length].copy() for a in self._host]

    def write(self, slot: int, blocks: list[np.ndarray]) -> None:
        """Put saved positions back at the start of a slot and set its length."""
        assert self.device == "cpu", "prefix reuse copies host memory; the engine turns it off on a GPU"
        length = blocks[0].shape[1]
        assert len(blocks) == 2 * self.layers and length <= self.max_length
        for a, block in zip(self._host, blocks):
            a[slot, :, :length] = block
        self.lengths[slot] = length
