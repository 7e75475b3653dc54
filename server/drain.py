"""The responses in flight, and the drain before a shutdown.

On SIGTERM (``server/process.py``) the drain starts: new chat requests get 503 ``shutting_down``
with ``Retry-After`` (a load balancer retries them on another replica), ``/readyz`` says not
ready, and the responses in flight get up to ``server.drain_seconds`` to finish, so their cases
end ``complete``. A response still running at the deadline is ended through
``GuardedStream.abort``: the client gets an error event and ``[DONE]`` (a non-streamed one a 503)
and its case is recorded with the reason, never cut off unrecorded by the process exiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from guardrail.errors import ShuttingDown
from guardrail.metrics import Metrics
from guardrail.monitor import GuardedStream

logger = logging.getLogger(__name__)

ABORT_GRACE_S = 15.0
"""After the deadline, how long aborted responses get to store their cases: a check already
sent to the guard is still awaited (``guard.timeout_s`` bounds it), then the store write."""


@dataclass(frozen=True, slots=True)
class DrainResult:
    finished: int
    """Responses that ended by themselves during the drain."""
    aborted: int
    """Responses still running at the deadline, ended with ``shutting_down``."""
    left: int
    """Responses that had not even stored their case after the abort grace (should be 0)."""


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self.metrics: Metrics | None = None
        """Set once the app's services exist (the gauges of responses in flight and draining)."""
        self._in_flight: set[GuardedStream] = set()
        self._changed: asyncio.Event | None = None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise ShuttingDown("the proxy is shutting down; retry the request (another replica "
                               "or after the restart will take it)")

    def track(self, stream: GuardedStream) -> None:
        self._in_flight.add(stream)
        if self.metrics is not None:
            self.metrics.streams_in_flight.inc()

    def done(self, stream: GuardedStream) -> None:
        if stream not in self._in_flight:
            return
        self._in_flight.discard(stream)
        if self.metrics is not None:
            self.metrics.streams_in_flight.dec()
        if self._changed is not None:
            self._changed.set()

    async def run(self, seconds: float) -> DrainResult:
        """Drain: refuse new requests from now on, wait up to ``seconds`` for the responses in
        flight, abort the rest and wait for their cases."""
        self.draining = True
        if self.metrics is not None:
            self.metrics.draining.set(1)
        started_with = len(self._in_flight)
        logger.info("draining: %d response(s) in flight, up to %.0f s", started_with, seconds)
        await self._wait_empty(time.monotonic() + seconds)
        running = list(self._in_flight)
        for stream in running:
            stream.abort(ShuttingDown(
                f"the proxy is shutting down and this response was still running at the end "
                f"of the drain ({seconds:g} s, server.drain_seconds)"))
        await self._wait_empty(time.monotonic() + ABORT_GRACE_S)
        result = DrainResult(finished=started_with - len(running), aborted=len(running),
                             left=len(self._in_flight))
        logger.info("drained: %d finished, %d ended at the deadline, %d left",
                    result.finished, result.aborted, result.left)
        return result

    async def _wait_empty(self, deadline: float) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        while self._in_flight:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=left)
            except TimeoutError:
                return
