"""SQLite case store: the default, a single file that needs no server.

The stdlib driver is blocking, so every call runs in a worker thread; one connection guarded by a
lock is enough because SQLite serialises writers anyway, and WAL mode lets readers (an admin
listing cases, ``sqlite3`` in a shell) proceed while the proxy writes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from guardrail.cases.model import Action, Case, CaseSummary
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
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cases_created_at ON cases (created_at);
CREATE INDEX IF NOT EXISTS cases_action ON cases (action);
"""

_UPSERT = """
INSERT INTO cases (id, created_at, model, action, flagged, error, record)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    created_at = excluded.created_at, model = excluded.model, action = excluded.action,
    flagged = excluded.flagged, error = excluded.error, record = excluded.record
"""

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
            connection.executescript(_SCHEMA)
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
        row = (
            case.id, case.created_at, case.model, case.action, len(case.flagged), case.error,
            case.model_dump_json(),
        )
        await self._run("put", lambda connection: connection.execute(_UPSERT, row))

    async def get(self, case_id: str) -> Case | None:
        def fetch(connection: sqlite3.Connection) -> str | None:
            row = connection.execute("SELECT record FROM cases WHERE id = ?", (case_id,)).fetchone()
            return None if row is None else str(row[0])

        record = await self._run("get", fetch)
        return None if record is None else Case.model_validate_json(record)

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
