"""SQLite case store: the default, a single file that needs no server.

The stdlib driver is blocking, so every call runs in a worker thread; one connection guarded by a
lock is enough because SQLite serialises writers anyway, and WAL mode lets readers (an admin
listing cases, ``sqlite3`` in a shell) proceed while the proxy writes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from guardrail.cases.base import CaseQuery
from guardrail.cases.model import SCHEMA_VERSION, Action, Case, CaseSummary, ReviewLabel
from guardrail.cases.scan import CaseScan, RawRow, scan_sql
from guardrail.errors import ConfigError, StoreError

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    model TEXT,
    action TEXT NOT NULL,
    flagged INTEGER NOT NULL,
    error TEXT,
    record TEXT NOT NULL,
    status TEXT,
    label TEXT
)
"""

# Columns added after the first release, with how to fill them from the JSON record of a row
# written before they existed (json_valid first: json_extract fails the whole UPDATE on one
# malformed record, which must stay readable as "skipped" instead).
_ADDED_COLUMNS = {
    "status": "CASE WHEN json_valid(record) "
              "THEN COALESCE(json_extract(record, '$.status'), 'complete') END",
    "label": "CASE WHEN json_valid(record) THEN json_extract(record, '$.review.label') END",
}

_INDEXES = """
DROP INDEX IF EXISTS cases_created_at;
CREATE INDEX IF NOT EXISTS cases_created_at_id ON cases (created_at, id);
CREATE INDEX IF NOT EXISTS cases_action ON cases (action);
CREATE INDEX IF NOT EXISTS cases_label ON cases (label);
"""

# A put without a review keeps the stored one (see CaseStore.put). json() marks the extracted
# object as JSON, so json_set inserts it as an object, not as a quoted string.
_UPSERT = """
INSERT INTO cases (id, created_at, model, action, flagged, error, record, status, label)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    created_at = excluded.created_at, model = excluded.model, action = excluded.action,
    flagged = excluded.flagged, error = excluded.error, status = excluded.status,
    record = CASE WHEN excluded.label IS NULL AND cases.label IS NOT NULL
                  THEN json_set(excluded.record, '$.review',
                                json(json_extract(cases.record, '$.review')))
                  ELSE excluded.record END,
    label = COALESCE(excluded.label, cases.label)
"""

_UNLESS_COMPLETE = " WHERE excluded.status = 'complete' OR cases.status IS NOT 'complete'"

_MEMORY = ":memory:"


def sqlite_path(url: str) -> str:
    """``sqlite:///rel/path.db`` -> ``rel/path.db`` (relative to the working directory),
    ``sqlite:////abs/path.db`` -> ``/abs/path.db``, ``sqlite:///:memory:`` -> ``:memory:``."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.split("+")[0] != "sqlite":
        raise ConfigError(f"store.url: expected sqlite:///PATH, got {url!r}")
    if not rest.startswith("/") or len(rest) < 2:
        # ``sqlite://file.db`` would read "file.db" as a host name in every other tool.
        raise ConfigError(
            f"store.url: expected sqlite:///relative/path.db or sqlite:////absolute/path.db "
            f"(three or four slashes), got {url!r}"
        )
    path = rest[1:].partition("?")[0]
    return path


def _create_or_migrate(connection: sqlite3.Connection) -> None:
    """Creates the table, or brings one written by an earlier version up to date. In one
    IMMEDIATE transaction, so two processes opening the same new file do not both add a
    column (the second would fail on a duplicate)."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute(_SCHEMA)
        present = {str(row[1]) for row in connection.execute("PRAGMA table_info(cases)")}
        missing = [name for name in _ADDED_COLUMNS if name not in present]
        for name in missing:
            connection.execute(f"ALTER TABLE cases ADD COLUMN {name} TEXT")
        if missing:
            assignments = ", ".join(f"{name} = {_ADDED_COLUMNS[name]}" for name in missing)
            connection.execute(f"UPDATE cases SET {assignments}")
        for statement in _INDEXES.split(";"):
            if statement.strip():
                connection.execute(statement)
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _row(case: Case) -> tuple[object, ...]:
    return (
        case.id, case.created_at, case.model, case.action, len(case.flagged), case.error,
        case.model_dump_json(), case.status, case.review.label if case.review else None,
    )


def _parse(path: str, case_id: str, record: str) -> Case:
    try:
        return Case.model_validate_json(record)
    except ValueError as exc:
        raise StoreError(f"sqlite store {path}: case {case_id} cannot be read: "
                         f"{' '.join(str(exc).split())[:300]}") from exc


class SQLiteCaseStore:
    name = "sqlite"

    def __init__(self, url: str, *, busy_timeout_ms: int = 5000) -> None:
        self.url = url
        self.path = sqlite_path(url)
        self.busy_timeout_ms = busy_timeout_ms
        self._connection: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SQLiteCaseStore({self.path!r})"

    async def open(self) -> None:
        if self._connection is not None:
            return
        await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> None:
        try:
            if self.path != _MEMORY:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # Autocommit (isolation_level=None): every statement is its own transaction, so a
            # failed write never leaves a transaction open that would block the next one.
            connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"sqlite store {self.path}: cannot open: {exc}") from exc
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            connection.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: durable against a crash of the process, may lose the last
            # commits on power loss; the usual trade for a write per request.
            connection.execute("PRAGMA synchronous = NORMAL")
            _create_or_migrate(connection)
        except sqlite3.Error as exc:
            connection.close()
            raise StoreError(f"sqlite store {self.path}: cannot create schema: {exc}") from exc
        self._connection = connection

    async def _run(self, operation: str, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                connection = self._connection
                if connection is None:
                    raise StoreError(f"sqlite store {self.path}: {operation} before open()")
                try:
                    return work(connection)
                except sqlite3.Error as exc:
                    raise StoreError(
                        f"sqlite store {self.path}: {operation} failed: {exc}"
                    ) from exc

        return await asyncio.to_thread(locked)

    async def put(self, case: Case) -> None:
        row = _row(case)
        await self._run("put", lambda connection: connection.execute(_UPSERT, row))

    async def put_unless_complete(self, case: Case) -> bool:
        row = _row(case)

        def write(connection: sqlite3.Connection) -> bool:
            return connection.execute(_UPSERT + _UNLESS_COMPLETE, row).rowcount > 0

        return await self._run("put", write)

    async def set_review(self, case_id: str, review: ReviewLabel) -> Case | None:
        def update(connection: sqlite3.Connection) -> Case | None:
            # Read, check, write in one transaction: a concurrent put cannot slip between.
            connection.execute("BEGIN IMMEDIATE")
            try:
                row = connection.execute(
                    "SELECT record FROM cases WHERE id = ?", (case_id,)).fetchone()
                if row is None:
                    connection.execute("ROLLBACK")
                    return None
                case = _parse(self.path, case_id, str(row[0])).model_copy(
                    update={"review": review, "schema_version": SCHEMA_VERSION})
                connection.execute("UPDATE cases SET record = ?, label = ? WHERE id = ?",
                                   (case.model_dump_json(), review.label, case_id))
                connection.execute("COMMIT")
                return case
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

        return await self._run("set_review", update)

    def scan(self, query: CaseQuery, *, batch_size: int = 500) -> CaseScan:
        def fetch(after: tuple[float, str] | None, limit: int) -> Awaitable[list[RawRow]]:
            sql, parameters = scan_sql(query, after, limit, "?")

            def read(connection: sqlite3.Connection) -> list[RawRow]:
                return [(str(row[0]), float(row[1]),
                         row[2] if isinstance(row[2], str | bytes) else str(row[2]))
                        for row in connection.execute(sql, parameters)]

            return self._run("scan", read)

        return CaseScan(fetch, batch_size, where=f"sqlite store {self.path}", after=query.after)

    async def get(self, case_id: str) -> Case | None:
        def fetch(connection: sqlite3.Connection) -> str | None:
            row = connection.execute("SELECT record FROM cases WHERE id = ?", (case_id,)).fetchone()
            return None if row is None else str(row[0])

        record = await self._run("get", fetch)
        return None if record is None else _parse(self.path, case_id, record)

    async def list(
        self, *, limit: int = 50, offset: int = 0, action: Action | None = None
    ) -> list[CaseSummary]:
        if limit < 0 or offset < 0:
            raise ValueError(f"limit and offset must be >= 0, got {limit} and {offset}")
        where, parameters = ("WHERE action = ?", [action]) if action is not None else ("", [])
        query = (
            f"SELECT id, created_at, model, action, flagged, error FROM cases {where} "
            "ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?"
        )

        def fetch(connection: sqlite3.Connection) -> list[tuple[object, ...]]:
            return connection.execute(query, (*parameters, limit, offset)).fetchall()

        rows = await self._run("list", fetch)
        return [
            CaseSummary.model_validate(
                dict(zip(("id", "created_at", "model", "action", "flagged", "error"), row,
                         strict=True))
            )
            for row in rows
        ]

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                connection, self._connection = self._connection, None
                if connection is not None:
                    connection.close()

        await asyncio.to_thread(close)
