"""One request's case, from its first write to its last.

``begin`` starts the in-progress write of a streamed response (its id goes out in the headers
before the case is finished); ``fail`` is the one place where an exception raised while the
response is produced becomes one of ours and the case says so; ``finish`` stops the guarded
stream, counts the outcome and stores the case, shielded so that a client that leaves cannot cut
it short, then logs the request's line (``server/logs.py``). While it lives, the response counts
as in flight for the drain (``server/drain.py``). How the response ended comes from the stream
itself (``GuardedStream.ended``), never from a guess.
"""

from __future__ import annotations

import asyncio
import time

import anyio

from guardrail.cases.model import Case
from guardrail.errors import GuardrailError, UpstreamError, describe, internal_error
from guardrail.monitor import GuardedStream
from server.logs import log_response
from server.services import Services


class CaseLifecycle:
    def __init__(self, services: Services, case: Case, stream: GuardedStream,
                 request_id: str) -> None:
        self.services = services
        self.case = case
        self.stream = stream
        self.request_id = request_id
        self.status_code = 200
        """What the client was answered with (an error found before the first byte)."""
        self.events = stream.events()
        self._begun: asyncio.Task[None] | None = None
        self._failure: GuardrailError | None = None
        services.drain.track(stream)

    def begin(self) -> None:
        """Store the case as in progress, overlapping the wait for the model."""
        self._begun = asyncio.create_task(self.services.recorder.begin(self.case))

    async def begun(self) -> None:
        """The in-progress record has landed (or gone to the fallback file)."""
        if self._begun is not None:
            await asyncio.shield(self._begun)

    def fail(self, error: BaseException) -> GuardrailError:
        """The error the client is told of; the case records it in full."""
        failure = internal_error(error)
        self._failure = failure
        self.case.action = "error"
        self.case.error = describe(failure)
        return failure

    async def finish(self) -> None:
        services, case = self.services, self.case
        with anyio.CancelScope(shield=True):
            if self._begun is not None:
                # The in-progress write must land before the final one, which it would
                # otherwise overwrite.
                await asyncio.gather(self._begun, return_exceptions=True)
            await self.events.aclose()
            metrics = services.metrics
            if self._failure is not None:
                kind = "upstream" if isinstance(self._failure, UpstreamError) else "internal"
                metrics.errors.labels(kind).inc()
            elif self.stream.ended is None and case.error is None:
                case.error = "client disconnected before the response ended"
                metrics.errors.labels("client_disconnect").inc()
            if case.timings.total_ms is None:
                case.timings.total_ms = (time.time() - case.created_at) * 1000
            metrics.actions.labels(case.action).inc()
            status = "error" if case.action == "error" else "ok"
            metrics.requests.labels(str(case.stream).lower(), status).inc()
            services.sync_stats()
            span = self.stream.span
            span.set({"guardrail.action": case.action, "guardrail.status": status,
                      "http.response.status_code": self.status_code,
                      "guardrail.steps": len(case.steps), "guardrail.flagged": len(case.flagged),
                      "guardrail.corrections": len(case.corrections)})
            if self._failure is not None:
                span.fail(type(self._failure).__name__)
            elif self.stream.ended is None:
                span.set({"guardrail.client_disconnected": True})
            store_span = span.child("guardrail.case_store", {"guardrail.store":
                                                              services.store.name})
            try:
                stored = await services.recorder.record(case)
                # Not stored: the case went to the fallback file (nothing lost, but a case
                # store failure an operator wants to see).
                store_span.set({"guardrail.stored": stored})
            finally:
                store_span.end()
                span.end()
                services.drain.done(self.stream)
            log_response(case, self.request_id, self.status_code,
                         redact_text=bool(services.config.store.redact))
