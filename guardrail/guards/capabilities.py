"""Optional guard capabilities, declared as Protocols.

A guard has a capability when it has the method (structural typing, checked at run time with
``isinstance``); callers use the helpers here, so no caller probes a guard with ``getattr``.

- ``WarmsUp``: loads its model ahead of the first check (``warm_up``, blocking: run in a thread).
- ``JudgesRequests``: judges a user's request by itself (the embedded guard's request head), used
  by the compliance-cue check instead of a prompt check.
- ``HasStats``: counters only the guard knows (a cascade's escalations), exported as metrics.
- ``ReportsBacklog``: how far behind the guard is (``backlog()``: checks in it, its measured
  rate), which the proxy's admission control reads before it takes a new request.
- ``Wraps``: a guard around another (``inner``), walked by ``find_stats`` and ``find_backlog``.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

from guardrail.guards.base import Guard, Verdict
from guardrail.guards.plumbing.load import GuardBacklog


@runtime_checkable
class WarmsUp(Protocol):
    def warm_up(self) -> None:
        """Load what the checks need now (blocking), so that a model that cannot load is
        reported at start-up and the first check does not wait for it."""


@runtime_checkable
class JudgesRequests(Protocol):
    async def judge_request(self, text: str) -> Verdict:
        """Whether the request itself is harmful."""


@runtime_checkable
class HasStats(Protocol):
    name: str

    def stats(self) -> dict[str, int]:
        """Counters since start, by name."""


@runtime_checkable
class ReportsBacklog(Protocol):
    def backlog(self) -> GuardBacklog:
        """The checks in the guard now and the rate it gets through them (cheap: called for
        every new request)."""


@runtime_checkable
class Wraps(Protocol):
    inner: Guard


async def warm_up(guard: Guard) -> None:
    """Warm ``guard`` up, off the event loop, if it can be; otherwise nothing."""
    if isinstance(guard, WarmsUp):
        await asyncio.to_thread(guard.warm_up)


def find_stats(guard: object) -> HasStats | None:
    """The guard itself, or the guard it wraps (``inner``), if it keeps counters."""
    found = _find(guard, HasStats)
    return found if isinstance(found, HasStats) else None


def find_backlog(guard: object) -> ReportsBacklog | None:
    """The guard itself, or the guard it wraps (``inner``), if it reports its backlog."""
    found = _find(guard, ReportsBacklog)
    return found if isinstance(found, ReportsBacklog) else None


def _find(guard: object, capability: type) -> object | None:
    current: object = guard
    for _ in range(8):  # wrappers are shallow; the bound only guards against a cycle
        if current is None:
            return None
        if isinstance(current, capability):
            return current
        current = current.inner if isinstance(current, Wraps) else None
    return None
