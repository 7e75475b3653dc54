"""Prometheus collectors for the proxy. Each app owns its registry, so several apps (tests,
replicas in one process) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
        self.case_store_failures = Counter(
            "guardrail_case_store_failures", "Cases written to the fallback file instead",
            registry=r,
        )
