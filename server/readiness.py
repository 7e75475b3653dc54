"""Readiness (``/readyz``): whether this process should be sent traffic now.

``/healthz`` says the process is alive; ``/readyz`` says more: the guard has warmed up (its model
loaded: ``WarmsUp``), the case store answers, and the process is not draining for a shutdown.
The warm-up runs in the background after the server starts listening, so a probe sees 503 while
the guard loads rather than a refused connection; a chat request that arrives meanwhile waits
for it (as its first check would have). A warm-up that fails is a start-up error:
``on_failure`` is told (``guardrail serve`` then exits with the one-line config error).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from guardrail.cases import CaseStore
from guardrail.errors import GuardrailError, NotReady, internal_error
from guardrail.guards import Guard
from guardrail.guards.capabilities import warm_up

logger = logging.getLogger(__name__)

STORE_CHECK_TIMEOUT_S = 2.0


class Readiness:
    def __init__(self, guard: Guard, store: CaseStore) -> None:
        self.guard = guard
        self.store = store
        self.failure: GuardrailError | None = None
        self._warming: asyncio.Task[None] | None = None

    def start(self, on_failure: Callable[[GuardrailError], None] | None = None) -> None:
        """Start warming the guard up (once)."""
        if self._warming is not None:
            return

        def finished(task: asyncio.Task[None]) -> None:
            if task.cancelled() or task.exception() is None:
                return
            error = task.exception()
            assert error is not None
            self.failure = internal_error(error)
            if on_failure is not None:
                on_failure(self.failure)

        self._warming = asyncio.create_task(warm_up(self.guard), name="guard warm-up")
        self._warming.add_done_callback(finished)

    @property
    def guard_state(self) -> str:
        if self.failure is not None:
            return "failed"
        if self._warming is None or not self._warming.done():
            return "warming"
        return "ready"

    async def guard_warm(self) -> None:
        """Wait for the warm-up; ``NotReady`` if it failed."""
        if self._warming is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._warming)
        if self.failure is not None:
            raise NotReady(f"the guard failed to load: {self.failure}")

    async def store_state(self) -> str:
        """``ok``, or why the store cannot be used now (a cheap read with a timeout)."""
        try:
            await asyncio.wait_for(self.store.list(limit=1), timeout=STORE_CHECK_TIMEOUT_S)
        except TimeoutError:
            return f"unreachable: no answer in {STORE_CHECK_TIMEOUT_S:g} s"
        except Exception as error:
            return f"unreachable: {type(error).__name__}: {' '.join(str(error).split())[:200]}"
        return "ok"

    async def report(self, draining: bool) -> tuple[bool, dict[str, Any]]:
        guard = self.guard_state
        store = await self.store_state()
        ready = guard == "ready" and store == "ok" and not draining
        body: dict[str, Any] = {"status": "ready" if ready else "not ready", "guard": guard,
                                "store": store, "draining": draining}
        if self.failure is not None:
            body["guard_error"] = str(self.failure)
        return ready, body

    async def aclose(self) -> None:
        if self._warming is not None and not self._warming.done():
            # The thread loading the model cannot be interrupted; only stop waiting for it.
            self._warming.cancel()
            with contextlib.suppress(BaseException):
                await self._warming
