"""An endpoint guard's check waiting for one of its pooled connections (or for a batched request)
is queued behind other checks, not being judged: its timeout counts its own request, not that
wait (up to ``guard.max_queue_wait_s``), through both deadlines (the step checker's and the
generative guard's own). A request the server never answers still times out after
``guard.timeout_s``. Against the fake Llama Guard served on loopback, answering in ``DELAY_S``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from guardrail.config import GuardConfig
from guardrail.guards import build_guard
from guardrail.guards.base import GuardView, Verdict
from guardrail.metrics import Metrics
from guardrail.step_checker import StepChecker
from tests.fakes.llama_guard_server import FakeLlamaGuard
from tests.fakes.loopback import serve_app

pytestmark = pytest.mark.timeout(60)

DELAY_S = 0.1
TIMEOUT_S = 0.35  # longer than one request, shorter than the wait of the last checks
HANG = "this request is never answered"


def view(text: str) -> GuardView:
    return GuardView(request="How do I look after a sourdough starter?", context=(),
                     step=f"{text}: feed the starter and let it rise.")


@asynccontextmanager
async def checker_for(fake: FakeLlamaGuard, *, max_queue_wait_s: float = 30.0,
                      **options: Any) -> AsyncIterator[tuple[StepChecker, Metrics]]:
    with serve_app(fake.app(), lifespan="off") as base_url:
        config = GuardConfig(kind="llama-guard", url=base_url + "/v1", timeout_s=TIMEOUT_S,
                             max_queue_wait_s=max_queue_wait_s, compliance_cues=False,
                             refusal_rule=False, options=options)
        guard = build_guard(config)
        metrics = Metrics()
        try:
            yield StepChecker(guard, config, metrics), metrics
        finally:
            await guard.aclose()


async def burst(checker: StepChecker, count: int) -> list[Verdict]:
    return list(await asyncio.gather(*(checker.check(view(f"step {n}"))
                                       for n in range(count))))


def queue_waits(metrics: Metrics) -> tuple[float | None, float | None]:
    registry, label = metrics.registry, {"guard": "llama-guard"}
    return (registry.get_sample_value("guardrail_guard_queue_wait_seconds_count", label),
            registry.get_sample_value("guardrail_guard_queue_wait_seconds_sum", label))


async def test_checks_waiting_for_a_connection_are_not_timed_out_by_the_wait() -> None:
    # 12 checks over 2 connections, 0.1 s a request: six rounds, so the last checks wait about
    # 0.5 s for a connection, longer than the 0.35 s timeout, for their own 0.1 s.
    fake = FakeLlamaGuard(delay_s=DELAY_S)
    async with checker_for(fake, max_connections=2) as (checker, metrics):
        verdicts = await burst(checker, 12)
    assert [verdict.error for verdict in verdicts if verdict.error] == []
    assert max(verdict.latency_s for verdict in verdicts) > TIMEOUT_S
    assert fake.max_in_flight <= 2
    count, total = queue_waits(metrics)
    assert count is not None and count >= 8  # all but the first round waited
    assert total is not None and total > 1.5  # about 2 x (1 + 2 + 3 + 4 + 5) x 0.1 s


async def test_with_max_queue_wait_0_the_wait_counts_as_before() -> None:
    fake = FakeLlamaGuard(delay_s=DELAY_S)
    async with checker_for(fake, max_queue_wait_s=0.0, max_connections=2) as (checker, _):
        verdicts = await burst(checker, 12)
    timed_out = [verdict.error for verdict in verdicts if verdict.error]
    assert len(timed_out) >= 4, timed_out  # the rounds after the third
    assert all(f"{TIMEOUT_S:g}s" in error for error in timed_out), timed_out


async def test_checks_waiting_for_a_batched_request_are_not_timed_out_by_the_wait() -> None:
    # One connection, two checks a request: 12 checks in six requests, one after another.
    fake = FakeLlamaGuard(delay_s=DELAY_S)
    async with checker_for(fake, max_connections=1, completions_batch=2) as (checker, metrics):
        verdicts = await burst(checker, 12)
    assert [verdict.error for verdict in verdicts if verdict.error] == []
    assert max(verdict.latency_s for verdict in verdicts) > TIMEOUT_S
    assert fake.max_in_flight == 1 and all(len(body["prompt"]) <= 2 for body in fake.requests)
    count, total = queue_waits(metrics)
    assert count == 12 and total is not None and total > 1.5


async def test_a_request_never_answered_times_out_after_its_own_timeout() -> None:
    # One connection: three checks ahead of the stuck one (its queue wait, not counted), then
    # TIMEOUT_S of its own request, and it is cut; the checks behind it get the connection back.
    fake = FakeLlamaGuard(delay_s=DELAY_S, hang_on=HANG)
    async with checker_for(fake, max_queue_wait_s=5.0, max_connections=1) as (checker, _):
        ahead = [asyncio.create_task(checker.check(view(f"ahead {n}"))) for n in range(3)]
        started = time.monotonic()
        hung = asyncio.create_task(checker.check(view(HANG)))
        behind = [asyncio.create_task(checker.check(view(f"behind {n}"))) for n in range(3)]
        hung_verdict = await hung
        waited = time.monotonic() - started
        others = await asyncio.gather(*ahead, *behind)
    assert hung_verdict.error is not None and f"{TIMEOUT_S:g}s" in hung_verdict.error
    assert hung_verdict.unsafe  # on_error: block
    assert 3 * DELAY_S + TIMEOUT_S <= waited < 3 * DELAY_S + TIMEOUT_S + 0.4, waited
    assert [verdict.error for verdict in others if verdict.error] == []
