"""``GET /metrics``: the server's Prometheus metrics (``prometheus-client``), named as vLLM names
its own where one exists, with the ``gpt2engine_`` prefix.

Counters and histograms are updated on the event loop as requests end; the gauges read the
scheduler when scraped. Each app has its own registry, so several apps in one process (tests,
Ray replicas sharing a worker) never collide.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..core.request import Request
from ..core.scheduler import Scheduler

# Seconds; from a GPU's ~1 ms steps to a loaded CPU's seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """The metrics of one server over ``scheduler``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler: Scheduler):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gpt2engine_requests", "Requests ended, by finish reason", ["finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("gpt2engine_prompt_tokens", "Prompt tokens of ended requests", registry=r)
        self.generation_tokens = Counter("gpt2engine_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("gpt2engine_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("gpt2engine_inter_token_latency_seconds",
                             "Mean time between a request's tokens, one sample per request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("gpt2engine_e2e_request_latency_seconds", "From arrival to the end",
                             buckets=LATENCY_BUCKETS, registry=r)
        Gauge("gpt2engine_requests_running", "Requests holding a slot", registry=r).set_function(
            lambda: len(scheduler.active))
        Gauge("gpt2engine_requests_waiting", "Requests in the queue", registry=r).set_function(
            lambda: len(scheduler.waiting))
        Gauge("gpt2engine_slots", "Slots (the largest batch)", registry=r).set_function(lambda: scheduler.max_batch)
        Gauge("gpt2engine_kv_cache_bytes", "Bytes of the KV cache", registry=r).set_function(
            lambda: scheduler.runner.cache.nbytes if scheduler.runner.cache is not None else 0)

    def ended(self, request: Request) -> None:
        """Count a request that has ended (its text included)."""
        self.requests.labels(request.finish_reason).inc()
        self.prompt_tokens.inc(len(request.prompt))
        self.generation_tokens.inc(len(request.tokens))
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.arrived)
            if len(request.tokens) > 1 and request.ended_at is not None:
                self.itl.observe((request.ended_at - request.first_token_at) / (len(request.tokens) - 1))
        if request.ended_at is not None:
            self.e2e.observe(request.ended_at - request.arrived)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
