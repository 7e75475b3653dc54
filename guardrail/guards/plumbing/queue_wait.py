"""A check's time in a guard's queue, kept apart from the guard's own work on it.

Under load a check waits behind other streams' checks (a micro-batcher's queue) before the guard
starts on it. That wait is load, not the guard failing, so the check's timeout
(``guard.timeout_s``) does not count it, up to ``guard.max_queue_wait_s``: the caller that sets
the deadline (``StepChecker``) opens a ``QueueWait`` around the guard call, and the queue the
check passes through marks it ``queued`` when it joins and ``started`` when its batch is taken.
The queue finds the wait through a context variable (``current``), so that no guard's interface
changes and a guard without a queue simply never marks one (its checks keep the plain timeout).

One ``QueueWait`` may cover several items (``check_many``): it is waiting while any of them is
still queued. Deadlines nest (``deadline``): a guard that bounds its own work too (the generative
guard, a cascade's stage) opens one inside the step checker's, and a mark on the inner wait is
a mark on the outer one as well, so both deadlines move. A task shared by several checks (a
batch sent for many) runs ``outside()`` any check's wait. Event-loop code only, like the queues
that mark it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar


class QueueWaitExceeded(TimeoutError):
    """The check waited in the guard's queue for longer than ``guard.max_queue_wait_s``."""


class QueueWait:
    def __init__(self, on_change: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 parent: QueueWait | None = None) -> None:
        self._clock = clock
        self._parent = parent
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
        if self._parent is not None:
            self._parent.queued()

    def started(self) -> None:
        """An item left its queue: the guard took it (or it was dropped)."""
        if self._waiting == 0:
            return
        self._waiting -= 1
        if self._waiting == 0:
            self._waited += self._clock() - self._since
        self._changed()
        if self._parent is not None:  # only for an item it counted, so the two stay in step
            self._parent.started()

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


@contextmanager
def outside() -> Iterator[None]:
    """Within this block, no check's wait is marked: for a task that inherited the context of
    the check that started it but works for many (a batch worker)."""
    token = _current.set(None)
    try:
        yield
    finally:
        _current.reset(token)


@asynccontextmanager
async def deadline(timeout_s: float, max_wait_s: float, *, guard: str
                   ) -> AsyncIterator[QueueWait]:
    """The block under one check's timeout: ``timeout_s`` of the guard's own work, plus the time
    the check waited in the guard's queue, at most ``max_wait_s`` (0: the plain timeout). Raises
    ``TimeoutError``, or ``QueueWaitExceeded`` when the check was still queued. Yields the wait,
    for its metric. Inside another ``deadline``, the queue's marks reach both."""
    loop = asyncio.get_running_loop()
    begun = loop.time()
    wait = QueueWait(clock=loop.time, parent=current())
    try:
        async with asyncio.timeout_at(begun + timeout_s) as scope:
            def move() -> None:
                # Marked from the queue's own task: the deadline moves at once (unless it has
                # already passed and the check is being cancelled).
                if not scope.expired():
                    scope.reschedule(begun + timeout_s + wait.extension_s(max_wait_s))

            wait.on_change = move
            with measuring(wait):
                yield wait
    except TimeoutError as error:
        if wait.waiting and max_wait_s > 0 and not isinstance(error, QueueWaitExceeded):
            raise QueueWaitExceeded(
                f"guard {guard}: the check waited {wait.waited_s():.1f}s in the guard's queue "
                f"(guard.max_queue_wait_s {max_wait_s:g}s)") from error
        raise
    finally:
        wait.on_change = None  # the scope is gone; a late mark must not move it
