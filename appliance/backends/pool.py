"""The model backends of `r1box serve`, in one place: the door the dialog goes through to ask a model.

Backends are an ordered list ([[backends]]; the box's own `r1box model` first by default). A question goes to the
best backend that is up and has room: lowest priority first, shared by weight among equals, the next one when it
is full. Each backend has a circuit breaker: a failure opens it (no more questions); the background probe
(GET /v1/models every probe_interval_s) closes it once it answers again, or, where an answer had failed, lets one
trial question through first (half-open), whose good answer closes it. A failed answer is asked whole of the next
backend. When none can answer, NoBackend goes up to the dialog, which answers from the answer cache or holds the
question (recorded in the store) until `wait_up()` returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from dataclasses import dataclass

import aiohttp

from appliance.backends.client import Backend, Completion
from appliance.config import BackendConfig
from appliance.errors import BackendError, NoBackend
from appliance.ops.metrics import Metrics

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "up", "down", "trial"


@dataclass
class BackendStats:
    requests: int = 0
    errors: int = 0
    failovers: int = 0  # answers this backend failed that another one then gave
    last_error: str = ""
    last_error_at: float = 0.0
    last_latency_s: float = 0.0
    last_first_token_s: float = 0.0


class Breaker:
    """closed (up) → a failure → open (down) → the probe answers → closed again, or, when it was an answer that
    failed, half-open (one trial question) first → closed; a failed trial opens it again with a doubled wait before
    the next probe may let it back."""

    def __init__(self, base_cooldown_s: float = 1.0, max_cooldown_s: float = 30.0):
        self.state, self.cooldown_s = CLOSED, base_cooldown_s
        self.base_s, self.max_s, self.opened_at, self.trial = base_cooldown_s, max_cooldown_s, 0.0, False
        self.answer_failed = False  # the probe alone cannot vouch for a backend whose answers failed

    def allow(self) -> bool:
        return self.state == CLOSED or (self.state == HALF_OPEN and not self.trial)

    def success(self) -> None:
        self.state, self.cooldown_s, self.trial, self.answer_failed = CLOSED, self.base_s, False, False

    def failure(self, answering: bool) -> None:
        if self.state == HALF_OPEN:  # it answered the probe but not a question: wait longer before trusting it
            self.cooldown_s = min(self.cooldown_s * 2, self.max_s)
        self.state, self.opened_at, self.trial = OPEN, time.monotonic(), False
        self.answer_failed = self.answer_failed or answering

    def probed(self) -> None:
        """It answered its probe."""
        if self.state == OPEN:
            self.state = HALF_OPEN if self.answer_failed else CLOSED

    def probe_due(self) -> bool:
        return self.state == OPEN and time.monotonic() - self.opened_at >= self.cooldown_s


class Backends:
    def __init__(self, configs: tuple[BackendConfig, ...], session: aiohttp.ClientSession,
                 metrics: Metrics | None = None, probe_interval_s: float = 1.0):
        self.metrics, self.session = metrics, session
        self.backends = [Backend(c, session) for c in configs]
        self.breakers = {b.label: Breaker() for b in self.backends}
        self.stats = {b.label: BackendStats() for b in self.backends}
        self.in_flight = {b.label: 0 for b in self.backends}
        self.probe_interval_s = probe_interval_s
        self._up = asyncio.Event()
        self._up.set()  # optimistic until the first probe says otherwise, so the first question is not held up
        self._freed = asyncio.Event()
        self._prober: asyncio.Task | None = None

    # ---- asking ----

    async def complete(self, messages: list[dict], max_tokens: int) -> Completion:
        """One whole answer from the first backend that gives one; NoBackend when none could."""
        tried: set[str] = set()
        failures: list[str] = []
        while True:
            backend = await self._pick(tried)
            if backend is None:
                self._update_up()
                raise NoBackend("no model backend could answer: " + ("; ".join(failures) or "all are down"))
            tried.add(backend.label)
            try:
                completion = await self._ask(backend, messages, max_tokens)
            except BackendError as e:
                failures.append(str(e))
                log.warning("%s; asking the next backend for the whole answer", e,
                            extra={"backend": backend.label})
                continue
            if failures:
                for label in tried - {backend.label}:
                    self.stats[label].failovers += 1
            return completion

    async def _ask(self, backend: Backend, messages: list[dict], max_tokens: int) -> Completion:
        label, breaker, stats = backend.label, self.breakers[backend.label], self.stats[backend.label]
        if breaker.state == HALF_OPEN:
            breaker.trial = True
        self.in_flight[label] += 1
        stats.requests += 1
        try:
            completion = await backend.complete(messages, max_tokens)
        except BackendError as e:
            stats.errors += 1
            stats.last_error, stats.last_error_at = str(e), time.time()
            breaker.failure(answering=True)
            self._update_up()
            raise
        except BaseException:
            if breaker.state == HALF_OPEN:
                breaker.trial = False  # cancelled, not failed: the next question may be the trial
            raise
        finally:
            self.in_flight[label] -= 1
            self._freed.set()
        breaker.success()
        stats.last_latency_s, stats.last_first_token_s = completion.total_s, completion.first_token_s
        if self.metrics:
            self.metrics.backend_latency.labels(label).observe(completion.total_s)
            self.metrics.backend_ttft.labels(label).observe(completion.first_token_s)
        self._update_up()
        return completion

    async def _pick(self, tried: set[str]) -> Backend | None:
        """The best backend not yet tried that is up and has room; when every candidate is full, wait for room
        rather than skip past them all."""
        while True:
            candidates = [b for b in self.backends if b.label not in tried and self.breakers[b.label].allow()]
            if not candidates:
                return None
            free = [b for b in candidates if self.in_flight[b.label] < b.config.max_concurrent]
            if free:
                best = min(b.config.priority for b in free)
                group = [b for b in free if b.config.priority == best]
                return random.choices(group, weights=[b.config.weight for b in group])[0]
            self._freed.clear()
            await self._freed.wait()

    # ---- a promoted model ----

    def add_first(self, config: BackendConfig) -> Backend:
        """A backend ahead of all the others (a promoted release's candidate): new questions go to it from now
        on, questions in flight finish where they are, and the others stay behind it as its fallback."""
        if config.label in self.breakers:
            return next(b for b in self.backends if b.label == config.label)
        first = min((b.config.priority for b in self.backends), default=0) - 1
        backend = Backend(dataclasses.replace(config, priority=first), self.session)
        self.breakers[backend.label], self.stats[backend.label] = Breaker(), BackendStats()
        self.in_flight[backend.label] = 0
        self.backends.insert(0, backend)
        log.info("backend %s now comes first", backend.label, extra={"backend": backend.label})
        return backend

    def serving(self) -> Backend | None:
        """The backend new questions go to first, among those up."""
        up = [b for b in self.backends if self.breakers[b.label].allow()]
        return min(up, key=lambda b: b.config.priority) if up else None

    @property
    def busy(self) -> bool:
        return any(self.in_flight.values())

    # ---- health ----

    def _update_up(self) -> None:
        if any(self.breakers[b.label].allow() for b in self.backends):
            self._up.set()
        else:
            self._up.clear()

    @property
    def any_up(self) -> bool:
        return self._up.is_set()

    async def wait_up(self) -> None:
        await self._up.wait()

    async def probe(self, backend: Backend) -> None:
        """Ask one backend for its models; mark it by the answer."""
        breaker = self.breakers[backend.label]
        try:
            models = await backend.models()
            if backend.config.model and backend.config.model not in models:
                raise BackendError(f"backend {backend.label}: serves {models}, not the configured "
                                   f"{backend.config.model!r}")
        except BackendError as e:
            if breaker.state != OPEN:
                log.warning("%s; no questions go to it until it answers again", e, extra={"backend": backend.label})
                stats = self.stats[backend.label]
                stats.last_error, stats.last_error_at = str(e), time.time()
                breaker.failure(answering=False)
            else:
                breaker.opened_at = time.monotonic()
            return
        if breaker.state == OPEN:
            breaker.probed()
            log.info("backend %s answers again%s", backend.label,
                     "; the next question is its trial" if breaker.state == HALF_OPEN else "",
                     extra={"backend": backend.label})

    async def probe_all(self) -> None:
        due = [b for b in self.backends if self.breakers[b.label].state == CLOSED or self.breakers[b.label].probe_due()]
        await asyncio.gather(*(self.probe(b) for b in due))
        self._update_up()

    async def _probe_forever(self) -> None:
        while True:
            try:
                await self.probe_all()
            except Exception:  # the prober must outlive any one surprise
                log.exception("probing the backends failed; trying again")
            await asyncio.sleep(self.probe_interval_s)

    def start(self) -> None:
        self._prober = asyncio.get_running_loop().create_task(self._probe_forever())

    async def stop(self) -> None:
        if self._prober:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)

    def states(self) -> list[dict]:
        """Each backend as /healthz and the admin pages show it."""
        out = []
        for b in self.backends:
            s = self.stats[b.label]
            out.append({"name": b.label, "url": b.base, "state": self.breakers[b.label].state,
                        "priority": b.config.priority, "weight": b.config.weight, "in_flight": self.in_flight[b.label],
                        "max_concurrent": b.config.max_concurrent, "requests": s.requests, "errors": s.errors,
                        "failovers": s.failovers, "last_latency_s": round(s.last_latency_s, 3),
                        "last_first_token_s": round(s.last_first_token_s, 3), "last_error": s.last_error,
                        "last_error_at": s.last_error_at or None})
        return out
