"""Micro-batching: concurrent single requests merged into one call on a worker thread.

A CPU encoder costs about as much for a batch of eight short steps as for two, so when several
streams (or several steps of one stream) ask at once, one forward pass answers them all.
Batching is adaptive: when no batch is running, a request goes at once (with whatever was
submitted in the same event-loop tick, e.g. by ``submit_many``), so a lone stream pays no
waiting; while a batch runs, newcomers queue and the next batch takes them all as soon as it
ends, so the batch size grows with the load by itself. A backend may still ask the first
request of a burst to wait up to ``max_wait_s`` for company (default 0: it does not); queued
requests never wait for more. One batch runs at a time per event loop, in a worker thread, so
the loop never blocks on inference.

The time an item spends queued is marked on the check's ``QueueWait`` (``queue_wait``), from
``submit`` until its batch is taken, so the check's timeout counts the guard's work on it and
not the other checks it waited behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from guardrail.guards.plumbing import queue_wait
from guardrail.guards.plumbing.queue_wait import QueueWait

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _LoopState(Generic[T, R]):
    pending: list[tuple[T, asyncio.Future[R], QueueWait | None]] = field(default_factory=list)
    worker: asyncio.Task[None] | None = None
    wakeup: asyncio.Future[None] | None = None


class MicroBatcher(Generic[T, R]):
    """``await submit(item)`` returns ``run([..., item, ...])``'s result for that item.

    ``run`` is called in a worker thread with at most ``max_batch`` items and must return one
    result per item, in order. If it raises, every item of that batch gets the exception.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.0,
    ) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("need max_batch >= 1 and max_wait_s >= 0")
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        # One state per running event loop (tests and servers may use several over time); a
        # state lives only while it has work, so nothing keeps a finished loop alive.
        self._states: dict[asyncio.AbstractEventLoop, _LoopState[T, R]] = {}
        self.batches = 0
        """How many batches ran: a way to see that batching happens."""

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        state = self._states.setdefault(loop, _LoopState())
        future: asyncio.Future[R] = loop.create_future()
        wait = queue_wait.current()
        if wait is not None:
            wait.queued()
        state.pending.append((item, future, wait))
        if len(state.pending) >= self.max_batch and state.wakeup and not state.wakeup.done():
            state.wakeup.set_result(None)
        if state.worker is None:
            state.worker = loop.create_task(self._work(loop, state))
        return await future

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        return list(await asyncio.gather(*(self.submit(item) for item in items)))

    async def _work(self, loop: asyncio.AbstractEventLoop, state: _LoopState[T, R]) -> None:
        try:
            idle = True  # only a burst that found the batcher idle may wait for company
            while state.pending:
                if idle and len(state.pending) < self.max_batch and self.max_wait_s > 0:
                    state.wakeup = loop.create_future()
                    await asyncio.wait({state.wakeup}, timeout=self.max_wait_s)
                    state.wakeup = None
                idle = False
                batch = state.pending[: self.max_batch]
                del state.pending[: self.max_batch]
                for _, _, wait in batch:
                    if wait is not None:
                        wait.started()  # from here on the guard is working on it
                live = [(item, future) for item, future, _ in batch if not future.done()]
                if live:
                    await self._run_batch(live)
        finally:
            state.worker = None
            for _, future, wait in state.pending:  # only when the loop tears this task down
                if wait is not None:
                    wait.started()
                future.cancel()
            state.pending.clear()
            self._states.pop(loop, None)

    async def _run_batch(self, live: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.batches += 1
        try:
            results = await asyncio.to_thread(self._run, [item for item, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"batch of {len(live)} gave {len(results)} results")
        except asyncio.CancelledError:
            for _, future in live:
                future.cancel()
            raise
        except Exception as error:
            for _, future in live:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(live, results, strict=True):
            if not future.done():  # its caller may have given up (client gone, timeout)
                future.set_result(result)
