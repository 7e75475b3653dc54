"""Admission control (``server.backpressure``): a new chat request is refused before any text
is sent while the guard is too far behind, so that streams already running keep their checks
within ``guard.timeout_s`` instead of failing mid-stream.

What "too far behind" means: a new check's expected wait (``GuardBacklog.expected_wait_s``: the
checks in the guard at its measured rate, never less than the oldest check has waited), counting
every stream admitted but not yet checking as the checks a stream has in the guard now (see
``per_new_stream``; ``checks_per_new_stream`` fixes it), passes
``max_guard_wait_s`` (a quarter of ``guard.timeout_s`` by default: the rest is headroom for
the checks the streams already admitted will still send). Or the count passes
``max_guard_backlog`` where one is set. Until the guard has finished checks enough to measure
its rate (just after start), requests are admitted one at a time: only while the guard is idle
and no admitted request is still on its way to it. A guard that does not report a backlog
(``none``, ``llm-judge``) is never a reason to refuse.

A refusal is 503 ``server_error`` with code ``guard_overloaded`` and ``Retry-After`` (the time
the checks in the guard need to drain to the bound, at least 1 s and at most half
``guard.timeout_s``): the proxy is overloaded, the client did
nothing wrong (429 stays the client's own rate limit), and 503 with ``Retry-After`` is what
OpenAI's API sends when overloaded, what the OpenAI SDKs retry after the time it names, and what
a load balancer may retry on another replica. A refused request has no case record: nothing
reached the model or the guard, and writing a record per refusal would load the store exactly
when the proxy is overloaded; refusals are counted (``guardrail_backpressure_rejections_total``)
and logged at most once a second.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from guardrail.config import Config
from guardrail.guards.base import Guard
from guardrail.guards.capabilities import ReportsBacklog, find_backlog
from guardrail.guards.plumbing.load import GuardBacklog
from guardrail.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Refusal:
    retry_after_s: int
    message: str


class Admission:
    """An admitted request: counted as load to come until its first check reaches the guard
    (``checking``; then the guard's own backlog counts it), and as a stream sending checks until
    it ends (``end``). Both are idempotent."""

    __slots__ = ("_gate", "_ticket")

    def __init__(self, gate: AdmissionGate | None, ticket: int) -> None:
        self._gate, self._ticket = gate, ticket

    def checking(self) -> None:
        if self._gate is not None:
            self._gate.checking(self._ticket)

    def end(self) -> None:
        if self._gate is not None:
            self._gate.end(self._ticket)
            self._gate = None


UNGATED = Admission(None, -1)


class AdmissionGate:
    def __init__(self, config: Config, guard: Guard, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        settings = config.server.backpressure
        self.source: ReportsBacklog | None = (
            find_backlog(guard) if settings.enabled and guard.name != "none" else None)
        self.max_wait_s = settings.max_guard_wait_s or config.guard.timeout_s / 4
        self.max_backlog = settings.max_guard_backlog
        self.fixed_per_new_stream = settings.checks_per_new_stream
        self.max_per_stream = float(config.guard.max_concurrency)
        # An admission not released by then (a request that never reached its first check and
        # somehow did not end) stops counting: a leak cannot close the gate for good.
        self.expire_s = config.guard.timeout_s
        self.max_retry_after_s = math.ceil(config.guard.timeout_s / 2)
        self.metrics = metrics
        self._clock = clock
        self._tickets = itertools.count()
        self._pending: dict[int, float] = {}  # ticket -> admitted at, oldest first
        self._active: set[int] = set()  # admitted and not ended
        self._logged_at = -math.inf
        self.publish: Callable[[GuardBacklog, float, int], None] | None = None
        """Called with each admission decision's state (the gauges of several workers)."""

    def admit(self) -> Admission | Refusal:
        """Take a new request, or say why not and when to come back."""
        if self.source is None:
            return UNGATED
        now = self._clock()
        backlog, wait = self._state(self.source, now)
        if self.publish is not None:
            self.publish(backlog, wait, len(self._pending))
        over_count = self.max_backlog is not None and backlog.checks >= self.max_backlog
        if backlog.rate is None and (backlog.checks or self._pending):
            # No rate measured yet (a guard that has not finished a check since start): one
            # stream at a time until it has, rather than a first burst admitted blindly.
            wait = max(wait, self.max_wait_s + 1.0)
        if wait <= self.max_wait_s and not over_count:
            ticket = next(self._tickets)
            self._pending[ticket] = now
            self._active.add(ticket)
            return Admission(self, ticket)
        self.metrics.backpressure_rejections.inc()
        # When to come back: when the checks in the guard have drained to the bound. Admitted
        # streams not yet checking are left out: they turn into checks (or nothing) within a
        # moment, and counting them would send clients away for longer than the guard needs.
        # At most half the check timeout: a refusal costs the proxy little, and a rate
        # measured at a lighter load (a guard that batches more when busier) overstates it.
        drain = backlog.expected_wait_s() - self.max_wait_s
        retry_after = max(1, min(math.ceil(drain), self.max_retry_after_s))
        reason = (f"{backlog.checks} checks in the guard" if over_count
                  else f"a new check would wait {wait:.1f} s for the guard")
        if now - self._logged_at >= 1.0:  # under overload, one line a second is plenty
            self._logged_at = now
            logger.warning("backpressure: refusing new requests (%s; bound %.1f s)", reason,
                           self.max_wait_s)
        return Refusal(retry_after, f"the guardrail proxy is overloaded ({reason}); retry "
                                    f"after {retry_after} s")

    def state(self) -> tuple[GuardBacklog, float, int] | None:
        """(the guard's backlog, a new check's expected wait, admissions not yet checking),
        for the metrics; None when nothing is gated."""
        if self.source is None:
            return None
        backlog, wait = self._state(self.source, self._clock())
        return backlog, wait, len(self._pending)

    def _state(self, source: ReportsBacklog, now: float) -> tuple[GuardBacklog, float]:
        self._expire(now)
        backlog = source.backlog()
        coming = len(self._pending) * self.per_new_stream(backlog)
        return backlog, backlog.expected_wait_s(coming)

    def per_new_stream(self, backlog: GuardBacklog) -> float:
        """The checks a stream not yet checking is counted as: as many as the streams sending
        checks have in the guard now, each (a stream paced by its model has about one, one
        whose text arrives at once up to ``guard.max_concurrency``); that many while none is."""
        if self.fixed_per_new_stream is not None:
            return self.fixed_per_new_stream
        checking = len(self._active) - len(self._pending)
        if checking <= 0:
            return self.max_per_stream
        return min(self.max_per_stream, max(1.0, backlog.checks / checking))

    def checking(self, ticket: int) -> None:
        self._pending.pop(ticket, None)

    def end(self, ticket: int) -> None:
        self._pending.pop(ticket, None)
        self._active.discard(ticket)

    def _expire(self, now: float) -> None:
        while self._pending:
            ticket, admitted_at = next(iter(self._pending.items()))
            if now - admitted_at < self.expire_s:
                return
            del self._pending[ticket]


class BackpressureCollector(Collector):
    """The gate's view at scrape time: read when scraped, so it is current even when no request
    has come for a while."""

    def __init__(self, gate: AdmissionGate) -> None:
        self.gate = gate

    def collect(self) -> Iterator[Metric]:
        state = self.gate.state()
        if state is None:
            return
        backlog, wait, pending = state
        yield GaugeMetricFamily("guardrail_guard_backlog",
                                "Checks in the guard now: queued or being judged",
                                value=backlog.checks)
        yield GaugeMetricFamily(
            "guardrail_guard_expected_wait_seconds",
            "What a new check would wait for the guard (admission refuses above the bound)",
            value=wait)
        yield GaugeMetricFamily("guardrail_admissions_pending",
                                "Requests admitted whose first check has not reached the guard",
                                value=pending)
        if backlog.rate is not None:
            yield GaugeMetricFamily("guardrail_guard_rate",
                                    "Checks the guard completes per busy second (last measured)",
                                    value=backlog.rate)


class BackpressureGauges:
    """The same gauges with several worker processes, where a scrape reads the workers' metric
    files and a custom collector is never asked: real gauges, combined over the workers as
    their ``multiprocess_mode`` says (checks and rates add up; the wait is the worst)."""

    def __init__(self, gate: AdmissionGate, registry: CollectorRegistry) -> None:
        self.gate = gate
        self.backlog = Gauge("guardrail_guard_backlog",
                             "Checks in the guard now: queued or being judged",
                             registry=registry, multiprocess_mode="livesum")
        self.wait = Gauge("guardrail_guard_expected_wait_seconds",
                          "What a new check would wait for the guard (the worst worker)",
                          registry=registry, multiprocess_mode="livemax")
        self.pending = Gauge("guardrail_admissions_pending",
                             "Requests admitted whose first check has not reached the guard",
                             registry=registry, multiprocess_mode="livesum")
        self.rate = Gauge("guardrail_guard_rate",
                          "Checks the guard completes per busy second (last measured)",
                          registry=registry, multiprocess_mode="livesum")

    def publish(self, backlog: GuardBacklog, wait: float, pending: int) -> None:
        self.backlog.set(backlog.checks)
        self.wait.set(wait)
        self.pending.set(pending)
        self.rate.set(backlog.rate or 0.0)

    def sync(self) -> None:
        state = self.gate.state()
        if state is not None:
            self.publish(*state)
