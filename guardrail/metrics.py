"""Prometheus collectors for the proxy. Each app owns its registry, so several apps (tests,
replicas in one process) never collide.

With several worker processes (``guardrail serve --workers N``) ``PROMETHEUS_MULTIPROC_DIR`` is
set before the workers start: every value then lives in a file of that folder, and a scrape of
any worker (``scrape_registry``) reads the files of all of them, so counters and histograms are
sums over the workers. A gauge says how its workers' values combine (``multiprocess_mode``);
one left at the default would be exported once per process, with a ``pid`` label.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The folder shared by the workers' metric files, or None with a single process."""
    return os.environ.get(MULTIPROC_ENV) or None


def scrape_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """What ``/metrics`` exports: the app's registry, or with several workers a fresh registry
    reading every worker's files (the app's own would count this worker twice)."""
    folder = multiprocess_dir()
    if folder is None:
        return registry
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=folder)  # type: ignore[no-untyped-call]
    return merged

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Up to guard.max_queue_wait_s (60 s by default): a wait that long is worth seeing in buckets.
_QUEUE_WAIT_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "guardrail_requests", "Chat completion requests", ["stream", "status"], registry=r
        )
        self.checks = Counter(
            "guardrail_checks", "Steps sent to the guard", ["guard", "channel"], registry=r
        )
        self.verdicts = Counter(
            "guardrail_verdicts", "Guard verdicts by outcome and category",
            ["verdict", "category"], registry=r,
        )
        self.actions = Counter("guardrail_actions", "What each response ended as", ["action"],
                               registry=r)
        self.guard_latency = Histogram(
            "guardrail_guard_latency_seconds", "Latency of one guard check", ["guard"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        # A histogram is multiprocess-safe as it is: each worker writes its own file, summed.
        self.guard_queue_wait = Histogram(
            "guardrail_guard_queue_wait_seconds",
            "Time a check waited in the guard's queue behind other checks (not its timeout)",
            ["guard"], buckets=_QUEUE_WAIT_BUCKETS, registry=r,
        )
        self.upstream_first_token = Histogram(
            "guardrail_upstream_first_token_seconds", "Upstream time to first token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.errors = Counter("guardrail_errors", "Errors by where they happened", ["kind"],
                              registry=r)
        self.guard_errors = Counter(
            "guardrail_guard_errors", "Guard failures, and what on_error decided",
            ["guard", "kind", "decision"], registry=r,
        )
        self.interventions = Counter(
            "guardrail_interventions", "Corrections that continued the response",
            ["strategy", "form"], registry=r,
        )
        self.correction_rounds = Histogram(
            "guardrail_correction_rounds", "Correction rounds per corrected response",
            buckets=(1, 2, 3, 4, 5, 8), registry=r,
        )
        self.recoveries = Counter(
            "guardrail_correction_outcomes",
            "How each continuation ended: recovered (judged safe), unsafe_again, failed",
            ["outcome"], registry=r,
        )
        self.wait_tokens = Counter(
            "guardrail_wait_tokens",
            "Tokens generated but never shown because of a rollback (estimated)", registry=r,
        )
        self.intervention_latency = Histogram(
            "guardrail_intervention_latency_seconds",
            "From a flag to the first text of the correction", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.backpressure_rejections = Counter(
            "guardrail_backpressure_rejections",
            "Chat requests refused (503) before any text because the guard was too far behind",
            registry=r,
        )
        self.case_store_failures = Counter(
            "guardrail_case_store_failures", "Cases written to the fallback file instead",
            registry=r,
        )
        self.streams_in_flight = Gauge(
            "guardrail_streams_in_flight", "Chat completions being answered now",
            multiprocess_mode="livesum", registry=r,
        )
        self.draining = Gauge(
            "guardrail_draining", "1 while a worker drains for a shutdown (SIGTERM)",
            multiprocess_mode="livemax", registry=r,
        )
