"""Exports a guard's own counters (``stats() -> dict[str, int]``) as Prometheus counters.

Some guards count things only they know, such as how often a cascade escalates to its second
stage. They expose ``stats()`` (``guardrail.guards.capabilities.HasStats``); this collector
reads it at every scrape, so the guard needs no Prometheus code and the counters appear in the
app's registry as
``guardrail_guard_stats_total{guard="cascade", stat="escalated"}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from guardrail.guards.capabilities import HasStats


class GuardStatsCollector(Collector):
    """``registry.register(GuardStatsCollector(guard))`` for a guard with ``stats()``."""

    def __init__(self, guard: HasStats) -> None:
        self._name = guard.name
        self._stats: Callable[[], dict[str, int]] = guard.stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "guardrail_guard_stats", "Counters a guard keeps itself (e.g. cascade escalations)",
            labels=["guard", "stat"],
        )
        for stat, value in sorted(self._stats().items()):
            family.add_metric([self._name, stat], float(value))
        yield family


class GuardStatsMirror:
    """The same counters with several worker processes, where a scrape reads the workers'
    metric files and a custom collector is never asked: the guard's counters are copied into a
    real ``Counter`` (their increase since the last copy) by ``sync``, which the server calls as
    each response ends and at each scrape of this worker."""

    def __init__(self, guard: HasStats, registry: CollectorRegistry) -> None:
        self._name = guard.name
        self._stats: Callable[[], dict[str, int]] = guard.stats
        self._copied: dict[str, int] = {}
        self._counter = Counter(
            "guardrail_guard_stats", "Counters a guard keeps itself (e.g. cascade escalations)",
            ["guard", "stat"], registry=registry,
        )

    def sync(self) -> None:
        for stat, value in self._stats().items():
            increase = value - self._copied.get(stat, 0)
            if increase > 0:
                self._counter.labels(self._name, stat).inc(increase)
                self._copied[stat] = value
