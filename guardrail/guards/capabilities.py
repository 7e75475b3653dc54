"""Optional guard capabilities, declared as Protocols.

A guard has a capability when it has the method (structural typing, checked at run time with
``isinstance``); callers use the helpers here, so no caller probes a guard with ``getattr``.

- ``WarmsUp``: loads its model ahead of the first check (``warm_up``, blocking: run in a thread).
- ``JudgesRequests``: judges a user's request by itself (the embedded guard's request head), used
  by the compliance-cue check instead of a prompt check.
- ``HasStats``: counters only the guard knows (a cascade's escalations), exported as metrics.
- ``Wraps``: a guard around another (``inner``), walked by ``find_stats``.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

from guardrail.guards.base import Guard, Verdict


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
class Wraps(Protocol):
    inner: Guard


async def warm_up(guard: Guard) -> None:
    """Warm ``guard`` up, off the event loop, if it can be; otherwise nothing."""
    if isinstance(guard, WarmsUp):
        await asyncio.to_thread(guard.warm_up)


def find_stats(guard: object) -> HasStats | None:
    """The guard itself, or the guard it wraps (``inner``), if it keeps counters."""
    current: object = guard
    for _ in range(8):  # wrappers are shallow; the bound only guards against a cycle
        if current is None:
            return None
        if isinstance(current, HasStats):
            return current
        current = current.inner if isinstance(current, Wraps) else None
    return None
