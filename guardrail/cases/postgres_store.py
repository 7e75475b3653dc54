"""PostgreSQL case store, for deployments where several proxy workers share one database.

Native async through psycopg 3 and a small connection pool. The full Case is kept as JSONB next
to the few columns that listings filter and sort on, so the offline harvest can query inside
records with SQL while the schema of Case stays defined in one place (``model.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from guardrail.cases.model import Action, Case, CaseSummary
from guardrail.errors import ConfigError, StoreError

# Serialises schema creation when several workers start at once: CREATE ... IF NOT EXISTS is not
# safe against a concurrent twin (it can fail on a unique index of the catalogue).
_SCHEMA_LOCK_KEY = 0x6775617264  # "guard"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS cases (
        id TEXT PRIMARY KEY,
        created_at DOUBLE PRECISION NOT NULL,
        model TEXT,
        action TEXT NOT NULL,
        flagged INTEGER NOT NULL,
        error TEXT,
        record JSONB NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS cases_created_at ON cases (created_at)",
    "CREATE INDEX IF NOT EXISTS cases_action ON cases (action)",
)

_UPSERT = """
INSERT INTO cases (id, created_at, model, action, flagged, error, record)
VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb)
ON CONFLICT (id) DO UPDATE SET
    created_at = EXCLUDED.created_at, model = EXCLUDED.model, action = EXCLUDED.action,
    flagged = EXCLUDED.flagged, error = EXCLUDED.error, record = EXCLUDED.record
"""

_SUMMARY_FIELDS = ("id", "created_at", "model", "action", "flagged", "error")


def _normalise_url(url: str) -> str:
    """libpq knows ``postgresql://`` and ``postgres://``; SQLAlchemy-style ``+driver`` is
    accepted too (``build_store`` routes it here) and dropped."""
    scheme, separator, rest = url.partition("://")
    base = scheme.split("+")[0]
    if not separator or base not in ("postgresql", "postgres"):
        raise ConfigError(f"store.url: expected postgresql://..., got a {scheme!r} URL")
    return f"{base}://{rest}"


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
        message = str(exc).strip() or type(exc).__name__
        if self._password:
            message = message.replace(self._password, "***")
        return StoreError(f"postgresql store at {self.where}: {operation} failed: {message}")

    async def open(self) -> None:
        if self._pool is not None:
            return
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
                for statement in _SCHEMA:
                    await connection.execute(statement)
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
        row = (
            case.id, case.created_at, case.model, case.action, len(case.flagged), case.error,
            case.model_dump_json(),
        )
        async with self._connection("put") as connection:
            await connection.execute(_UPSERT, row)

    async def get(self, case_id: str) -> Case | None:
        async with self._connection("get") as connection:
            cursor = await connection.execute(
                "SELECT record::text FROM cases WHERE id = %s", (case_id,)
            )
            row = await cursor.fetchone()
        return None if row is None else Case.model_validate_json(row[0])

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
