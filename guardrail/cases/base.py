"""The case store protocol: durable storage of Case records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from guardrail.cases.model import Action, Case, CaseSummary, ReviewLabel, ReviewVerdict
from guardrail.cases.scan import CaseScan


@dataclass(frozen=True, slots=True)
class CaseQuery:
    """Which cases to read, oldest first. Empty tuples mean any."""

    since: float | None = None
    """``created_at`` at or after this (seconds since the epoch)."""
    until: float | None = None
    """``created_at`` before this."""
    actions: tuple[Action, ...] = ()
    model: str | None = None
    labels: tuple[ReviewVerdict | None, ...] = ()
    """Review labels to keep; ``None`` in the tuple keeps unreviewed cases."""
    after: tuple[float, str] | None = None
    """The cursor: ``(created_at, id)`` of the last case already read; reading resumes after
    it (keyset pagination, so a scan costs the same wherever it is)."""


class CaseStore(Protocol):
    name: str

    async def open(self) -> None:
        """Create the schema if needed; called once at start-up."""

    async def put(self, case: Case) -> None:
        """Insert or replace the case with this id. Raises ``StoreError`` on failure.

        A case without a ``review`` keeps the review already stored for its id: reviews are
        set by :meth:`set_review`, and the proxy's final write of a case someone labelled while
        it streamed must not erase the label."""

    async def get(self, case_id: str) -> Case | None: ...

    async def list(
        self, *, limit: int = 50, offset: int = 0, action: Action | None = None
    ) -> list[CaseSummary]:
        """Newest first."""

    def scan(self, query: CaseQuery, *, batch_size: int = 500) -> CaseScan:
        """Every case matching ``query``, oldest first (``created_at``, then ``id``), read in
        batches of ``batch_size`` with a cursor, so memory stays flat however many there are.
        A record that cannot be read (malformed, or of a schema version this code does not
        know) is skipped, logged and counted in the returned scan's ``skipped`` and
        ``problems``, never fatal."""
        ...

    async def set_review(self, case_id: str, review: ReviewLabel) -> Case | None:
        """Store ``review`` with the case; the updated case, or None if there is none.
        ``StoreError`` if the stored record cannot be read (it is left as it is)."""

    async def put_unless_complete(self, case: Case) -> bool:
        """``put`` unless the store already holds a ``complete`` record of this id and
        ``case`` is not complete (a replay never downgrades). True if it was written."""

    async def aclose(self) -> None: ...
