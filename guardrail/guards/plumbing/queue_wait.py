"""A check's time in a guard's queue, kept apart from the guard's own work on it.

Under load a check waits behind other streams' checks (a micro-batcher's queue) before the guard
starts on it. That wait is load, not the guard failing, so the check's timeout
(``guard.timeout_s``) does not count it, up to ``guard.max_queue_wait_s``: the caller that sets
the deadline (``StepChecker``) opens a ``QueueWait`` around the guard call, and the queue the
check passes through marks it ``queued`` when it joins and ``started`` when its batch is taken.
The queue finds the wait through a context variable (``current``), so that no guard's interface
changes and a guard without a queue simply never marks one (its checks keep the plain timeout).

One ``QueueWait`` may cover several items (``check_many``): it is waiting while any of them is
still queued. Event-loop code only, like the queues that mark it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class QueueWait:
    def __init__(self, on_change: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.on_change = on_change
        """Called when the check joins or leaves a queue (its deadline moves)."""
        self._waiting = 0  # items queued now
        self._since = 0.0  # when the queue last went from no item to some
        self._waited = 0.0  # seconds queued before ``_since``
        self.queued_ever = False
        """Whether any item went through a queue (the metric counts only those checks)."""

    @property
    def waiting(self) -> bool:
        return self._waiting > 0

    def waited_s(self) -> float:
        """Seconds during which some item of the check was queued, so far."""
        running = self._clock() - self._since if self._waiting else 0.0
        return self._waited + running

    def queued(self) -> None:
        """An item of the check joined a queue."""
        self.queued_ever = True
        if self._waiting == 0:
            self._since = self._clock()
        self._waiting += 1
        self._changed()

    def started(self) -> None:
        """An item left its queue: the guard took it (or it was dropped)."""
        if self._waiting == 0:
            return
        self._waiting -= 1
        if self._waiting == 0:
            self._waited += self._clock() - self._since
        self._changed()

    def extension_s(self, max_wait_s: float) -> float:
        """How far the check's deadline moves for its queue wait: the wait so far, at most
        ``max_wait_s``; all of ``max_wait_s`` while an item is still queued (its own work has
        not begun, so its timeout has not started to run down)."""
        return max_wait_s if self._waiting else min(self.waited_s(), max_wait_s)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


_current: ContextVar[QueueWait | None] = ContextVar("guardrail_queue_wait", default=None)


def current() -> QueueWait | None:
    """The wait of the check being made in this context, for a queue to mark; None outside one."""
    return _current.get()


@contextmanager
def measuring(wait: QueueWait) -> Iterator[QueueWait]:
    """Within this block (and tasks started from it), queues mark ``wait``."""
    token = _current.set(wait)
    try:
        yield wait
    finally:
        _current.reset(token)
