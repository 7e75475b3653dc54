"""Reading cases at scale, on both real stores (a SQLite file, the throwaway PostgreSQL): the
ordered scan with its cursor and filters, records of every schema version, unreadable rows,
the migration of a database an earlier version wrote, review labels and the replay rule."""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest

from guardrail.cases import Case, CaseStore, build_store
from guardrail.cases.base import CaseQuery
from guardrail.cases.model import SCHEMA_VERSION, ReviewLabel
from guardrail.config import StoreConfig
from guardrail.errors import StoreError
from tests.test_case_stores import full_case

BASE = 1_716_200_000.0

# The table exactly as the first release created it: no status, no label.
OLD_SQLITE_SCHEMA = """
CREATE TABLE cases (
    id TEXT PRIMARY KEY, created_at REAL NOT NULL, model TEXT, action TEXT NOT NULL,
    flagged INTEGER NOT NULL, error TEXT, record TEXT NOT NULL
);
CREATE INDEX cases_created_at ON cases (created_at);
CREATE INDEX cases_action ON cases (action);
"""
OLD_PG_SCHEMA = (
    """CREATE TABLE cases (
        id TEXT PRIMARY KEY, created_at DOUBLE PRECISION NOT NULL, model TEXT,
        action TEXT NOT NULL, flagged INTEGER NOT NULL, error TEXT, record JSONB NOT NULL)""",
    "CREATE INDEX cases_created_at ON cases (created_at)",
    "CREATE INDEX cases_action ON cases (action)",
)


def version_1_record(case_id: str, created_at: float, **fields: Any) -> str:
    """A record as the first release wrote it: no schema_version, no review, no status."""
    record = {
        "id": case_id, "created_at": created_at, "model": "m-old", "upstream": "openai",
        "guard": "llama-guard", "mode": "stepwise", "stream": False,
        "request": {"messages": [{"role": "user", "content": "old prompt"}]},
        "steps": [{"index": 0, "channel": "reasoning", "text": "Old step.", "unsafe": True,
                   "categories": ["S2"], "score": 0.9, "raw": "unsafe\nS2",
                   "error": None, "latency_ms": 3.0, "released": False}],
        "withheld": "Old step.", "client_reasoning": "", "client_content": "Sorry.",
        "action": "refused", "finish_reason": "stop",
        "flagged": [{"step": 0, "categories": ["S2"], "score": 0.9}],
        "corrections": [{"round": 1, "strategy": "refuse", "withheld": "", "inserted": "",
                         "continuation": "Sorry.", "extra": {}}],
        "usage": None, "timings": {"total_ms": 5.0, "upstream_first_token_ms": 1.0,
                                   "guard_total_ms": 3.0, "guard_max_ms": 3.0},
        "error": None,
    }
    record.update(fields)
    return json.dumps(record)


def insert_raw(url: str, rows: list[tuple[str, float, str, str]]) -> None:
    """Rows ``(id, created_at, action, record)`` written straight into the table, the way an
    earlier version (or a damaged disk) left them."""
    values = [(case_id, created_at, "m-old", action, 0, None, record)
              for case_id, created_at, action, record in rows]
    if url.startswith("sqlite"):
        with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as connection:
            connection.executemany(
                "INSERT INTO cases (id, created_at, model, action, flagged, error, record) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", values)
            connection.commit()
    else:
        with psycopg.connect(url, autocommit=True) as server, server.cursor() as cur:
            cur.executemany(
                "INSERT INTO cases (id, created_at, model, action, flagged, error, record) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb)", values)


def columns(url: str) -> set[str]:
    if url.startswith("sqlite"):
        with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as connection:
            return {str(row[1]) for row in connection.execute("PRAGMA table_info(cases)")}
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'cases'").fetchall()
    return {str(row[0]) for row in rows}


def create_old_table(url: str) -> None:
    if url.startswith("sqlite"):
        with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as connection:
            connection.executescript(OLD_SQLITE_SCHEMA)
    else:
        with psycopg.connect(url, autocommit=True) as connection:
            for statement in OLD_PG_SCHEMA:
                connection.execute(statement)


def case_at(created_at: float, *, case_id: str | None = None, action: str = "pass",
            model: str = "m-a", status: str = "complete") -> Case:
    return Case.model_validate({
        "id": case_id or f"case_{uuid.uuid4().hex}", "created_at": created_at, "model": model,
        "action": action, "status": status,
        "request": {"messages": [{"role": "user", "content": f"prompt at {created_at}"}]},
    })


async def read_all(store: CaseStore, query: CaseQuery | None = None, batch_size: int = 500
                   ) -> list[Case]:
    return [case async for case in store.scan(query or CaseQuery(), batch_size=batch_size)]


@pytest.fixture
async def opened_at(store_url: str) -> AsyncIterator[str]:
    """The URL of a store that has been opened once (so its table exists), then closed."""
    opened = build_store(StoreConfig(url=store_url))
    await opened.open()
    await opened.aclose()
    yield store_url


# -- scanning ---------------------------------------------------------------------------------

async def test_scan_is_oldest_first_and_the_cursor_crosses_batches(store: CaseStore) -> None:
    # Ties on created_at (as a burst of requests gives) are ordered by id, so the cursor
    # neither repeats nor skips a case at a batch boundary that falls inside a tie.
    times = [BASE + (n // 3) for n in range(23)]
    cases = [case_at(created_at) for created_at in times]
    for case in reversed(cases):
        await store.put(case)
    expected = sorted(cases, key=lambda case: (case.created_at, case.id))
    for batch_size in (1, 2, 3, 4, 7, 23, 500):
        scan = store.scan(CaseQuery(), batch_size=batch_size)
        seen = [case.id async for case in scan]
        assert seen == [case.id for case in expected], batch_size
        assert scan.read == 23 and scan.skipped == 0
        assert scan.after == (expected[-1].created_at, expected[-1].id)


async def test_a_scan_resumes_after_its_cursor(store: CaseStore) -> None:
    cases = [case_at(BASE + n) for n in range(10)]
    for case in cases:
        await store.put(case)
    scan = store.scan(CaseQuery(), batch_size=3)
    first: list[str] = []
    async for case in scan:
        first.append(case.id)
        if len(first) == 4:
            break
    rest = await read_all(store, CaseQuery(after=scan.after), batch_size=3)
    assert first + [case.id for case in rest] == [case.id for case in cases]


async def test_every_filter(store: CaseStore) -> None:
    a = case_at(BASE + 1, action="pass", model="m-a")
    b = case_at(BASE + 2, action="intervened", model="m-a")
    c = case_at(BASE + 3, action="refused", model="m-b")
    d = case_at(BASE + 4, action="intervened", model="m-b")
    e = case_at(BASE + 5, action="rewritten", model="m-a")
    for case in (a, b, c, d, e):
        await store.put(case)
    await store.set_review(b.id, ReviewLabel(label="confirmed", by="t"))
    await store.set_review(c.id, ReviewLabel(label="false_positive", by="t"))
    await store.set_review(d.id, ReviewLabel(label="bad_correction", by="t"))

    async def ids(**query: Any) -> list[str]:
        return [case.id for case in await read_all(store, CaseQuery(**query), batch_size=2)]

    assert await ids() == [a.id, b.id, c.id, d.id, e.id]
    assert await ids(since=BASE + 2) == [b.id, c.id, d.id, e.id]
    assert await ids(until=BASE + 3) == [a.id, b.id]  # until is exclusive
    assert await ids(since=BASE + 2, until=BASE + 4) == [b.id, c.id]
    assert await ids(actions=("intervened", "rewritten")) == [b.id, d.id, e.id]
    assert await ids(model="m-b") == [c.id, d.id]
    assert await ids(model="m-none") == []
    assert await ids(labels=("confirmed",)) == [b.id]
    assert await ids(labels=(None,)) == [a.id, e.id]
    assert await ids(labels=("confirmed", None)) == [a.id, b.id, e.id]
    assert await ids(labels=("false_positive", "bad_correction")) == [c.id, d.id]
    assert await ids(actions=("intervened",), labels=("bad_correction",), model="m-b",
                     since=BASE) == [d.id]
    labelled = await read_all(store, CaseQuery(labels=("confirmed",)))
    assert labelled[0].review is not None and labelled[0].review.label == "confirmed"


async def test_an_empty_store_scans_to_nothing(store: CaseStore) -> None:
    scan = store.scan(CaseQuery())
    assert [case async for case in scan] == []
    assert (scan.read, scan.skipped, scan.after) == (0, 0, None)
    with pytest.raises(ValueError, match="batch_size"):
        store.scan(CaseQuery(), batch_size=0)


# -- versions and unreadable rows -------------------------------------------------------------

def test_a_case_built_in_code_is_this_version_and_a_stored_one_without_it_is_1() -> None:
    assert Case(model="m").schema_version == SCHEMA_VERSION
    assert Case.model_validate({"model": "m"}).schema_version == SCHEMA_VERSION
    assert Case.model_validate_json('{"model": "m"}').schema_version == 1
    assert Case.model_validate({"model": "m"}, context={"stored": True}).schema_version == 1
    for version in (0, SCHEMA_VERSION + 1, "2", True, 1.5):
        with pytest.raises(ValueError, match="schema_version"):
            Case.model_validate_json(json.dumps({"schema_version": version}))


async def test_a_version_1_record_reads(opened_at: str) -> None:
    insert_raw(opened_at, [("case_v1", BASE, "refused", version_1_record("case_v1", BASE))])
    store = build_store(StoreConfig(url=opened_at))
    await store.open()
    try:
        loaded = await store.get("case_v1")
        assert loaded is not None
        assert loaded.schema_version == 1 and loaded.review is None
        assert loaded.action == "refused" and loaded.withheld == "Old step."
        assert loaded.corrections[0].continuation == "Sorry."
        assert loaded.corrections[0].outcome is None  # a version-2 field, defaulted
        scanned = await read_all(store)
        assert [case.model_dump() for case in scanned] == [loaded.model_dump()]
        # Labelling it rewrites it in this version's schema.
        labelled = await store.set_review("case_v1", ReviewLabel(label="confirmed", by="t"))
        assert labelled is not None and labelled.schema_version == SCHEMA_VERSION
        again = await store.get("case_v1")
        assert again is not None and again.review == labelled.review
        assert again.withheld == "Old step."
    finally:
        await store.aclose()


async def test_unreadable_rows_are_skipped_counted_and_logged(
    opened_at: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = [case_at(BASE + n) for n in (0, 2, 4)]
    bad = [
        ("case_future", BASE + 1, "pass",
         version_1_record("case_future", BASE + 1, schema_version=SCHEMA_VERSION + 1)),
        ("case_shape", BASE + 3, "pass", json.dumps({"id": "case_shape", "steps": "oops"})),
    ]
    if opened_at.startswith("sqlite"):  # PostgreSQL's JSONB cannot hold text that is not JSON
        bad.append(("case_torn", BASE + 5, "pass", '{"id": "case_torn", "creat'))
    insert_raw(opened_at, bad)
    store = build_store(StoreConfig(url=opened_at))
    await store.open()
    try:
        for case in good:
            await store.put(case)
        caplog.set_level(logging.WARNING, logger="guardrail.cases.scan")
        scan = store.scan(CaseQuery(), batch_size=2)
        assert [case.id async for case in scan] == [case.id for case in good]
        assert scan.skipped == len(bad)
        assert [problem.case_id for problem in scan.problems] == [row[0] for row in bad]
        assert "schema_version 3" in scan.problems[0].reason
        assert all(row[0] in caplog.text for row in bad)
        # get() of one is a store error naming the case, not a validation traceback.
        with pytest.raises(StoreError, match="case_future cannot be read"):
            await store.get("case_future")
        # Labelling one fails the same way and leaves the row as it was.
        with pytest.raises(StoreError, match="case_shape cannot be read"):
            await store.set_review("case_shape", ReviewLabel(label="confirmed", by="t"))
        assert [case.id for case in await read_all(store, CaseQuery(labels=(None,)))] == [
            case.id for case in good]
    finally:
        await store.aclose()


# -- migration --------------------------------------------------------------------------------

async def test_a_database_an_earlier_version_wrote_is_migrated(store_url: str) -> None:
    create_old_table(store_url)
    labelled_record = json.loads(version_1_record("case_labelled", BASE + 2))
    labelled_record.update(schema_version=2, status="complete",
                           review={"label": "confirmed", "by": "x", "at": BASE, "note": None})
    rows = [
        ("case_old", BASE, "refused", version_1_record("case_old", BASE)),
        ("case_busy", BASE + 1, "pass",
         version_1_record("case_busy", BASE + 1, status="in_progress")),
        ("case_labelled", BASE + 2, "refused", json.dumps(labelled_record)),
        ("case_bad", BASE + 3, "pass", json.dumps({"id": "case_bad", "steps": 1})),
    ]
    if store_url.startswith("sqlite"):
        rows.append(("case_torn", BASE + 4, "pass", "{not json"))
    insert_raw(store_url, rows)
    assert "label" not in columns(store_url)
    for first in (True, False):  # opening again finds nothing left to do
        store = build_store(StoreConfig(url=store_url))
        await store.open()
        try:
            assert {"status", "label"} <= columns(store_url)
            assert [case.id for case in await read_all(store, CaseQuery(labels=("confirmed",)))
                    ] == ["case_labelled"]
            scan = store.scan(CaseQuery(labels=(None,)))
            replaced = [] if first or not store_url.startswith("sqlite") else ["case_torn"]
            assert [case.id async for case in scan] == ["case_old", "case_busy", *replaced]
            assert scan.skipped == len(rows) - 3
            loaded = await store.get("case_old")
            assert loaded is not None and loaded.schema_version == 1
            if not first:
                continue
            # The backfilled status decides what a replay may overwrite.
            stale = case_at(BASE, case_id="case_old", status="in_progress")
            assert not await store.put_unless_complete(stale)
            done = case_at(BASE + 1, case_id="case_busy", action="refused")
            assert await store.put_unless_complete(done)
            if store_url.startswith("sqlite"):
                # A row that is not even JSON has no status: a replay may overwrite it.
                assert await store.put_unless_complete(
                    case_at(BASE + 4, case_id="case_torn", status="in_progress"))
                rows.pop()
        finally:
            await store.aclose()


# -- reviews and the replay rule --------------------------------------------------------------

async def test_set_review_stores_label_author_time_and_note(store: CaseStore) -> None:
    case = full_case()
    await store.put(case)
    review = ReviewLabel(label="bad_correction", by="admin-key-1", at=BASE, note="cut too late")
    updated = await store.set_review(case.id, review)
    assert updated is not None and updated.review == review
    loaded = await store.get(case.id)
    assert loaded is not None and loaded.review == review
    assert loaded.model_dump(exclude={"review"}) == case.model_dump(exclude={"review"})
    assert await store.set_review("case_unknown", review) is None


async def test_a_put_without_a_review_keeps_the_stored_one(store: CaseStore) -> None:
    # The proxy's final write of a case labelled while it streamed must not erase the label.
    case = case_at(BASE, status="in_progress")
    await store.put(case)
    review = ReviewLabel(label="confirmed", by="alice", at=BASE, note="n")
    await store.set_review(case.id, review)
    finished = case.model_copy(update={"status": "complete", "action": "intervened"})
    await store.put(finished)
    loaded = await store.get(case.id)
    assert loaded is not None and loaded.review == review and loaded.action == "intervened"
    assert [c.id for c in await read_all(store, CaseQuery(labels=("confirmed",)))] == [case.id]
    # A put that carries a review replaces it.
    other = ReviewLabel(label="false_positive", by="bob", at=BASE + 1)
    await store.put(finished.model_copy(update={"review": other}))
    loaded = await store.get(case.id)
    assert loaded is not None and loaded.review == other
    assert [c.id for c in await read_all(store, CaseQuery(labels=("confirmed",)))] == []


async def test_put_unless_complete_never_downgrades(store: CaseStore) -> None:
    complete = full_case()
    assert await store.put_unless_complete(complete)  # new id: written
    older = complete.model_copy(update={"status": "in_progress", "action": "pass",
                                        "client_content": ""})
    assert not await store.put_unless_complete(older)
    loaded = await store.get(complete.id)
    assert loaded is not None and loaded.model_dump() == complete.model_dump()
    # An in-progress row is completed by a replay, and complete replaces complete.
    busy = case_at(BASE, status="in_progress")
    await store.put(busy)
    assert await store.put_unless_complete(busy)  # in progress over in progress: written
    done = busy.model_copy(update={"status": "complete", "action": "refused"})
    assert await store.put_unless_complete(done)
    assert await store.put_unless_complete(done.model_copy(update={"error": "x"}))
    loaded = await store.get(busy.id)
    assert loaded is not None and loaded.status == "complete" and loaded.error == "x"


def test_scan_sql_uses_the_index(tmp_path: Path) -> None:
    """The query plan for a scan batch with a cursor reads the (created_at, id) index, not the
    whole table, so a batch at the end costs what one at the start does."""
    import asyncio

    from guardrail.cases.scan import scan_sql

    url = f"sqlite:///{tmp_path}/cases.db"
    store = build_store(StoreConfig(url=url))
    asyncio.run(store.open())
    asyncio.run(store.aclose())
    sql, parameters = scan_sql(CaseQuery(), (BASE, "case_x"), 500, "?")
    with closing(sqlite3.connect(str(tmp_path / "cases.db"))) as connection:
        plan = " ".join(str(row[-1]) for row in
                        connection.execute(f"EXPLAIN QUERY PLAN {sql}", parameters))
    assert "cases_created_at_id" in plan and "SCAN cases" not in plan.replace(
        "USING INDEX", ""), plan
