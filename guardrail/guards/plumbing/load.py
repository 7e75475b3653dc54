"""How far behind a guard is: the checks it holds and the rate at which it gets through them.

A guard keeps one ``LoadMeter`` and wraps each check in ``meter.track()``. The meter counts the
checks in the guard (queued or being judged: the backlog) and measures the guard's rate, in
checks completed per second while it had work (idle time does not dilute it). ``GuardBacklog``
is what it reports; ``expected_wait_s`` is what a new check would wait for the ones ahead of it.

The rate is the guard's last measured one: a guard that goes idle keeps it, so that a burst that
arrives after a quiet spell is judged against what the guard could do, not against nothing.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

RATE_WINDOW_S = 2.0
"""Completions within this much busy time make the rate: recent, but over several batches."""


@dataclass(frozen=True, slots=True)
class GuardBacklog:
    checks: int
    """Checks in the guard now: queued, or being judged."""
    rate: float | None
    """Checks completed per busy second, last measured; None before the first completion."""
    oldest_s: float
    """How long the oldest check in the guard has been there (0.0 with none)."""

    def expected_wait_s(self, extra_checks: float = 0.0) -> float:
        """What a new check would wait: the checks ahead of it (and ``extra_checks`` more that
        are known to be coming) at the measured rate, and never less than the oldest check has
        waited already (a guard that stopped answering has no rate to go by)."""
        ahead = self.checks + extra_checks
        by_rate = ahead / self.rate if self.rate else 0.0
        return max(by_rate, self.oldest_s)


class LoadMeter:
    """Counts the checks in a guard and measures its rate. Event-loop code only (not
    thread-safe), which is where guards' ``check`` runs."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens = itertools.count()
        self._entered: list[tuple[float, int]] = []  # a heap of (entry time, token)
        self._left: set[int] = set()  # tokens gone but still in the heap (removed lazily)
        self._inside = 0
        self._busy_total = 0.0  # busy seconds before ``_busy_since``
        self._busy_since: float | None = None
        self._completed = 0
        # (busy seconds so far, completions so far) at each completion within the window.
        self._marks: collections.deque[tuple[float, int]] = collections.deque()
        self._rate: float | None = None

    @contextmanager
    def track(self, checks: int = 1) -> Iterator[None]:
        """Around ``checks`` checks judged together: in the backlog while inside; completions
        if it returns (checks that raise or are cancelled leave the backlog without counting
        towards the rate)."""
        token = self._enter(checks)
        completed = False
        try:
            yield
            completed = True
        finally:
            self._leave(token, checks, completed)

    def backlog(self) -> GuardBacklog:
        now = self._clock()
        while self._entered and self._entered[0][1] in self._left:
            self._left.discard(heapq.heappop(self._entered)[1])
        oldest = now - self._entered[0][0] if self._entered else 0.0
        return GuardBacklog(checks=self._inside, rate=self._rate, oldest_s=max(0.0, oldest))

    def _busy(self, now: float) -> float:
        running = now - self._busy_since if self._busy_since is not None else 0.0
        return self._busy_total + running

    def _enter(self, checks: int) -> int:
        now = self._clock()
        token = next(self._tokens)
        heapq.heappush(self._entered, (now, token))
        if self._inside == 0:
            self._busy_since = now
        self._inside += checks
        return token

    def _leave(self, token: int, checks: int, completed: bool) -> None:
        now = self._clock()
        self._left.add(token)
        self._inside -= checks
        if completed:
            self._completed += checks
            busy = self._busy(now)
            self._marks.append((busy, self._completed))
            # Keep one mark at or before the window's start, as the base of the difference.
            while len(self._marks) > 2 and self._marks[1][0] <= busy - RATE_WINDOW_S:
                self._marks.popleft()
            base_busy, base_count = self._marks[0]
            if busy > base_busy and self._completed > base_count:
                self._rate = (self._completed - base_count) / (busy - base_busy)
        if self._inside == 0:
            self._busy_total = self._busy(now)
            self._busy_since = None
            self._entered.clear()
            self._left.clear()
