"""Huge pages for the weights: which mappings are asked for, and that the kernel really collapses them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.model.hugepages import HUGE_PAGE, anonymous_regions, collapse_anonymous_memory, thp_mode

MAPS = """\
55d0c0000000-55d0c0a00000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0000201000-7f0004000000 rw-p 00000000 00:00 0
7f1000000000-7f1004000000 r--p 00000000 08:01 1234                       /usr/lib/libfoo.so
7f2000000000-7f2004000000 rw-p 00000000 08:01 1235                       /usr/lib/libbar.so
7f3000000000-7f3004000000 rw-s 00000000 00:05 99                         /dev/shm/x
7ffc00000000-7ffc01000000 rw-p 00000000 00:00 0                          [stack]
"""


def test_only_large_private_anonymous_mappings_are_chosen_and_trimmed_to_huge_pages():
    regions = anonymous_regions(MAPS)
    assert regions == [(0x55d0c0000000, 0x55d0c0a00000), (0x7f0000400000, 0x7f0004000000)]
    assert all(start % HUGE_PAGE == 0 and end % HUGE_PAGE == 0 for start, end in regions)


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping holding address, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="this kernel offers no transparent huge pages")
def test_a_weight_sized_array_ends_up_on_huge_pages():
    weights = np.ones(64 << 20, np.uint8)  # 64 MB, like one layer's int4 weights: its own anonymous mapping
    collapsed = collapse_anonymous_memory()
    assert collapsed >= 32 << 20
    # madvise splits the mapping at 2 MiB boundaries: the array's middle lies in the part made of huge pages
    assert _anon_huge_kb(weights.ctypes.data + (32 << 20)) >= 32 << 10
    assert weights.sum() == 64 << 20  # the contents survived the move
