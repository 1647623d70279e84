"""The KV cache sized by a memory budget: on the CPU its buffers are address space, pages arrive as positions are
written and go back when a slot is released, and the engine admits a sequence only with room for its prompt and its
whole answer within kv_cache_mb. The real tiny decoder; memory read from /proc."""

import asyncio

import numpy as np
import pytest

from appliance.config import EngineConfig
from appliance.model.decoder import Decoder
from appliance.model.engine import Engine, Finish
from appliance.model.generate import generate
from appliance.model.kv_cache import KvCache
from appliance.model.manifest import load_manifest
from appliance.model.sampling import SamplingParams
from appliance.model.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def artifact(tiny_fp32):
    manifest = load_manifest(tiny_fp32)
    return manifest, ChatTokenizer(manifest)


def _resident() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no RssAnon in /proc/self/status")


def test_memory_follows_the_positions_written_not_the_cache_size(artifact):
    manifest, tok = artifact
    decoder = Decoder(manifest, threads=1, huge_pages=False)
    before = _resident()
    # rows longer than the tiny model's context (the positions written stay inside it): a cache of real size
    cache = KvCache(decoder.layers, decoder.kv_heads, decoder.head_dim, slots=64, max_length=8192)
    row = cache.bytes_per_token * cache.max_length  # one slot, every buffer
    virtual = row * cache.slots
    assert virtual > 200 << 20  # large enough that holding it would show
    prompt = tok.encode(tok.render([{"role": "user", "content": "hello " * 40}]))
    for slot in range(0, 64, 8):  # sequences spread over the rows, as a batch of sparse slots
        cache.allocate()
        decoder.prefill(cache, slot, prompt)
    grown = _resident() - before
    assert grown < virtual / 10, f"{grown >> 20} MB resident of a {virtual >> 20} MB cache"
    # a full row written, then released: its memory comes back
    full = cache.allocate()
    cache.write(full, [np.ones((cache.kv_heads, cache.max_length, cache.head_dim), cache.dtype)] * (2 * cache.layers))
    assert _resident() - before > row * 0.9
    cache.release(full)
    assert _resident() - before < grown + row * 0.1
    assert not cache._host[0][full].any()  # and reads as zeros


async def _collect(engine, prompt, params) -> tuple[list[int], Finish]:
    tokens = []
    async for item in engine.generate(prompt, params):
        if isinstance(item, Finish):
            return tokens, item
        tokens.append(item)


async def test_sequences_wait_for_room_in_the_budget_and_lose_nothing(artifact):
    manifest, tok = artifact
    decoder = Decoder(manifest, threads=1)
    prompts = [tok.encode(tok.render([{"role": "user", "content": f"question {i}: " + "why? " * 20}]))
               for i in range(4)]
    params = SamplingParams(max_tokens=16)
    expected = [list(generate(decoder, p, 16, frozenset())) for p in prompts]
    need = max(len(p) for p in prompts) + 16
    per_token = decoder.new_cache(1, 16).bytes_per_token
    budget_mb = -(-(2 * need * per_token) // (1 << 20))  # room for about two of them at a time
    slots = 4
    engine = Engine(decoder, EngineConfig(max_batch=slots, kv_cache_mb=budget_mb), stop_ids=frozenset())
    budget_tokens = engine.kv_budget
    peak = []

    async def watch():
        while True:
            peak.append(engine.stats()["kv_reserved_bytes"])
            await asyncio.sleep(0.001)

    engine.start()
    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(*(_collect(engine, p, params) for p in prompts))
    finally:
        watcher.cancel()
        engine.stop()
    assert [tokens for tokens, _ in results] == expected
    assert max(peak) <= budget_tokens * per_token
    if budget_tokens < slots * need:  # fewer fit than there are slots: the budget, not the slots, held them back
        assert max(peak) < slots * need * per_token
    stats = engine.stats()
    assert stats["kv_reserved_bytes"] == stats["kv_cache_bytes"] == 0 and stats["free_slots"] == slots

