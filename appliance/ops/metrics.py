"""Prometheus metrics, on their own listener ([metrics] host, port; localhost by default) at /metrics.

Latencies are observed as answers stream (histograms: rates and percentiles come from PromQL, not from gauges
computed here). Everything else is read from the objects that already count it (engine, WeChat service, outbox)
at scrape time, so nothing is counted twice. GPU metrics come from NVML where a GPU is present and are absent,
not zero, where it is not.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

log = logging.getLogger(__name__)

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 60, 120)
_TOKEN = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.response_time = Histogram("llm_response_time_seconds", "Request to last token", buckets=_LATENCY,
                                       registry=self.registry)
        self.ttft = Histogram("llm_time_to_first_token_seconds", "Request to first token", buckets=_LATENCY,
                              registry=self.registry)
        self.itl = Histogram("llm_inter_token_latency_seconds", "Between consecutive tokens of one answer",
                             buckets=_TOKEN, registry=self.registry)
        self.requests = Counter("llm_requests", "Answered requests by how they ended", ["status"],
                                registry=self.registry)
        self.errors = Counter("llm_errors", "Requests that failed, by kind", ["kind"], registry=self.registry)
        self.backend_latency = Histogram("r1box_backend_response_seconds", "Question to whole answer, by backend",
                                         ["backend"], buckets=_LATENCY, registry=self.registry)
        self.backend_ttft = Histogram("r1box_backend_first_token_seconds", "Question to first token, by backend",
                                      ["backend"], buckets=_LATENCY, registry=self.registry)
        # gray release (appliance/release/): every answer made while a release runs, by the variant that made it
        self.release_answers = Counter("r1box_release_answers", "Answers made during a release, by variant, role "
                                       "(served: sent; shadow: only compared) and outcome",
                                       ["variant", "role", "outcome"], registry=self.registry)
        self.release_latency = Histogram("r1box_release_answer_seconds", "Question to whole answer during a "
                                         "release, by variant and role", ["variant", "role"], buckets=_LATENCY,
                                         registry=self.registry)
        self.release_dropped = Counter("r1box_release_shadow_dropped", "Shadow questions dropped because the box "
                                       "was busy", registry=self.registry)
        # known label values start at 0, so rate() works from the first failure on and alerts have a series
        for kind in ("busy", "bad_request", "internal"):
            self.errors.labels(kind)
        for status in ("stop", "length", "cancelled", "busy", "bad_request", "error"):
            self.requests.labels(status)

    def watch(self, *sources) -> None:
        """Objects with a collect() that yields metric families at scrape time."""
        for source in sources:
            self.registry.register(source)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class StreamTimer:
    """Times one streamed answer: first token, each gap, the whole."""

    def __init__(self, metrics: Metrics):
        self.metrics, self.start, self.last = metrics, time.monotonic(), None

    def token(self) -> None:
        now = time.monotonic()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now

    def done(self, status: str) -> None:
        self.metrics.response_time.observe(time.monotonic() - self.start)
        self.metrics.requests.labels(status).inc()


class EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        yield _counter("llm_prompt_tokens", "Prompt tokens of finished requests", s["prompt_tokens"])
        yield _counter("llm_generation_tokens", "Tokens generated", s["generated_tokens"])
        yield _gauge("llm_requests_running", "Sequences in the running batch", s["running"])
        yield _gauge("llm_requests_waiting", "Requests queued for a slot", s["waiting"])
        yield _gauge("llm_batch_size", "Sequences decoded in the last step", s["batch_size"])
        yield _gauge("llm_kv_cache_usage_ratio", "Share of the KV cache budget holding tokens", s["kv_cache_usage"])
        prefix = s["prefix_cache"]
        yield _counter("llm_prefix_cache_queries", "Prefix cache lookups", prefix["hits"] + prefix["misses"])
        yield _counter("llm_prefix_cache_hits", "Prefix cache lookups that reused KV", prefix["hits"])
        yield _counter("llm_provider_fallbacks", "Moves to the CPU after a provider failed", s["fallbacks"])
        info = InfoMetricFamily("llm_execution_provider", "The execution provider serving now")
        info.add_metric([], {"provider": s["provider"]})
        yield info


class WeChatCollector:
    def __init__(self, service, dialog):
        self.service, self.dialog = service, dialog

    def collect(self):
        c = self.service.counters
        received = CounterMetricFamily("wechat_messages_received", "Callbacks with a message", labels=["type"])
        for kind, n in sorted(self.service.kinds.items()):
            received.add_metric([kind], n)
        yield received
        yield _counter("wechat_duplicates_dropped", "Deliveries of a message already recorded", c["duplicates"])
        replies = CounterMetricFamily("wechat_replies", "Answers delivered, by path", labels=["mode"])
        for mode in ("passive", "pushed", "pulled"):
            replies.add_metric([mode], c[mode])
        yield replies
        yield _counter("wechat_answer_cache_answers", "Questions answered from the answer cache while no backend "
                       "could", self.dialog.cache_answers)
        yield _gauge("wechat_questions_waiting_for_backend", "Questions held until a backend answers again",
                     self.dialog.waiting)
        hits = CounterMetricFamily("wechat_filter_hits", "Sensitive-word hits", labels=["direction"])
        for direction, n in self.dialog.filter_hits.items():
            hits.add_metric([direction], n)
        yield hits
        outbox = self.service.outbox
        if outbox is None:
            return
        yield _gauge("wechat_outbox_pending", "Pushes waiting to go out", outbox.pending_count)
        yield _gauge("wechat_outbox_oldest_age_seconds", "Age of the oldest waiting push", outbox.oldest_age_s)
        results = CounterMetricFamily("wechat_send_results", "Push attempts by errcode (0: sent)", labels=["code"])
        for code, n in sorted(outbox.results.items()):
            results.add_metric([str(code)], n)
        yield results
        refreshes = sum(t.refreshes for t in outbox.tokens.values())
        yield _counter("wechat_token_refreshes", "Access tokens fetched", refreshes)


class BackendCollector:
    """Each model backend of `r1box serve`: requests, errors, failovers, and its breaker's state."""

    def __init__(self, backends):
        self.backends = backends

    def collect(self):
        requests = CounterMetricFamily("r1box_backend_requests", "Questions asked, by backend", labels=["backend"])
        errors = CounterMetricFamily("r1box_backend_errors", "Answers a backend failed to give", labels=["backend"])
        failovers = CounterMetricFamily("r1box_backend_failovers", "Failed answers another backend then gave",
                                        labels=["backend"])
        up = GaugeMetricFamily("r1box_backend_up", "1 when questions may go to the backend (up or on trial)",
                               labels=["backend"])
        state = GaugeMetricFamily("r1box_backend_state", "The backend's breaker: 1 on the current state",
                                  labels=["backend", "state"])
        in_flight = GaugeMetricFamily("r1box_backend_in_flight", "Questions being answered", labels=["backend"])
        for s in self.backends.states():
            name = s["name"]
            requests.add_metric([name], s["requests"])
            errors.add_metric([name], s["errors"])
            failovers.add_metric([name], s["failovers"])
            up.add_metric([name], 0 if s["state"] == "down" else 1)
            for each in ("up", "trial", "down"):
                state.add_metric([name, each], 1 if s["state"] == each else 0)
            in_flight.add_metric([name], s["in_flight"])
        yield from (requests, errors, failovers, up, state, in_flight)


class HaCollector:
    """One box of a hot-standby pair (appliance/ha/), as its node last wrote itself and as serve's acknowledgements
    found the peer's copy; registered only where [ha] is enabled."""

    def __init__(self, read_role, barrier):
        self.read_role, self.barrier = read_role, barrier

    def collect(self):
        role = self.read_role()
        roles = GaugeMetricFamily("r1box_ha_role", "This box's role in the pair: 1 on the current one",
                                  labels=["role"])
        for each in ("active", "standby", "fault", "off"):
            roles.add_metric([each], 1 if role.get("role") == each else 0)
        yield roles
        yield _gauge("r1box_ha_epoch", "Takeovers the store has seen (its age)", role.get("epoch") or 0)
        last = role.get("last_takeover") or {}
        yield _gauge("r1box_ha_last_takeover_timestamp_seconds", "When this box last took over (0: never)",
                     last.get("at", 0))
        yield _gauge("r1box_ha_peer_copy_ok", "1 when the peer confirmed the store's copy at the last ask",
                     0 if self.barrier.alone else 1)
        replicated = role.get("replicated_at")
        yield _gauge("r1box_ha_replication_lag_seconds", "Since the peer last confirmed it had all of the store",
                     time.time() - replicated if replicated else 0)
        yield _counter("r1box_ha_unreplicated_acknowledgements", "Acknowledgements made while the peer's copy was "
                       "out of reach", self.barrier.misses)


class GpuCollector:
    """NVML's view of each GPU; registered only where NVML starts."""

    def __init__(self, nvml):
        self.nvml = nvml

    @classmethod
    def create(cls) -> "GpuCollector | None":
        try:
            import pynvml

            pynvml.nvmlInit()
            return cls(pynvml) if pynvml.nvmlDeviceGetCount() else None
        except Exception:  # no library, no driver, or no GPU: the metrics stay absent
            return None

    def collect(self):
        util = GaugeMetricFamily("gpu_utilization_ratio", "GPU busy share", labels=["gpu"])
        used = GaugeMetricFamily("gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
        temp = GaugeMetricFamily("gpu_temperature_celsius", "GPU temperature", labels=["gpu"])
        for i in range(self.nvml.nvmlDeviceGetCount()):
            handle = self.nvml.nvmlDeviceGetHandleByIndex(i)
            memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            util.add_metric([str(i)], self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
            used.add_metric([str(i)], memory.used)
            total.add_metric([str(i)], memory.total)
            temp.add_metric([str(i)], self.nvml.nvmlDeviceGetTemperature(handle, self.nvml.NVML_TEMPERATURE_GPU))
        yield from (util, used, total, temp)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)
