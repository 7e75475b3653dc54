"""One guard check of one step, made the same way by every caller: the proxy's monitor,
``guardrail check`` and evaluation.

The rules live here once: the refusal rule first (``guard.refusal_rule``), then the guard under
one timeout (``guard.timeout_s`` of the guard's own work: time the check waits in the guard's
queue behind other checks is load, not failure, and moves the deadline, up to
``guard.max_queue_wait_s``; see ``guards/plumbing/queue_wait``); a guard that fails or times
out gets the verdict
``guard.on_error`` decides, with the error named; metrics when there are any; and the step
record filled from the verdict (the guard's raw output included, for the audit log).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from guardrail.cases.model import StepRecord
from guardrail.config import GuardConfig
from guardrail.errors import GuardError
from guardrail.guards.base import Guard, GuardView, Verdict
from guardrail.guards.plumbing import queue_wait
from guardrail.guards.plumbing.queue_wait import QueueWait, QueueWaitExceeded
from guardrail.metrics import Metrics
from guardrail.refusals import split_refusal

logger = logging.getLogger(__name__)

REFUSAL_RAW = "refusal rule: the step declines or redirects; nothing else in it to judge"

_T = TypeVar("_T")


class StepChecker:
    def __init__(self, guard: Guard, config: GuardConfig, metrics: Metrics | None = None
                 ) -> None:
        self.guard = guard
        self.config = config
        self.metrics = metrics

    async def check(self, view: GuardView) -> Verdict:
        """The verdict on one step, with its latency; never raises for a guard's failure."""
        started = time.perf_counter()
        judged, settled = self._apply_refusal_rule(view)
        if settled is not None:
            return self._finish(view, settled, started)
        try:
            verdict = await self._within_deadline(lambda: self.guard.check(judged))
        except Exception as error:
            verdict = self._on_error(error)
        return self._finish(view, verdict, started)

    async def check_many(self, views: Sequence[GuardView]) -> list[Verdict]:
        """Verdicts in order: one ``check_many`` call to the guard under one timeout; if the
        guard fails otherwise, each view on its own, so one bad view costs the others nothing."""
        started = time.perf_counter()
        verdicts: list[Verdict | None] = []
        to_judge: list[GuardView] = []
        positions: list[int] = []
        for view in views:
            judged, settled = self._apply_refusal_rule(view)
            verdicts.append(settled)
            if settled is None:
                positions.append(len(verdicts) - 1)
                to_judge.append(judged)
        if to_judge:
            try:
                judged_verdicts = await self._within_deadline(
                    lambda: self.guard.check_many(to_judge))
                if len(judged_verdicts) != len(to_judge):
                    raise GuardError(f"guard {self.guard.name} answered {len(judged_verdicts)} "
                                     f"verdicts for {len(to_judge)} views")
            except TimeoutError as error:
                judged_verdicts = [self._on_error(error) for _ in to_judge]
            except Exception:
                judged_verdicts = list(await asyncio.gather(*(self._check_alone(view)
                                                              for view in to_judge)))
            for position, verdict in zip(positions, judged_verdicts, strict=True):
                verdicts[position] = verdict
        # One latency for the batch: each view waited for all of it.
        return [self._finish(view, verdict, started)
                for view, verdict in zip(views, verdicts, strict=True) if verdict is not None]

    async def _check_alone(self, view: GuardView) -> Verdict:
        try:
            return await self._within_deadline(lambda: self.guard.check(view))
        except Exception as error:
            return self._on_error(error)

    async def _within_deadline(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()`` under the check's timeout: ``guard.timeout_s`` of the guard's own work,
        plus the time the check waited in the guard's queue, at most ``max_queue_wait_s``."""
        wait: QueueWait | None = None
        try:
            async with queue_wait.deadline(self.config.timeout_s, self.config.max_queue_wait_s,
                                           guard=self.guard.name) as wait:
                return await call()
        finally:
            if wait is not None and wait.queued_ever and self.metrics is not None:
                self.metrics.guard_queue_wait.labels(self.guard.name).observe(wait.waited_s())

    def _apply_refusal_rule(self, view: GuardView) -> tuple[GuardView, Verdict | None]:
        """The view for the guard, or the verdict already settled by the refusal rule."""
        if not self.config.refusal_rule:
            return view, None
        refuses, rest = split_refusal(view.step)
        if not refuses:
            return view, None
        if not rest:
            return view, Verdict(unsafe=False, raw=REFUSAL_RAW, extra={"rule": "refusal"})
        return dataclasses.replace(view, step=rest), None

    def _on_error(self, error: BaseException) -> Verdict:
        if isinstance(error, QueueWaitExceeded):
            kind, message = "timeout", str(error)
        elif isinstance(error, TimeoutError):
            kind, message = "timeout", f"guard timed out after {self.config.timeout_s:g}s"
        elif isinstance(error, GuardError):
            kind, message = "error", str(error)
        else:
            # A bug in a backend: logged whole, judged by on_error like any failure.
            logger.error("guard %s failed", self.guard.name, exc_info=error)
            kind, message = "error", f"{type(error).__name__}: {error}"
        decision = self.config.on_error
        if self.metrics is not None:
            self.metrics.guard_errors.labels(self.guard.name, kind, decision).inc()
        logger.warning("guard %s %s (%s): %s", self.guard.name, kind, decision, message)
        return Verdict(unsafe=decision == "block", categories=("guard_error",), error=message,
                       extra={"error_kind": kind})

    def _finish(self, view: GuardView, verdict: Verdict, started: float) -> Verdict:
        latency = time.perf_counter() - started
        verdict = dataclasses.replace(verdict, latency_s=latency)
        metrics = self.metrics
        if metrics is not None:
            name = self.guard.name
            metrics.checks.labels(name, view.channel).inc()
            metrics.guard_latency.labels(name).observe(latency)
            if verdict.error is not None:
                metrics.verdicts.labels("error", "guard_error").inc()
            elif verdict.unsafe:
                for category in verdict.categories or ("unspecified",):
                    metrics.verdicts.labels("unsafe", category).inc()
            else:
                metrics.verdicts.labels("safe", "").inc()
        return verdict


def record_verdict(record: StepRecord, verdict: Verdict) -> None:
    """The step record keeps the verdict whole: the guard's raw output is the audit log."""
    record.unsafe = verdict.unsafe
    record.categories = list(verdict.categories)
    record.score = verdict.score
    record.raw = verdict.raw
    record.error = verdict.error
    record.latency_ms = verdict.latency_s * 1000
