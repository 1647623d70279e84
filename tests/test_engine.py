"""Continuous batching on the real decoder (the tiny fp32 artifact): the same tokens as running each request alone,
prefix reuse, cancellation, a bounded queue, the think budget, and falling back when a provider fails."""

import asyncio

import pytest

from appliance.config import EngineConfig
from appliance.errors import EngineBusy, RequestError
from appliance.model.decoder import Decoder
from appliance.model.engine import PREFILL_CHUNK, Engine, Finish
from appliance.model.generate import generate
from appliance.model.manifest import load_manifest
from appliance.model.sampling import SamplingParams
from appliance.model.tokenizer import ChatTokenizer

GREEDY = SamplingParams(max_tokens=12)


@pytest.fixture(scope="module")
def artifact(tiny_fp32):
    manifest = load_manifest(tiny_fp32)
    return manifest, ChatTokenizer(manifest)


def _engine(manifest, **config) -> Engine:
    engine = Engine(Decoder(manifest, threads=1), EngineConfig(**{"max_batch": 4, **config}), stop_ids=frozenset(),
                    think=None)
    engine.start()
    return engine


async def _collect(engine, prompt, params=GREEDY) -> tuple[list[int], Finish]:
    tokens = []
    async for item in engine.generate(prompt, params):
        if isinstance(item, Finish):
            return tokens, item
        tokens.append(item)


def _prompts(tok, n):
    return [tok.encode(tok.render([{"role": "user", "content": f"question number {i}: " + "why? " * i}]))
            for i in range(n)]


async def test_batched_requests_equal_each_run_alone(artifact):
    manifest, tok = artifact
    prompts = _prompts(tok, 7)  # more than the 4 slots: some wait, join as others leave
    alone = Decoder(manifest, threads=1)
    expected = [list(generate(alone, p, 12, frozenset())) for p in prompts]
    engine = _engine(manifest, prefill_chunk=5)  # chunked prefill interleaved with decoding
    try:
        results = await asyncio.gather(*(_collect(engine, p) for p in prompts))
    finally:
        engine.stop()
    assert [tokens for tokens, _ in results] == expected
    assert all(f.reason == "length" and f.completion_tokens == 12 for _, f in results)
    stats = engine.stats()
    assert stats["running"] == stats["waiting"] == 0 and stats["free_slots"] == 4
    assert stats["decode_steps"] < 7 * 11  # decode steps were shared


async def test_an_unset_prefill_chunk_is_the_providers(artifact):
    manifest, _ = artifact
    engine = _engine(manifest)  # [engine] prefill_chunk left at 0
    passes, prefill = [], engine.decoder.prefill

    def counted(cache, slot, tokens, chunk=0):
        passes.append(len(tokens))
        return prefill(cache, slot, tokens, chunk)

    engine.decoder.prefill = counted
    try:
        await _collect(engine, list(range(1000, 1300)), SamplingParams(max_tokens=2))
    finally:
        engine.stop()
    assert passes == [PREFILL_CHUNK["cpu"], 300 - PREFILL_CHUNK["cpu"]]


async def test_prefix_reuse_gives_the_same_tokens_with_less_prefill(artifact):
    manifest, tok = artifact
    turn1 = [{"role": "system", "content": "You are a patient bank assistant. " * 6},
             {"role": "user", "content": "How do I open an account?"}]
    first = tok.encode(tok.render(turn1))
    engine = _engine(manifest)
    cold = _engine(manifest, prefix_cache_mb=0)
    try:
        answer, f1 = await _collect(engine, first)
        turn2 = turn1 + [{"role": "assistant", "content": tok.decode(answer)},
                         {"role": "user", "content": "And on weekends?"}]
        second = tok.encode(tok.render(turn2))
        prefilled_before = engine.stats()["prefilled_tokens"]
        warm_tokens, f2 = await _collect(engine, second)
        cold_tokens, f3 = await _collect(cold, second)
    finally:
        engine.stop()
        cold.stop()
    # everything up to the first answer is reused; the opened "<think>\n" of turn 1 is not in turn 2's text
    assert f1.reused_tokens == 0 and f2.reused_tokens >= len(first) - 2 and f3.reused_tokens == 0
    assert warm_tokens == cold_tokens
    assert engine.stats()["prefilled_tokens"] - prefilled_before == len(second) - f2.reused_tokens
    assert engine.stats()["prefix_cache"]["hits"] == 1


async def test_a_cancelled_request_leaves_its_prefill_for_the_next_ask(artifact):
    """Asked again after giving up, the same prompt reuses what was computed, and gives the same tokens."""
    manifest, tok = artifact
    prompt = tok.encode(tok.render([{"role": "system", "content": "You answer from the branch's fact sheet. " * 8},
                                    {"role": "user", "content": "When do you open?"}]))
    engine, cold = _engine(manifest, max_batch=1, prefill_chunk=16), _engine(manifest, prefix_cache_mb=0)
    try:
        stream = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0))
        await anext(stream)
        await stream.aclose()
        tokens, finish = await _collect(engine, prompt)
        cold_tokens, _ = await _collect(cold, prompt)
    finally:
        engine.stop()
        cold.stop()
    assert engine.stats()["cancelled"] == 1 and finish.reused_tokens >= len(prompt) - 1
    assert tokens == cold_tokens


async def test_cancelled_stream_frees_its_slot(artifact):
    manifest, tok = artifact
    engine = _engine(manifest, max_batch=1)
    try:
        stream = engine.generate(_prompts(tok, 1)[0], SamplingParams(max_tokens=500))
        got = [await anext(stream) for _ in range(3)]
        await stream.aclose()
        for _ in range(100):
            if engine.stats()["free_slots"] == 1:
                break
            await asyncio.sleep(0.02)
        assert len(got) == 3 and engine.stats()["free_slots"] == 1 and engine.stats()["cancelled"] == 1
        tokens, finish = await _collect(engine, _prompts(tok, 2)[1])  # the slot serves the next request
        assert finish.completion_tokens == 12
    finally:
        engine.stop()


async def test_full_queue_is_busy_and_nothing_leaks(artifact):
    manifest, tok = artifact
    engine = _engine(manifest, max_batch=2, max_waiting=3)
    prompt = _prompts(tok, 1)[0]
    try:
        results = await asyncio.gather(*(_collect(engine, prompt, SamplingParams(max_tokens=4))
                                         for _ in range(40)), return_exceptions=True)
    finally:
        engine.stop()
    served = [r for r in results if not isinstance(r, BaseException)]
    busy = [r for r in results if isinstance(r, EngineBusy)]
    assert len(served) + len(busy) == 40 and busy and len(served) >= 2
    assert len({tuple(t) for t, _ in served}) == 1
    stats = engine.stats()
    assert (stats["running"], stats["waiting"], stats["free_slots"], stats["kv_cache_usage"]) == (0, 0, 2, 0.0)


async def test_prompt_longer_than_the_context_is_refused(artifact):
    manifest, tok = artifact
    engine = _engine(manifest, max_length=32)
    try:
        with pytest.raises(RequestError, match="Shorten"):
            await _collect(engine, list(range(100, 140)))
        tokens, finish = await _collect(engine, list(range(100, 120)), SamplingParams(max_tokens=100))
        assert finish.reason == "length" and len(tokens) == 32 - 20
    finally:
        engine.stop()


async def test_think_budget_closes_the_reasoning(artifact):
    manifest, tok = artifact
    think = manifest.chat["think"]
    engine = Engine(Decoder(manifest, threads=1), EngineConfig(max_batch=1, think_budget=3), stop_ids=frozenset(),
                    think=think)
    engine.start()
    try:
        tokens, _ = await _collect(engine, _prompts(tok, 1)[0], SamplingParams(max_tokens=10))
    finally:
        engine.stop()
    assert think["close_id"] in tokens[:4]


class FailingDecoder(Decoder):
    """A provider that dies at its third run, as a GPU does when its driver resets."""

    runs = 0

    def step(self, *args, **kwargs):
        FailingDecoder.runs += 1
        if FailingDecoder.runs == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().step(*args, **kwargs)


async def test_runtime_failure_falls_back_to_the_cpu_and_resumes(artifact):
    manifest, tok = artifact
    prompts = _prompts(tok, 2)
    expected = [list(generate(Decoder(manifest, threads=1), p, 12, frozenset())) for p in prompts]
    failing = FailingDecoder(manifest, threads=1)
    failing.provider = "cuda"  # what it stands for
    engine = Engine(failing, EngineConfig(max_batch=2), stop_ids=frozenset(),
                    fallback=lambda: Decoder(manifest, threads=1, provider="cpu"))
    engine.start()
    try:
        results = await asyncio.gather(*(_collect(engine, p) for p in prompts))
    finally:
        engine.stop()
    assert [t for t, _ in results] == expected
    stats = engine.stats()
    assert stats["provider"] == "cpu" and stats["fallbacks"] == 1 and "illegal memory" in stats["fallback_reason"]
