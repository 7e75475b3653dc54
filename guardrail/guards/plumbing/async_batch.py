"""Coalescing for remote calls: concurrent single requests sent as one batched request.

``MicroBatcher`` runs one batch at a time in a worker thread, which suits a model on the
proxy's CPU. A server (vLLM behind ``guard.url``) takes many requests at once, so here up to
``max_concurrent`` batches are in flight together, each an ``await`` on the event loop. The
batching is adaptive in the same way: a request that finds a free slot goes at once (with
whatever was submitted in the same event-loop tick); while every slot is busy, newcomers queue
and the next free slot takes up to ``max_batch`` of them, so batches grow with the load and a
lone request pays no waiting.

A batch does not belong to any caller: a caller that gives up (its check timed out, its client
left) leaves the batch to finish for the others, and gets nothing from it.

As in ``MicroBatcher``, an item is marked queued on its check's ``QueueWait`` from ``submit``
until a worker takes it, so the check's timeout counts the request and not the wait for a slot.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from guardrail.guards.plumbing import queue_wait
from guardrail.guards.plumbing.queue_wait import QueueWait

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _LoopState(Generic[T, R]):
    pending: collections.deque[tuple[T, asyncio.Future[R], QueueWait | None]] = field(
        default_factory=collections.deque)
    workers: set[asyncio.Task[None]] = field(default_factory=set)


class AsyncBatcher(Generic[T, R]):
    """``await submit(item)`` returns ``run([..., item, ...])``'s result for that item.

    ``run`` must return one result per item, in order; if it raises, every item of that batch
    gets the exception.
    """

    def __init__(self, run: Callable[[list[T]], Awaitable[Sequence[R]]], *, max_batch: int,
                 max_concurrent: int) -> None:
        if max_batch < 1 or max_concurrent < 1:
            raise ValueError("need max_batch >= 1 and max_concurrent >= 1")
        self._run = run
        self.max_batch = max_batch
        self.max_concurrent = max_concurrent
        self._states: dict[asyncio.AbstractEventLoop, _LoopState[T, R]] = {}
        self.batches = 0
        """Requests sent so far (each may have carried many items)."""

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        state = self._states.setdefault(loop, _LoopState())
        future: asyncio.Future[R] = loop.create_future()
        wait = queue_wait.current()
        if wait is not None:
            wait.queued()
        state.pending.append((item, future, wait))
        if len(state.workers) < self.max_concurrent:
            worker = loop.create_task(self._work(loop, state))
            state.workers.add(worker)
        return await future

    async def _work(self, loop: asyncio.AbstractEventLoop, state: _LoopState[T, R]) -> None:
        try:
            # The worker inherited the context of the check that started it, but sends batches
            # for every check: nothing it awaits is that one check's queue wait.
            with queue_wait.outside():
                while state.pending:
                    live: list[tuple[T, asyncio.Future[R]]] = []
                    while state.pending and len(live) < self.max_batch:
                        item, future, wait = state.pending.popleft()
                        if wait is not None:
                            wait.started()  # from here on the request is its own work
                        if not future.done():  # its caller may have given up already
                            live.append((item, future))
                    if live:
                        await self._run_batch(live)
        finally:
            current = asyncio.current_task()
            if current is not None:
                state.workers.discard(current)
            if not state.workers:
                for _, future, wait in state.pending:  # only when the loop tears them down
                    if wait is not None:
                        wait.started()
                    future.cancel()
                state.pending.clear()
                self._states.pop(loop, None)

    async def _run_batch(self, live: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.batches += 1
        try:
            results = await self._run([item for item, _ in live])
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
            if not future.done():
                future.set_result(result)
