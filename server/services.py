"""Everything the routes need, built once at start-up from one validated config."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from guardrail.cases import CaseStore, build_store
from guardrail.cases.recorder import CaseRecorder
from guardrail.config import Config
from guardrail.correctors import Corrector, build_corrector
from guardrail.guards import Guard, build_guard
from guardrail.guards.capabilities import find_stats
from guardrail.guards.plumbing.stats import GuardStatsCollector, GuardStatsMirror
from guardrail.metrics import Metrics, multiprocess_dir
from guardrail.tracing import Tracer, build_tracer
from guardrail.upstreams import Upstream, build_upstream
from server.auth import Authenticator
from server.backpressure import AdmissionGate, BackpressureCollector, BackpressureGauges
from server.drain import Drain
from server.readiness import Readiness

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Services:
    config: Config
    upstream: Upstream
    guard: Guard
    corrector: Corrector
    store: CaseStore
    recorder: CaseRecorder
    metrics: Metrics
    auth: Authenticator
    readiness: Readiness
    drain: Drain
    sync_stats: Callable[[], None]
    """Copies the guard's own counters into the metrics (several workers; else nothing)."""
    gate: AdmissionGate
    tracer: Tracer

    @classmethod
    async def start(cls, config: Config, drain: Drain | None = None,
                    tracer: Tracer | None = None) -> Services:
        """Builds and opens everything; the guard's warm-up is left to ``readiness.start()``,
        so the server can answer probes while the model loads. ``tracer``: by default the one
        ``config.telemetry`` asks for (none unless set)."""
        metrics = Metrics()
        tracer = tracer or build_tracer(config.telemetry)
        corrector = build_corrector(config.correction)
        opened: list[Callable[[], Awaitable[None]]] = []
        try:
            store = build_store(config.store)
            await store.open()
            opened.append(store.aclose)
            upstream = build_upstream(config.upstream)
            opened.append(upstream.aclose)
            guard = build_guard(config.guard)
            opened.append(guard.aclose)
        except BaseException:
            # A failed start must not leave the store's connections or HTTP clients open.
            for close in reversed(opened):
                with contextlib.suppress(Exception):
                    await close()
            tracer.shutdown()
            raise

        def on_store_failure(error: Exception) -> None:
            metrics.case_store_failures.inc()
            metrics.errors.labels("case_store").inc()

        stats = find_stats(guard)
        sync_stats: Callable[[], None] = _nothing
        if stats is not None:  # a cascade: how often it escalates, as guardrail_guard_stats_total
            if multiprocess_dir() is None:
                metrics.registry.register(GuardStatsCollector(stats))
            else:
                sync_stats = GuardStatsMirror(stats, metrics.registry).sync
        recorder = CaseRecorder(store, config.store.fallback_path, on_failure=on_store_failure,
                                redact=config.store.redact)
        gate = AdmissionGate(config, guard, metrics)
        if gate.source is not None:  # the guard's backlog, as gauges
            if multiprocess_dir() is None:
                metrics.registry.register(BackpressureCollector(gate))
            else:
                # Several workers: real gauges, set as each request is admitted or refused and
                # at each scrape of this worker (a custom collector is never asked).
                gauges = BackpressureGauges(gate, metrics.registry)
                gate.publish = gauges.publish
                sync_stats = _both(sync_stats, gauges.sync)
        drain = drain or Drain()
        drain.metrics = metrics
        return cls(config, upstream, guard, corrector, store, recorder, metrics,
                   Authenticator(config.server), Readiness(guard, store), drain, sync_stats,
                   gate, tracer)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.readiness.aclose()
        for close in (self.upstream.aclose, self.guard.aclose, self.corrector.aclose,
                      self.store.aclose):
            with contextlib.suppress(Exception):
                await close()
        # Sends the spans still batched: blocking HTTP, so off the event loop.
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.tracer.shutdown)


def _nothing() -> None:
    pass


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        first()
        second()

    return both
