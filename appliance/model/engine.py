"""The engine: continuous batching of many conversations over one decoder, in one worker thread.

Each pass of the worker loop:
  1. drops cancelled sequences and admits waiting ones into free cache slots, copying a cached prefix in if one
     matches (their prompt then needs only its new tokens prefilled);
  2. prefills at most one chunk's worth of prompt tokens (of one long prompt, or of several short ones), so a
     long prompt never stalls the running streams for long;
  3. decodes one token for every running sequence in a single batched run over their slots;
  4. samples, streams each token to its caller, and retires finished sequences (their KV goes to the prefix cache).
Callers live on the asyncio loop; tokens cross over with call_soon_threadsafe. onnxruntime releases the GIL while it
runs, so the loop stays responsive.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from appliance.config import EngineConfig
from appliance.errors import EngineBusy, RequestError
from appliance.model.decoder import Decoder
from appliance.model.prefix_cache import PrefixCache
from appliance.model.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Finish:
    reason: str  # "stop", "length", "cancelled"
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int
    ttft_s: float | None


@dataclass
class _Sequence:
    prompt: list[int]
    sampler: Sampler
    max_tokens: int
    emit: Callable[[object], None]
    in_think: bool
    context: list[int] = field(default_factory=list)  # tokens to prefill: the prompt, or more after a fallback
    slot: int = -1
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    pending: int | None = None  # sampled and streamed, not yet fed to the model
    think_tokens: int = 0
    reused: int = 0
    room: int = 0  # positions reserved against the KV budget while it runs: prompt + max_tokens
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None


# Prompt tokens a pass unless configured: what running streams wait for between two of their tokens. On two CPU
# cores 256 take the 1.5B about 1.4 s; an H200 took its 543-token prompt in one pass in 7.7 ms, against 15.5 in three.
PREFILL_CHUNK = {"cpu": 256, "cuda": 1024}


class Engine:
    def __init__(self, decoder: Decoder, config: EngineConfig = EngineConfig(), *, stop_ids: frozenset[int],
                 think: dict | None = None, fallback: Callable[[], Decoder] | None = None):
        self.decoder, self.config, self.stop_ids = decoder, config, stop_ids
        self.think = think if think and think.get("close_id") is not None else None
        self._fallback = fallback
        self.cache = decoder.new_cache(config.max_batch, config.max_length)
        self.kv_budget = self._kv_budget()
        self.kv_reserved = 0
        self.prefix = PrefixCache(self._prefix_budget(decoder))
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.started = time.time()
        self.fallbacks = 0
        self.fallback_reason: str | None = None
        self.counters = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "prefilled_tokens": 0,
                         "decode_steps": 0, "busy": 0, "cancelled": 0}
        self.last_batch = 0

    def _kv_budget(self) -> int:
        """Positions the running sequences may hold together. On a GPU the buffers are allocated whole, so all."""
        everything = self.cache.slots * self.cache.max_length
        if self.cache.device != "cpu":
            return everything
        return min(everything, (self.config.kv_cache_mb << 20) // self.cache.bytes_per_token)

    def _prefix_budget(self, decoder: Decoder) -> int:
        if decoder.device != "cpu":
            # Copying a slot's positions out of and back into device memory needs a strided device copy that
            # onnxruntime's Python API lacks; a GPU prefills a few hundred tokens in tens of milliseconds anyway.
            log.info("prefix reuse is off on %s: prefill there is fast enough", decoder.provider)
            return 0
        return self.config.prefix_cache_mb << 20

    # ---- the caller's side (asyncio loop) ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="r1box-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread:
            self._thread.join(timeout=30)

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[int | Finish]:
        """Yield token ids as they come, then one Finish. Closing the iterator early cancels the sequence."""
        if not prompt:
            raise RequestError("the prompt is empty.")
        room = min(self.cache.max_length, self.kv_budget) - len(prompt)
        if room < 1:
            raise RequestError(f"the prompt has {len(prompt)} tokens; this engine holds at most "
                               f"{min(self.cache.max_length, self.kv_budget) - 1} plus the answer. Shorten the "
                               "conversation.")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seq = _Sequence(prompt=list(prompt), sampler=Sampler(params, prompt), max_tokens=min(params.max_tokens, room),
                        emit=lambda item: loop.call_soon_threadsafe(queue.put_nowait, item),
                        in_think=bool(self.think and self.think.get("opened_in_prompt")))
        seq.context = seq.prompt
        seq.room = len(prompt) + seq.max_tokens
        with self._wake:
            if len(self._waiting) >= self.config.max_waiting:
                self.counters["busy"] += 1
                raise EngineBusy(f"all {self.config.max_batch} slots are busy and {len(self._waiting)} requests "
                                 "wait; try again in a few seconds.")
            self._waiting.append(seq)
            self.counters["requests"] += 1
            self._wake.notify()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finish):
                    finished = True
                    return
        finally:
            if not finished:
                with self._wake:
                    seq.cancelled = True
                    self._wake.notify()

    def stats(self) -> dict:
        with self._lock:
            running, waiting = len(self._running), len(self._waiting)
        return {
            "provider": self.decoder.provider, "fallbacks": self.fallbacks, "fallback_reason": self.fallback_reason,
            "running": running, "waiting": waiting, "slots": self.config.max_batch,
            "free_slots": len(self.cache.free), "batch_size": self.last_batch,
            "kv_cache_usage": round(float(self.cache.lengths.sum()) / self.kv_budget, 4),
            "kv_cache_bytes": self.cache.resident_bytes(),
            "kv_budget_bytes": self.kv_budget * self.cache.bytes_per_token,
            "kv_reserved_bytes": self.kv_reserved * self.cache.bytes_per_token,
            "prefix_cache": {"entries": len(self.prefix), "bytes": self.prefix.nbytes, "hits": self.prefix.hits,
                             "misses": self.prefix.misses, "reused_tokens": self.prefix.reused_tokens},
            **self.counters,
        }

    # ---- the worker's side ----

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stopping:
                    break
                self._sweep_cancelled()
                self._admit()
                running = list(self._running)
            try:
                self._step(running)
            except Exception as e:  # a provider failing at run time: fall back, or fail these sequences
                self._recover(e)
        with self._lock:
            for seq in list(self._running) + list(self._waiting):
                seq.emit(RuntimeError("the engine stopped"))

    def _sweep_cancelled(self) -> None:
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
            self.counters["cancelled"] += 1
        for seq in [s for s in self._running if s.cancelled]:
            # what it prefilled is kept: a caller that gave up (a background question yielding to a user's) and
            # asks again resumes there instead of prefilling a long prompt from the start each time
            self._retire(seq, store=True)
            self.counters["cancelled"] += 1

    def _admit(self) -> None:
        # first come, first served: a long request at the head waits for room rather than be overtaken for ever
        while self._waiting and self.cache.free and self.kv_reserved + self._waiting[0].room <= self.kv_budget:
            seq = self._waiting.popleft()
            self.kv_reserved += seq.room
            seq.slot = self.cache.allocate()
            reused, blocks = self.prefix.lookup(seq.context)
            if blocks is not None:
                self.cache.write(seq.slot, blocks)
            seq.prefilled = seq.reused = reused
            self._running.append(seq)

    def _step(self, running: list[_Sequence]) -> None:
        # 1. prefill up to prefill_chunk prompt tokens, oldest prompt first: a long prompt goes in chunks, several
        #    short ones in one pass (a burst of new conversations does not cost a decode step each)
        budget = self.config.prefill_chunk or PREFILL_CHUNK[self.decoder.device]
        for seq in [s for s in running if s.prefilled < len(s.context) and not s.cancelled]:
            if budget <= 0:
                break
            chunk = seq.context[seq.prefilled:seq.prefilled + budget]
            logits = self.decoder.prefill(self.cache, seq.slot, chunk)
            seq.prefilled += len(chunk)
            budget -= len(chunk)
            self.counters["prefilled_tokens"] += len(chunk)
            if seq.prefilled == len(seq.context):
                self._accept(seq, logits)
        # 2. one decode step for every sequence with a token to feed
        decoding = sorted((s for s in running if s.pending is not None and not s.cancelled), key=lambda s: s.slot)
        self.last_batch = len(decoding)
        if not decoding:
            return
        first, last = decoding[0].slot, decoding[-1].slot
        tokens = np.zeros((last - first + 1, 1), np.int64)
        for seq in decoding:
            tokens[seq.slot - first, 0] = seq.pending
        # idle rows in between get a dummy token at their first unused position; their lengths do not advance
        logits = self.decoder.step(self.cache, first, tokens, self.cache.lengths[first:last + 1] + 1)
        self.counters["decode_steps"] += 1
        for seq in decoding:
            self.cache.lengths[seq.slot] += 1
            self._accept(seq, logits[seq.slot - first])

    def _accept(self, seq: _Sequence, logits: np.ndarray) -> None:
        """Choose the next token from the logits, stream it, and retire the sequence if it is done."""
        if seq.in_think and self.config.think_budget and seq.think_tokens >= self.config.think_budget:
            token = self.think["close_id"]  # enough reasoning: close the block so the answer comes in time
        else:
            token = seq.sampler(logits)
        if seq.in_think:
            if token == self.think["close_id"]:
                seq.in_think = False
            else:
                seq.think_tokens += 1
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        seq.generated.append(token)
        seq.pending = token
        self.counters["generated_tokens"] += 1
        seq.emit(token)
        reason = None
        if token in self.stop_ids:
            reason = "stop"
        elif len(seq.generated) >= seq.max_tokens or self.cache.lengths[seq.slot] + 1 >= self.cache.max_length:
            reason = "length"
        if reason:  # the slot is free before the caller hears of the end
            with self._lock:
                self._retire(seq, store=True)
            seq.emit(Finish(reason, len(seq.prompt), len(seq.generated), seq.reused,
                            seq.first_token_at - seq.submitted))

    def _retire(self, seq: _Sequence, store: bool) -> None:
        """Free the sequence's slot; keep its KV for a later turn that starts the same way. Caller holds the lock."""
        fed = int(self.cache.lengths[seq.slot])
        if store and fed and self.prefix.budget:
            tokens = (seq.context + seq.generated[len(seq.context) - len(seq.prompt):])[:fed]
            self.prefix.store(tokens, self.cache.read(seq.slot, fed))
        self.cache.release(seq.slot)
        self.kv_reserved -= seq.room
        self._running.remove(seq)
        self.counters["prompt_tokens"] += len(seq.prompt)

    def _recover(self, error: Exception) -> None:
        with self._lock:
            running = list(self._running)
            if self._fallback is None or self.decoder.provider == "cpu":
                log.exception("engine step failed; the running requests end with an error")
                for seq in running:
                    seq.emit(RuntimeError(f"inference failed ({type(error).__name__}); try again"))
                    self._retire(seq, store=False)
                return
            log.error("provider %s failed at run time (%s); falling back to the CPU and resuming %d sequences",
                      self.decoder.provider, error, len(running))
            self.decoder = self._fallback()
            self.cache = self.decoder.new_cache(self.config.max_batch, self.config.max_length)
            self.kv_budget, self.kv_reserved = self._kv_budget(), 0
            self.prefix = PrefixCache(self._prefix_budget(self.decoder))
            self.fallbacks += 1
            self.fallback_reason = f"{type(error).__name__}: {error}"[:300]
            # resume each stream where it was: its prompt and what it already said are prefilled again
            self._running.clear()
            for seq in reversed(running):
                seq.room = min(seq.room, self.kv_budget)  # the CPU's budget may be smaller than the GPU's cache
                seq.context = seq.prompt + seq.generated
                seq.prefilled, seq.pending, seq.slot = 0, None, -1
                self._waiting.appendleft(seq)
