"""The case store protocol: durable storage of Case records."""

from __future__ import annotations

from typing import Protocol

from guardrail.cases.model import Action, Case, CaseSummary


class CaseStore(Protocol):
    name: str

    async def open(self) -> None:
        """Create the schema if needed; called once at start-up."""

    async def put(self, case: Case) -> None:
        """Insert or replace the case with this id. Raises ``StoreError`` on failure."""

    async def get(self, case_id: str) -> Case | None: ...

    async def list(
        self, *, limit: int = 50, offset: int = 0, action: Action | None = None
    ) -> list[CaseSummary]:
        """Newest first."""

    async def aclose(self) -> None: ...
