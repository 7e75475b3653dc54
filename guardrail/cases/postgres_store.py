"""PostgreSQL case store, for deployments where several proxy workers share one database.

Native async through psycopg 3 and a small connection pool. The full Case is kept as JSONB next
to the few columns that listings filter and sort on, so the offline harvest can query inside
records with SQL while the schema of Case stays defined in one place (``model.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from guardrail.cases.base import CaseQuery
from guardrail.cases.model import SCHEMA_VERSION, Action, Case, CaseSummary, ReviewLabel
from guardrail.cases.scan import CaseScan, RawRow, scan_sql
from guardrail.errors import ConfigError, StoreError

# Serialises schema creation when several workers start at once: CREATE ... IF NOT EXISTS is not
# safe against a concurrent twin (it can fail on a unique index of the catalogue).
_SCHEMA_LOCK_KEY = 0x6775617264  # "guard"

_SCHEMA = """CREATE TABLE IF NOT EXISTS cases (
    id TEXT PRIMARY KEY,
    created_at DOUBLE PRECISION NOT NULL,
    model TEXT,
    action TEXT NOT NULL,
    flagged INTEGER NOT NULL,
    error TEXT,
    record JSONB NOT NULL,
    status TEXT,
    label TEXT
)"""

# Columns added after the first release, with how to fill them from the record of a row written
# before they existed.
_ADDED_COLUMNS = {
    "status": "COALESCE(record->>'status', 'complete')",
    "label": "record->'review'->>'label'",
}

_INDEXES = (
    "DROP INDEX IF EXISTS cases_created_at",
    "CREATE INDEX IF NOT EXISTS cases_created_at_id ON cases (created_at, id)",
    "CREATE INDEX IF NOT EXISTS cases_action ON cases (action)",
    "CREATE INDEX IF NOT EXISTS cases_label ON cases (label)",
)

# A put without a review keeps the stored one (see CaseStore.put).
_UPSERT = """
INSERT INTO cases (id, created_at, model, action, flagged, error, record, status, label)
VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s)
ON CONFLICT (id) DO UPDATE SET
    created_at = EXCLUDED.created_at, model = EXCLUDED.model, action = EXCLUDED.action,
    flagged = EXCLUDED.flagged, error = EXCLUDED.error, status = EXCLUDED.status,
    record = CASE WHEN EXCLUDED.label IS NULL AND cases.label IS NOT NULL
                  THEN jsonb_set(EXCLUDED.record, '{review}', cases.record->'review')
                  ELSE EXCLUDED.record END,
    label = COALESCE(EXCLUDED.label, cases.label)
"""

_UNLESS_COMPLETE = (" WHERE EXCLUDED.status = 'complete' "
                    "OR cases.status IS DISTINCT FROM 'complete'")

_SUMMARY_FIELDS = ("id", "created_at", "model", "action", "flagged", "error")


def _normalise_url(url: str) -> str:
    """libpq knows ``postgresql://`` and ``postgres://``; SQLAlchemy-style ``+driver`` is
    accepted too (``build_store`` routes it here) and dropped."""
    scheme, separator, rest = url.partition("://")
    base = scheme.split("+")[0]
    if not separator or base not in ("postgresql", "postgres"):
        raise ConfigError(f"store.url: expected postgresql://..., got a {scheme!r} URL")
    return f"{base}://{rest}"


async def _create_or_migrate(connection: psycopg.AsyncConnection[Any]) -> None:
    """Creates the table, or brings one written by an earlier version up to date (run under
    the schema lock, in the caller's transaction)."""
    await connection.execute(_SCHEMA)
    cursor = await connection.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = 'cases'")
    present = {str(row[0]) for row in await cursor.fetchall()}
    missing = [name for name in _ADDED_COLUMNS if name not in present]
    for name in missing:
        await connection.execute(f"ALTER TABLE cases ADD COLUMN {name} TEXT")
    if missing:
        assignments = ", ".join(f"{name} = {_ADDED_COLUMNS[name]}" for name in missing)
        await connection.execute(f"UPDATE cases SET {assignments}")
    for statement in _INDEXES:
        await connection.execute(statement)


def _row(case: Case) -> tuple[object, ...]:
    return (
        case.id, case.created_at, case.model, case.action, len(case.flagged), case.error,
        case.model_dump_json(), case.status, case.review.label if case.review else None,
    )


class PostgresCaseStore:
    name = "postgresql"

    def __init__(
        self, url: str, *, timeout: float = 10.0, min_size: int = 1, max_size: int = 8
    ) -> None:
        self._conninfo = _normalise_url(url)
        try:
            parameters = conninfo_to_dict(self._conninfo)
        except psycopg.Error as exc:
            # The parser's message may quote the URL, password included: do not repeat it.
            raise ConfigError("store.url: not a valid PostgreSQL connection URL") from exc
        self._password = str(parameters.get("password") or "")
        host = parameters.get("host") or "local socket"
        port = parameters.get("port") or "5432"
        self.where = f"{host}:{port}/{parameters.get('dbname') or ''}"
        """Host, port and database, for messages; never the password."""
        self.timeout = timeout
        self._min_size = min_size
        self._max_size = max_size
        self._pool: AsyncConnectionPool | None = None

    def __repr__(self) -> str:
        return f"PostgresCaseStore({self.where!r})"

    def _error(self, operation: str, exc: BaseException) -> StoreError:
        message = " ".join(str(exc).split()) or type(exc).__name__
        if self._password:
            message = message.replace(self._password, "***")
        return StoreError(f"postgresql store at {self.where}: {operation} failed: {message}")

    async def open(self) -> None:
        if self._pool is not None:
            return
        # One plain connection first: a server that does not answer fails here at once with
        # libpq's reason (refused, unknown host, bad password), where the pool would retry in
        # the background until its timeout and report only that it gave up.
        try:
            probe = await asyncio.wait_for(
                psycopg.AsyncConnection.connect(
                    self._conninfo, connect_timeout=max(2, int(self.timeout))),
                timeout=self.timeout + 1)
            await probe.close()
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise self._error("open", exc) from exc
        pool = AsyncConnectionPool(
            self._conninfo,
            min_size=self._min_size,
            max_size=self._max_size,
            timeout=self.timeout,
            # libpq's connect_timeout is whole seconds and at least 2.
            kwargs={"connect_timeout": max(2, int(self.timeout)), "autocommit": True},
            # A connection the server dropped (restart, failover) is replaced on checkout
            # instead of failing the one put that happens to get it.
            check=AsyncConnectionPool.check_connection,
            name="guardrail-cases",
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=self.timeout)
            async with pool.connection() as connection, connection.transaction():
                await connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
                await _create_or_migrate(connection)
        except (psycopg.Error, OSError) as exc:
            await pool.close()
            raise self._error("open", exc) from exc
        self._pool = pool

    @asynccontextmanager
    async def _connection(self, operation: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if self._pool is None:
            raise StoreError(f"postgresql store at {self.where}: {operation} before open()")
        try:
            async with self._pool.connection(timeout=self.timeout) as connection:
                yield connection
        except (psycopg.Error, OSError) as exc:
            raise self._error(operation, exc) from exc

    async def put(self, case: Case) -> None:
        async with self._connection("put") as connection:
            await connection.execute(_UPSERT, _row(case))

    async def put_unless_complete(self, case: Case) -> bool:
        async with self._connection("put") as connection:
            cursor = await connection.execute(_UPSERT + _UNLESS_COMPLETE, _row(case))
            return cursor.rowcount > 0

    async def set_review(self, case_id: str, review: ReviewLabel) -> Case | None:
        async with self._connection("set_review") as connection, connection.transaction():
            # FOR UPDATE: a concurrent put waits for this read-check-write to finish.
            cursor = await connection.execute(
                "SELECT record::text FROM cases WHERE id = %s FOR UPDATE", (case_id,))
            row = await cursor.fetchone()
            if row is None:
                return None
            case = self._parse(case_id, row[0]).model_copy(
                update={"review": review, "schema_version": SCHEMA_VERSION})
            await connection.execute(
                "UPDATE cases SET record = %s::jsonb, label = %s WHERE id = %s",
                (case.model_dump_json(), review.label, case_id))
        return case

    def scan(self, query: CaseQuery, *, batch_size: int = 500) -> CaseScan:
        async def fetch(after: tuple[float, str] | None, limit: int) -> list[RawRow]:
            sql, parameters = scan_sql(query, after, limit, "%s", record="record::text")
            async with self._connection("scan") as connection:
                cursor = await connection.execute(sql, parameters)
                rows = await cursor.fetchall()
            return [(str(row[0]), float(row[1]), str(row[2])) for row in rows]

        return CaseScan(fetch, batch_size, where=f"postgresql store at {self.where}",
                        after=query.after)

    def _parse(self, case_id: str, record: str) -> Case:
        try:
            return Case.model_validate_json(record)
        except ValueError as exc:
            raise StoreError(f"postgresql store at {self.where}: case {case_id} cannot be "
                             f"read: {' '.join(str(exc).split())[:300]}") from exc

    async def get(self, case_id: str) -> Case | None:
        async with self._connection("get") as connection:
            cursor = await connection.execute(
                "SELECT record::text FROM cases WHERE id = %s", (case_id,)
            )
            row = await cursor.fetchone()
        return None if row is None else self._parse(case_id, row[0])

    async def list(
        self, *, limit: int = 50, offset: int = 0, action: Action | None = None
    ) -> list[CaseSummary]:
        if limit < 0 or offset < 0:
            raise ValueError(f"limit and offset must be >= 0, got {limit} and {offset}")
        where, parameters = ("WHERE action = %s", [action]) if action is not None else ("", [])
        query = (
            f"SELECT {', '.join(_SUMMARY_FIELDS)} FROM cases {where} "
            "ORDER BY created_at DESC, id DESC LIMIT %s OFFSET %s"
        )
        async with self._connection("list") as connection:
            cursor = await connection.execute(query, (*parameters, limit, offset))
            rows = await cursor.fetchall()
        return [
            CaseSummary.model_validate(dict(zip(_SUMMARY_FIELDS, row, strict=True)))
            for row in rows
        ]

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
