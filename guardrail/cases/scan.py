"""Reading many cases: the keyset-paginated scan both stores share.

A store supplies one function that returns the next batch of raw rows after a cursor; this module
owns the loop, the SQL filter (the same in SQLite and PostgreSQL but for the placeholder), and
what happens to a record that cannot be read: it is skipped, logged and counted, never fatal, so
one bad row cannot stop a harvest of a hundred thousand.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from guardrail.cases.model import Case

if TYPE_CHECKING:
    from guardrail.cases.base import CaseQuery

logger = logging.getLogger(__name__)

RawRow = tuple[str, float, str | bytes]
"""``(id, created_at, record)`` as a store reads it, the record still as JSON text."""

FetchBatch = Callable[[tuple[float, str] | None, int], Awaitable[list[RawRow]]]
"""Reads at most ``limit`` rows after the cursor ``(created_at, id)``, oldest first."""

MAX_PROBLEMS_KEPT = 100
"""The first skipped records are kept with their reason; beyond that only counted."""


@dataclass(frozen=True, slots=True)
class SkippedRecord:
    case_id: str
    created_at: float
    reason: str


@dataclass
class CaseScan(AsyncIterator[Case]):
    """An async iterator over cases (oldest first) that counts what it had to skip.

    ``skipped`` and ``problems`` are final once the iteration has ended."""

    fetch: FetchBatch
    batch_size: int = 500
    where: str = ""
    """For messages: the store the scan reads."""
    skipped: int = 0
    problems: list[SkippedRecord] = field(default_factory=list)
    read: int = 0
    """Cases yielded so far."""
    after: tuple[float, str] | None = None
    """The cursor: where reading starts, then ``(created_at, id)`` of the last row read, so a
    scan that stopped part way can be resumed with ``CaseQuery(after=scan.after)``."""

    _cases_left: AsyncIterator[Case] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    def __aiter__(self) -> CaseScan:
        return self

    async def __anext__(self) -> Case:
        if self._cases_left is None:
            self._cases_left = self._cases()
        return await anext(self._cases_left)

    async def _cases(self) -> AsyncIterator[Case]:
        while True:
            rows = await self.fetch(self.after, self.batch_size)
            for case_id, created_at, record in rows:
                # The cursor moves past unreadable rows too, so a bad row is met once.
                self.after = (created_at, case_id)
                case = self._parse(case_id, created_at, record)
                if case is not None:
                    self.read += 1
                    yield case
            if len(rows) < self.batch_size:
                return

    def _parse(self, case_id: str, created_at: float, record: str | bytes) -> Case | None:
        try:
            return Case.model_validate_json(record)
        except ValueError as exc:
            reason = _first_line(exc)
            self.skipped += 1
            if len(self.problems) < MAX_PROBLEMS_KEPT:
                self.problems.append(SkippedRecord(case_id, created_at, reason))
            logger.warning("%scase %s cannot be read, skipped: %s",
                           f"{self.where}: " if self.where else "", case_id, reason)
            return None


def _first_line(exc: ValueError) -> str:
    """pydantic's message names the error count, then each error: keep the first one short."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:3])[:300] if lines else type(exc).__name__


def scan_filter(query: CaseQuery, after: tuple[float, str] | None, placeholder: str
                ) -> tuple[str, list[Any]]:
    """The WHERE clause (possibly empty) and its parameters for a ``CaseQuery`` and a cursor.

    The cursor is a row-value comparison, which both databases answer from the
    ``(created_at, id)`` index, so a batch costs the same at the end of the table as at the
    start (OFFSET would re-read everything before it)."""
    conditions: list[str] = []
    parameters: list[Any] = []
    if query.since is not None:
        conditions.append(f"created_at >= {placeholder}")
        parameters.append(float(query.since))
    if query.until is not None:
        conditions.append(f"created_at < {placeholder}")
        parameters.append(float(query.until))
    if query.actions:
        conditions.append(f"action IN ({', '.join([placeholder] * len(query.actions))})")
        parameters.extend(query.actions)
    if query.model is not None:
        conditions.append(f"model = {placeholder}")
        parameters.append(query.model)
    if query.labels:
        named = [label for label in query.labels if label is not None]
        either: list[str] = []
        if named:
            either.append(f"label IN ({', '.join([placeholder] * len(named))})")
            parameters.extend(named)
        if None in query.labels:
            either.append("label IS NULL")
        conditions.append(f"({' OR '.join(either)})")
    if after is not None:
        conditions.append(f"(created_at, id) > ({placeholder}, {placeholder})")
        parameters.extend(after)
    return (f"WHERE {' AND '.join(conditions)}" if conditions else ""), parameters


def scan_sql(query: CaseQuery, after: tuple[float, str] | None, limit: int, placeholder: str,
             record: str = "record") -> tuple[str, list[Any]]:
    where, parameters = scan_filter(query, after, placeholder)
    sql = (f"SELECT id, created_at, {record} FROM cases {where} "
           f"ORDER BY created_at, id LIMIT {placeholder}")
    return sql, [*parameters, limit]
