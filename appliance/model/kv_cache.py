"""The KV cache: one buffer per layer and kind, cut into slots, one slot per running sequence.

    key[layer], value[layer]: [slots, kv_heads, max_length, head_dim]

The graph's attention writes new positions into the buffer in place (past and present are bound to the same
memory), so a decode step never reallocates or copies the cache. A slot is a row; a batch of rows lo..hi is bound as
one contiguous view, which is why sequences are given the lowest free slot. On CUDA the buffers live on the device.

On the CPU the buffers are address space, not memory: anonymous mappings whose pages the kernel supplies as positions
are written, and a released slot's pages go back to it. So slots × max_length can be generous while the memory held
follows the tokens actually cached, and the engine bounds that by its budget (EngineConfig.kv_cache_mb). Huge pages
are refused here: one written position would make 2 MiB of a row resident.
"""

from __future__ import annotations

import mmap

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
            count = int(np.prod(shape))
            self._maps = [_reserve(count * self.dtype.itemsize) for _ in range(2 * layers)]
            self._host = [np.frombuffer(m, self.dtype, count).reshape(shape) for m in self._maps]
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

    def allocate(self) -> int:
        assert self.free, "no free slot: the scheduler admits only as many sequences as there are slots"
        slot = min(self.free)
        self.free.remove(slot)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        assert slot not in self.free
        if self.device == "cpu" and self.lengths[slot]:
            start = -(-slot * self.row_bytes // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages of this row only
            end = (slot + 1) * self.row_bytes // mmap.PAGESIZE * mmap.PAGESIZE
            if end > start:
                for m in self._maps:
                    m.madvise(mmap.MADV_DONTNEED, start, end - start)  # reads as zeros again; memory returned
        self.lengths[slot] = 0
        self.free.add(slot)

    def resident_bytes(self) -> int:
        """Bytes the cached positions occupy (the pages behind them, to within a page per row and buffer)."""
        return int(self.lengths.sum()) * self.bytes_per_token

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


def _reserve(size: int) -> mmap.mmap:
    """Zeroed, writable address space that takes memory only where written."""
    memory = mmap.mmap(-1, max(size, mmap.PAGESIZE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return memory
