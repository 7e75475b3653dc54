"""Optional guard capabilities: declared as Protocols, found with isinstance, used through the
helpers that the server and ``guardrail check`` call."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from guardrail.config import GuardConfig
from guardrail.guards import build_guard
from guardrail.guards.base import SAFE, GuardView, Verdict
from guardrail.guards.capabilities import HasStats, JudgesRequests, WarmsUp, find_stats, warm_up
from guardrail.guards.generative import create_generative
from guardrail.guards.passthrough import PassThroughGuard
from guardrail.guards.plumbing.cues import ComplianceCueGuard


class Counting:
    """A guard that loads something at warm-up and keeps a counter."""

    name = "counting"

    def __init__(self) -> None:
        self.warmed_in: str | None = None
        self.checks = 0

    def warm_up(self) -> None:
        self.warmed_in = threading.current_thread().name

    def stats(self) -> dict[str, int]:
        return {"checks": self.checks}

    async def check(self, view: GuardView) -> Verdict:
        self.checks += 1
        return SAFE

    async def check_many(self, views: Sequence[GuardView]) -> list[Verdict]:
        return [await self.check(view) for view in views]

    async def aclose(self) -> None:
        return None


async def test_warm_up_runs_off_the_event_loop_and_through_wrappers() -> None:
    inner = Counting()
    wrapped = ComplianceCueGuard(inner)
    await warm_up(wrapped)
    assert inner.warmed_in is not None and inner.warmed_in != threading.current_thread().name


async def test_a_guard_without_warm_up_is_left_alone() -> None:
    guard = PassThroughGuard()
    assert not isinstance(guard, WarmsUp)
    await warm_up(guard)  # nothing to do, and no error


def test_find_stats_walks_wrappers_to_the_guard_that_counts() -> None:
    inner = Counting()
    assert find_stats(ComplianceCueGuard(inner)) is inner
    assert isinstance(inner, HasStats)
    assert find_stats(ComplianceCueGuard(PassThroughGuard())) is None


def test_the_built_guards_declare_what_they_can() -> None:
    endpoint = create_generative(GuardConfig(kind="qwen3guard", url="http://127.0.0.1:9/v1"))
    assert isinstance(endpoint, WarmsUp) and not isinstance(endpoint, JudgesRequests)
    assert not isinstance(endpoint, HasStats)
    cascade = build_guard(GuardConfig(kind="cascade", compliance_cues=False, options={
        "second": {"kind": "llama-guard", "url": "http://127.0.0.1:9/v1"}}))
    assert isinstance(cascade, HasStats) and isinstance(cascade, WarmsUp)
