"""A check's timeout counts the guard's own work, not its wait in the guard's queue (up to
``guard.max_queue_wait_s``); a guard that hangs on a check still times out after
``guard.timeout_s``, under load too. The guard here is a registered backend on the real
``MicroBatcher``: one batch at a time in a worker thread, each batch taking ``WORK_S``."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from guardrail.config import GuardConfig
from guardrail.guards import GUARDS, create_guard
from guardrail.guards.base import GuardView, Verdict, check_each
from guardrail.guards.plumbing import queue_wait
from guardrail.guards.plumbing.load import GuardBacklog, LoadMeter
from guardrail.guards.plumbing.microbatch import MicroBatcher
from guardrail.guards.plumbing.queue_wait import QueueWait
from guardrail.metrics import Metrics
from guardrail.step_checker import StepChecker

WORK_S = 0.05
HANG = "never answered"


class SlowBatchGuard:
    """Judges one step per batch in ``WORK_S``; a step containing ``HANG`` is never answered
    (its batch blocks until the test releases it)."""

    name = "slow-batch"
    release = threading.Event()

    def __init__(self, config: GuardConfig | None = None) -> None:
        self._batcher: MicroBatcher[GuardView, float] = MicroBatcher(self._run, max_batch=1)
        self._meter = LoadMeter()

    def _run(self, views: list[GuardView]) -> list[float]:
        if any(HANG in view.step for view in views):
            type(self).release.wait(30)
        time.sleep(WORK_S)
        return [0.0 for _ in views]

    def backlog(self) -> GuardBacklog:
        return self._meter.backlog()

    async def check(self, view: GuardView) -> Verdict:
        with self._meter.track():
            score = await self._batcher.submit(view)
        return Verdict(unsafe=False, score=score)

    async def check_many(self, views: Sequence[GuardView]) -> list[Verdict]:
        return await check_each(self.check, views)

    async def aclose(self) -> None:
        pass


GUARDS.register("slow-batch")(SlowBatchGuard)


@pytest.fixture(autouse=True)
def released() -> Iterator[None]:
    SlowBatchGuard.release.clear()
    yield
    SlowBatchGuard.release.set()  # never leave a batch thread waiting


def view(text: str) -> GuardView:
    return GuardView(request="a question", context=(), step=text)


def checker(timeout_s: float, max_queue_wait_s: float) -> tuple[StepChecker, Metrics]:
    config = GuardConfig(kind="slow-batch", timeout_s=timeout_s,
                         max_queue_wait_s=max_queue_wait_s, refusal_rule=False)
    metrics = Metrics()
    return StepChecker(create_guard(config), config, metrics), metrics


def test_queue_wait_moves_the_deadline_only_while_queued_and_at_most_the_bound() -> None:
    now = [0.0]
    moves: list[float] = []
    wait = QueueWait(clock=lambda: now[0])
    wait.on_change = lambda: moves.append(wait.extension_s(5.0))
    assert wait.extension_s(5.0) == 0.0 and not wait.queued_ever
    wait.queued()
    now[0] = 2.0
    assert wait.extension_s(5.0) == 5.0  # still queued: the whole bound
    wait.started()
    assert wait.waited_s() == 2.0 and wait.extension_s(5.0) == 2.0
    now[0] = 3.0
    wait.queued()  # two items of one check_many
    wait.queued()
    now[0] = 4.0
    wait.started()
    assert wait.waiting  # one item still queued
    now[0] = 12.0
    wait.started()
    assert wait.waited_s() == 11.0 and wait.extension_s(5.0) == 5.0
    assert moves == [5.0, 2.0, 5.0, 5.0, 5.0, 5.0]  # a move at each mark
    wait.started()  # an extra mark changes nothing
    assert wait.waited_s() == 11.0


def test_a_mark_on_a_nested_wait_reaches_the_outer_one() -> None:
    # The generative guard's own deadline inside the step checker's: a queue marks the inner
    # wait (the current one), and both deadlines must move.
    async def run() -> tuple[QueueWait, QueueWait, QueueWait | None]:
        async with queue_wait.deadline(1.0, 5.0, guard="outer") as outer:
            async with queue_wait.deadline(1.0, 5.0, guard="inner") as inner:
                marked = queue_wait.current()
                assert marked is inner
                inner.queued()
                assert outer.waiting and outer.queued_ever
                await asyncio.sleep(1.2)  # queued past the plain timeout: neither fires
                inner.started()
                assert not outer.waiting
                inner.started()  # an extra mark is not passed on
                assert not outer.waiting
            with queue_wait.outside():
                assert queue_wait.current() is None
            return outer, inner, queue_wait.current()

    outer, inner, after = asyncio.run(run())
    assert outer.waited_s() == pytest.approx(inner.waited_s(), abs=0.05)
    assert outer.waited_s() >= 1.2 and after is outer


def test_checks_queued_behind_others_wait_instead_of_timing_out() -> None:
    # 40 checks at once, one at a time through the guard: the last waits about 2 s, four times
    # the timeout, for the guard's own 50 ms on it.
    async def run(max_queue_wait_s: float) -> tuple[list[Verdict], Metrics]:
        check, metrics = checker(timeout_s=0.5, max_queue_wait_s=max_queue_wait_s)
        verdicts = await asyncio.gather(*(check.check(view(f"step {n}")) for n in range(40)))
        return verdicts, metrics

    verdicts, metrics = asyncio.run(run(max_queue_wait_s=30.0))
    assert [v.error for v in verdicts if v.error] == []
    assert max(v.latency_s for v in verdicts) > 1.0  # they did wait, longer than the timeout
    registry = metrics.registry
    label = {"guard": "slow-batch"}
    assert registry.get_sample_value("guardrail_guard_queue_wait_seconds_count", label) == 40
    total = registry.get_sample_value("guardrail_guard_queue_wait_seconds_sum", label)
    assert total is not None and total > 20.0  # about 40 x 40 / 2 x 50 ms
    assert registry.get_sample_value("guardrail_guard_errors_total",
                                      {**label, "kind": "timeout", "decision": "block"}) is None

    # With the queue wait counted (max_queue_wait_s 0, as before), the same load times out.
    verdicts, _ = asyncio.run(run(max_queue_wait_s=0.0))
    timed_out = [v for v in verdicts if v.error]
    assert len(timed_out) >= 20, len(timed_out)
    assert all("timed out after 0.5s" in (v.error or "") for v in timed_out)


def test_a_hung_guard_still_times_out_after_its_timeout_under_load() -> None:
    async def run() -> tuple[Verdict, list[Verdict], float]:
        check, _ = checker(timeout_s=0.5, max_queue_wait_s=1.0)
        others = [asyncio.create_task(check.check(view(f"before {n}"))) for n in range(5)]
        started = time.monotonic()
        hung = asyncio.create_task(check.check(view(f"this one is {HANG}")))
        behind = [asyncio.create_task(check.check(view(f"behind {n}"))) for n in range(20)]
        hung_verdict = await hung
        waited = time.monotonic() - started
        await asyncio.gather(*others)
        behind_verdicts = list(await asyncio.gather(*behind))
        SlowBatchGuard.release.set()  # the stuck thread ends, so the loop can close
        return hung_verdict, behind_verdicts, waited

    hung, behind, waited = asyncio.run(run())
    # It waited for the five ahead of it (its queue wait, not counted), then 0.5 s of the
    # guard's own work, and was cut: the queue wait did not make the timeout longer than that.
    assert hung.error == "guard timed out after 0.5s" and hung.unsafe  # on_error: block
    assert 0.5 + 5 * WORK_S <= waited < 0.5 + 5 * WORK_S + 0.6, waited
    assert hung.latency_s < 1.2
    # The checks behind the stuck batch never reach the guard: they time out too, once their
    # queue wait passes max_queue_wait_s (1 s) on top of the timeout: bounded, and said so.
    assert all(v.error and "in the guard's queue (guard.max_queue_wait_s 1s)" in v.error
               for v in behind), [v.error for v in behind]
    assert all(v.latency_s < 0.5 + 1.0 + 0.6 for v in behind)
