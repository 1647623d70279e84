"""The image cache keeps the newest few images of earlier inputs and removes the rest before a build adds one: each
is about 3 GB, and every edit of appliance/ changes the key."""

import os
import time

from firmware_image import images


def test_prune_keeps_the_newest_images_and_what_is_not_an_image(tmp_path, monkeypatch):
    monkeypatch.setenv("R1BOX_CACHE", str(tmp_path))
    root = images.cache_root()
    now = time.time()
    for age, key in enumerate(["a", "b", "c", "d"]):
        (root / key).mkdir(parents=True)
        (root / key / "r1box-amd64.img").write_bytes(b"disk")
        os.utime(root / key, (now - age * 60, now - age * 60))
    (root / "half-built").mkdir()  # a build that failed before it wrote its image: not counted, not touched
    (root / "mmdebstrap-amd64.log").write_text("log")
    new = root / "e"
    images._prune(keep=new)
    kept = sorted(p.name for p in root.iterdir() if (p / "r1box-amd64.img").exists())
    assert kept == ["a", "b", "c", "d"][:images.KEEP]  # the newest
    assert (root / "half-built").is_dir() and (root / "mmdebstrap-amd64.log").is_file()
