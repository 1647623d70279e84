"""The release as `r1box serve` runs it: which variant answers whom, the shadow questions, the evaluation runs, and
the rule applied on a schedule.

The store says what the release is (appliance/release/records.py); this follows it every few seconds, so a
change made by `r1box release` or the admin pages takes effect here, and a restarted service resumes the release.

- Shares are stable hashes of the release and the user: a user is in or out for the whole release (so a
  conversation never switches model mid-way), and each release draws its own users.
- Shadow: after the live answer is made (never before), the same question goes to the candidate, if the box is
  idle: a candidate on this box (an artifact) waits for the serving model to have nothing in flight, and a live
  question that arrives meanwhile cancels it. A shadow question that finds no idle moment within idle_wait_s is
  dropped and counted, never queued for ever. Its answer is stored sealed and compared, never sent.
- A/B: a user in the share gets the candidate's answer; if the candidate fails, the user gets the live answer
  instead (the failure counts against the candidate), so nobody is left unanswered by a release.
- Promotion puts the candidate first among the backends: new questions go to it, questions in flight finish where
  they are, the previous model stays behind it as its fallback. Rollback and stop take the candidate away.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from urllib.parse import urlsplit

import aiohttp

from appliance.backends.client import Backend, Completion
from appliance.backends.pool import Backends
from appliance.config import BackendConfig
from appliance.release.settings import ReleaseConfig
from appliance.errors import BackendError
from appliance.ops.metrics import Metrics
from appliance.release import evaluate, records, rule
from appliance.release.candidate import CandidateProcess
from appliance.release.records import Release
from appliance.store.database import Store

log = logging.getLogger(__name__)

LIVE, CANDIDATE = "live", "candidate"
FOLLOW_EVERY_S = 2.0


def in_share(release_id: int, account: str, user: str, share: float) -> bool:
    digest = hashlib.sha256(f"{release_id}:{account}:{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < share


def candidate_backend(release: Release, config: ReleaseConfig) -> BackendConfig:
    """How the service reaches a release's candidate: an artifact's own process with the box's model key, or the
    remote backend it was started with (its key from the environment variable named at start)."""
    key_env = "R1BOX_MODEL_KEY" if release.artifact else release.key_env
    return BackendConfig(url=release.url, name=release.candidate, key_env=key_env,
                         key=os.environ.get(key_env, "").split(",")[0].strip() if key_env else "",
                         max_concurrent=config.candidate_max_concurrent)


class ReleaseManager:
    def __init__(self, store: Store, backends: Backends, config: ReleaseConfig, session: aiohttp.ClientSession,
                 metrics: Metrics, filter_hits, config_file: str | None = None):
        self.store, self.backends, self.config, self.session = store, backends, config, session
        self.metrics, self.filter_hits, self.config_file = metrics, filter_hits, config_file
        self.release: Release | None = None  # the active one (shadow or A/B)
        self.candidate: Backend | None = None
        self.ready = False  # the candidate has answered its first probe: loading is not failing
        self.processes: dict[int, CandidateProcess] = {}  # by release id: the active one's, the promoted one's
        self.in_flight = 0  # the candidate's questions now
        self.dropped = 0
        self._shadows: set[asyncio.Task] = set()
        self._eval_items: set[asyncio.Task] = set()  # an evaluation question in flight, asked again if cancelled
        self._evaluations: dict[tuple[int, str], asyncio.Task] = {}
        self._task: asyncio.Task | None = None
        self._evaluated_at = 0.0

    # ---- following the store ----

    async def start(self) -> None:
        promoted = await self.store.run(records.promoted)
        if promoted:
            self._serve_promoted(promoted)
        await self.follow()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._shadows, *self._evaluations.values()) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for process in self.processes.values():
            await process.stop()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FOLLOW_EVERY_S)
            try:
                await self.follow()
                if self.release and time.monotonic() - self._evaluated_at >= self.config.evaluate_every_s:
                    await self.evaluate()
            except Exception:  # the release must never take the service down
                log.exception("following the release failed; trying again")

    async def follow(self) -> None:
        """Take on what the store says: a new release, a phase change, an end."""
        latest = await self.store.run(records.latest)
        current = self.release
        if current and (latest is None or latest.id != current.id or not latest.active):
            ended = latest if latest and latest.id == current.id else None
            await self._detach(current, promoted=bool(ended and ended.phase == "promoted"))
            if ended and ended.phase == "promoted":
                self._serve_promoted(ended)
        if latest and latest.active:
            if self.release is None or self.release.id != latest.id:
                self._attach(latest)
            self.release = latest
        if self.candidate and not self.ready:
            try:
                await self.candidate.models()
                self.ready = True
                log.info("release %d: the candidate %s answers", latest.id, self.candidate.label)
            except BackendError:
                pass  # still starting; nothing is asked of it meanwhile

    def _attach(self, release: Release) -> None:
        log.info("release %d: candidate %s at %s, %s", release.id, release.candidate, release.url, release.phase)
        if release.artifact and release.id not in self.processes:
            self._run_artifact(release, self.config.candidate_nice)
        self.candidate, self.ready = Backend(candidate_backend(release, self.config), self.session), False
        self._evaluated_at = time.monotonic()

    async def _detach(self, release: Release, promoted: bool) -> None:
        for task in list(self._shadows):
            task.cancel()
        for (release_id, _), task in list(self._evaluations.items()):
            if release_id == release.id:
                task.cancel()
        if not promoted and (process := self.processes.pop(release.id, None)):
            await process.stop()
        self.release, self.candidate, self.ready = None, None, False

    def _serve_promoted(self, release: Release) -> None:
        """The promoted candidate is the serving model: first among the backends (its process kept running)."""
        if release.artifact and release.id not in self.processes:
            self._run_artifact(release, nice=0)
        self.backends.add_first(candidate_backend(release, self.config))

    def _run_artifact(self, release: Release, nice: int) -> None:
        """The artifact's own `r1box model`, on the port its release was given at start."""
        process = CandidateProcess(release.artifact, urlsplit(release.url).port, nice, self.config_file)
        process.start()
        self.processes[release.id] = process

    # ---- answering ----

    def variant_for(self, account: str, user: str) -> str:
        r = self.release
        return CANDIDATE if r and r.phase == "ab" and in_share(r.id, account, user, r.ab_share) else LIVE

    def shadows(self, account: str, user: str) -> bool:
        r = self.release
        return bool(r and r.phase == "shadow" and in_share(r.id, account, user, r.shadow_share))

    async def complete(self, account: str, user: str, messages: list[dict], max_tokens: int) -> tuple[Completion, str]:
        """The answer a user gets, and the variant that made it; NoBackend as from the backends."""
        for task in list(self._eval_items):  # a live question goes first: background work on this box yields
            task.cancel()
        if self.release and self.release.artifact:
            for task in list(self._shadows):
                task.cancel()
        if self.variant_for(account, user) == CANDIDATE and self.ready \
                and self.in_flight < self.config.candidate_max_concurrent:
            release, started = self.release, time.monotonic()
            try:
                return await self._ask_candidate(messages, max_tokens), CANDIDATE
            except BackendError as e:
                log.warning("%s; this A/B user gets the serving model's answer", e)
                await self._sample(release, "", CANDIDATE, True, None, time.monotonic() - started,
                                   "timeout" if e.timed_out else "error")
        return await self.backends.complete(messages, max_tokens), LIVE

    async def _ask_candidate(self, messages: list[dict], max_tokens: int) -> Completion:
        self.in_flight += 1
        try:
            return await self.candidate.complete(messages, max_tokens)
        finally:
            self.in_flight -= 1

    async def served(self, ref: str, account: str, user: str, variant: str, completion: Completion | None,
                     outcome: str, messages: list[dict], max_tokens: int) -> None:
        """Record the answer sent; shadow the question if this conversation is in the shadow share."""
        release = self.release
        if release is None:
            return
        await self._sample(release, ref, variant, True, completion, completion.total_s if completion else None,
                           outcome)
        if completion and self.shadows(account, user) and self.candidate:
            task = asyncio.get_running_loop().create_task(self._shadow(release, ref, messages, max_tokens))
            self._shadows.add(task)
            task.add_done_callback(self._shadows.discard)

    async def _shadow(self, release: Release, ref: str, messages: list[dict], max_tokens: int) -> None:
        started = time.monotonic()
        try:
            if await self._wait_idle(release, self.config.idle_wait_s):
                started = time.monotonic()
                completion = await self._ask_candidate(messages, max_tokens)
            else:
                completion = None
        except BackendError as e:
            await self._sample(release, ref, CANDIDATE, False, None, time.monotonic() - started,
                               "timeout" if e.timed_out else "error")
            return
        except asyncio.CancelledError:  # a live question came, or the release ended
            completion = None
        if completion is None:
            self.dropped += 1
            self.metrics.release_dropped.inc()
            return
        answer = completion.content.strip()
        outcome = "empty" if not answer else "blocked" if self.filter_hits(answer) else "ok"
        await self._sample(release, ref, CANDIDATE, False, completion, completion.total_s, outcome, answer)

    async def _wait_idle(self, release: Release, limit_s: float | None, on_this_box: bool = False) -> bool:
        """Until the candidate has room and, when the work runs on this box (an artifact candidate, or the serving
        model itself), the serving model has nothing in flight."""
        deadline = None if limit_s is None else time.monotonic() + limit_s
        on_this_box = on_this_box or bool(release.artifact)
        while not self.ready or self.in_flight >= self.config.candidate_max_concurrent \
                or (on_this_box and (self.backends.busy or self.in_flight)):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    async def _sample(self, release: Release, ref: str, variant: str, served: bool, completion: Completion | None,
                      latency_s: float | None, outcome: str, answer: str | None = None) -> None:
        role = "served" if served else "shadow"
        self.metrics.release_answers.labels(variant, role, outcome).inc()
        if outcome == "ok" and latency_s is not None:
            self.metrics.release_latency.labels(variant, role).observe(latency_s)
        await self.store.run(records.record_sample, self.store.vault, release.id, ref, variant, served,
                             completion.backend if completion else "", latency_s,
                             completion.first_token_s if completion else None, outcome, answer)

    # ---- the rule ----

    async def evaluate(self) -> rule.Decision | None:
        """Score what is stored, decide, and act (or only propose, when [release] auto is off)."""
        release = self.release
        if release is None:
            return None
        self._evaluated_at = time.monotonic()
        if release.phase == "shadow":
            self._start_evaluations(release)
        live, candidate, shadow, shadow_live = await self.store.run(_figures, release)
        decision = rule.decide(release.phase, live, candidate, shadow, shadow_live, self.config)
        figures = {**decision.as_dict(), "at": time.time(), "dropped": self.dropped}
        to = {rule.ADVANCE: "ab", rule.PROMOTE: "promoted", rule.ROLLBACK: "rolled_back"}.get(decision.action)
        if to and release.auto:
            await self.store.run(records.change_phase, release.id, to, "system", figures)
            log.info("release %d: %s (%s)", release.id, to, decision.reason)
            await self.follow()
        else:
            figures["proposed"] = to or ""
            await self.store.run(records.save_figures, release.id, figures)
            self.release = await self.store.run(records.active)
        return decision

    def _start_evaluations(self, release: Release) -> None:
        """The evaluation set, once per release and variant, in the background at idle moments of the shadow phase
        (in A/B it would slow the answers whose latency the rule compares)."""
        for variant in (LIVE, CANDIDATE):
            key = (release.id, variant)
            if key not in self._evaluations:
                self._evaluations[key] = asyncio.get_running_loop().create_task(self._evaluate_set(release, variant))

    async def _evaluate_set(self, release: Release, variant: str) -> None:
        if await self.store.run(records.eval_done, release.id, variant):
            return
        items = evaluate.load_items(self.config.eval_sets, self.config.eval_items, not self.config.eval_profile)
        while (target := self.candidate if variant == CANDIDATE else self.backends.serving()) is None:
            await asyncio.sleep(FOLLOW_EVERY_S)
        log.info("release %d: scoring %s (%s) on %d evaluation items", release.id, variant, target.label, len(items))
        system, results = evaluate.system_prompt(self.config.eval_profile), []
        for item in items:  # one at a time, at idle moments; a live question cancels it, and it is asked again
            while True:
                await self._wait_idle(release, None, on_this_box=variant == LIVE)
                task = asyncio.get_running_loop().create_task(
                    evaluate.score(target, item, system, self.config.eval_max_tokens))
                if variant == LIVE or release.artifact:  # on this box: it yields to live questions
                    self._eval_items.add(task)
                try:
                    results.append(await task)
                    break
                except asyncio.CancelledError:
                    if asyncio.current_task().cancelling():
                        task.cancel()
                        raise
                finally:
                    self._eval_items.discard(task)
        await self.store.run(records.record_eval, release.id, variant, target.label, results)
        log.info("release %d: %s passed %d of %d evaluation items", release.id, variant,
                 sum(r["passed"] for r in results), len(results))


def _figures(db, release: Release):
    """Served answers since A/B began (in shadow the candidate serves none), the shadow answers, and the live
    answers they shadowed."""
    since = release.phase_at if release.phase == "ab" else 0.0
    return (records.figures(db, release.id, LIVE, True, since), records.figures(db, release.id, CANDIDATE, True, since),
            records.figures(db, release.id, CANDIDATE, False), records.shadowed_live(db, release.id))
