"""The admin pages show the pair: this box's role, its peer, the store's epoch, when the peer last confirmed its copy
and the last takeover, as the node wrote them (the real admin app; the node's file as `r1box ha run` writes it)."""

import json
import time

from tests.admin_site import log_in, site  # noqa: F401 (fixture)


async def test_the_backends_page_shows_the_pair(site):
    async with await log_in(site, "viewer") as http:
        async with http.get(f"{site.url}/backends") as resp:
            page = await resp.text()
        assert "Hot standby" in page and "10.0.0.50/24" in page and "<strong>off</strong>" in page
        state = site.db_path.parent / "ha"
        state.mkdir()
        now = time.time()
        (state / "role.json").write_text(json.dumps({
            "role": "active", "node": "box-b", "since": now - 60, "epoch": 3, "replicated_at": now - 2,
            "last_takeover": {"at": now - 60, "epoch": 3, "source": "peer", "took_s": 0.08}}))
        async with http.get(f"{site.url}/backends") as resp:
            page = await resp.text()
    assert "box-b: <strong>active</strong>" in page and "10.0.0.2" in page
    assert "epoch 3, the store from peer, in 0.08 s" in page and "confirmed 2" in page
