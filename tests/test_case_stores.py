"""The case stores against real databases (a SQLite file, a throwaway PostgreSQL server), and the
recorder that keeps a case in a fallback file when the store fails."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import psycopg
import pytest

from guardrail.cases import Case, CaseStore, Correction, Flag, StepRecord, build_store
from guardrail.cases.model import Timings
from guardrail.cases.postgres_store import PostgresCaseStore
from guardrail.cases.recorder import CaseRecorder, read_fallback
from guardrail.cases.sqlite_store import SQLiteCaseStore
from guardrail.config import StoreConfig
from guardrail.errors import ConfigError, StoreError


def _closed_port() -> int:
    # Bound and released: nothing listens there now.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def full_case(number: int = 0, *, created_at: float | None = None, action: str = "rewritten",
              error: str | None = "guard timed out on step 3") -> Case:
    """A case with every part filled in, so a round trip that drops anything shows."""
    return Case.model_validate({
        "id": f"case_{uuid.uuid4().hex}",
        "created_at": 1_716_200_000.123_456_7 + number if created_at is None else created_at,
        "model": "deepseek-r1-distill-qwen-7b",
        "upstream": "openai",
        "guard": "llama-guard-3",
        "mode": "stepwise",
        "stream": True,
        "request": {"messages": [{"role": "user", "content": "How do I pick a lock? 🔒"}],
                    "temperature": 0.6, "extra": {"nested": [1, 2.5, None, True]}},
        "steps": [
            StepRecord(index=0, channel="reasoning", text="The user asks about locks.",
                       unsafe=False, score=0.01, raw="safe", latency_ms=41.5, released=True),
            StepRecord(index=1, channel="reasoning", text="Insert the tension wrench…",
                       unsafe=True, categories=["S2", "S14"], score=0.1 + 0.2, raw="unsafe\nS2",
                       latency_ms=57.25),
            StepRecord(index=2, channel="answer", text="I can't help with that.", round=1,
                       unsafe=None, error="guard timeout", released=True),
        ],
        "withheld": "Insert the tension wrench…\nthen rake the pins",
        "client_reasoning": "The user asks about locks.",
        "client_content": "I can't help with that. Here is how locks work in general: …",
        "action": action,
        "finish_reason": "stop",
        "flagged": [Flag(step=1, categories=["S2", "S14"], score=0.3)],
        "corrections": [Correction(round=1, strategy="intervene", withheld="then rake the pins",
                                   inserted="Wait, this could enable break-ins.",
                                   continuation=" I can't help with that.",
                                   extra={"trigger": "safety", "tokens": [3, 5]})],
        "usage": {"prompt_tokens": 21, "completion_tokens": 318,
                  "completion_tokens_details": {"reasoning_tokens": 250}},
        "timings": Timings(total_ms=2140.5, upstream_first_token_ms=180.25,
                           guard_total_ms=98.75, guard_max_ms=57.25),
        "error": error,
    })


# -- the contract, for both stores -----------------------------------------------------------

async def test_build_store_picks_the_backend(store: CaseStore, store_url: str) -> None:
    expected = SQLiteCaseStore if store_url.startswith("sqlite") else PostgresCaseStore
    assert isinstance(store, expected)
    assert store.name == ("sqlite" if store_url.startswith("sqlite") else "postgresql")


async def test_round_trip_preserves_every_field(store: CaseStore) -> None:
    case = full_case()
    await store.put(case)
    loaded = await store.get(case.id)
    assert loaded is not None
    assert loaded.model_dump() == case.model_dump()
    assert loaded.steps[1].score == 0.1 + 0.2  # a float survives bit for bit
    assert loaded.checks == case.checks == 3


async def test_a_minimal_case_round_trips(store: CaseStore) -> None:
    case = Case()
    await store.put(case)
    assert await store.get(case.id) == case


async def test_put_replaces_a_case_with_the_same_id(store: CaseStore) -> None:
    case = full_case(action="intervened")
    await store.put(case)
    updated = case.model_copy(update={
        "action": "refused", "created_at": case.created_at + 5, "error": None,
        "flagged": [*case.flagged, Flag(step=2)], "client_content": "Refused.",
    })
    await store.put(updated)
    assert await store.get(case.id) == updated
    [summary] = await store.list()
    assert (summary.id, summary.action, summary.flagged, summary.error) == (
        case.id, "refused", 2, None)
    assert summary.created_at == case.created_at + 5


async def test_get_of_an_unknown_id_is_none(store: CaseStore) -> None:
    await store.put(full_case())
    assert await store.get("case_does_not_exist") is None


async def test_list_is_newest_first_with_paging_and_action_filter(store: CaseStore) -> None:
    actions = ["pass", "refused", "pass", "intervened", "pass", "error", "refused"]
    cases = [full_case(number, action=action, error=None if action != "error" else "boom")
             for number, action in enumerate(actions)]
    for case in random.Random(7).sample(cases, len(cases)):  # insertion order must not matter
        await store.put(case)
    newest_first = [case.id for case in reversed(cases)]

    summaries = await store.list()
    assert [summary.id for summary in summaries] == newest_first
    first = summaries[0]
    assert (first.model, first.action, first.flagged, first.created_at) == (
        cases[-1].model, "refused", 1, cases[-1].created_at)
    assert [summary.error for summary in summaries if summary.action == "error"] == ["boom"]

    assert [s.id for s in await store.list(limit=3)] == newest_first[:3]
    assert [s.id for s in await store.list(limit=3, offset=2)] == newest_first[2:5]
    assert [s.id for s in await store.list(limit=10, offset=6)] == newest_first[6:]
    assert await store.list(limit=0) == []
    assert await store.list(offset=7) == []
    assert [s.id for s in await store.list(action="pass")] == [
        cases[4].id, cases[2].id, cases[0].id]
    assert [s.id for s in await store.list(action="refused", limit=1, offset=1)] == [cases[1].id]
    assert await store.list(action="blocked") == []
    with pytest.raises(ValueError, match="limit"):
        await store.list(limit=-1)


async def test_concurrent_puts_all_land(store: CaseStore) -> None:
    cases = [full_case(number) for number in range(40)]
    await asyncio.gather(*(store.put(case) for case in cases))
    assert len(await store.list(limit=100)) == 40
    loaded = await asyncio.gather(*(store.get(case.id) for case in cases))
    assert loaded == cases


async def test_cases_survive_closing_and_reopening(store_url: str) -> None:
    case = full_case()
    first = build_store(StoreConfig(url=store_url))
    await first.open()
    await first.put(case)
    await first.aclose()
    second = build_store(StoreConfig(url=store_url))
    await second.open()
    await second.open()  # a second open is harmless
    try:
        assert await second.get(case.id) == case
    finally:
        await second.aclose()
        await second.aclose()


async def test_use_before_open_is_a_store_error(store_url: str) -> None:
    unopened = build_store(StoreConfig(url=store_url))
    with pytest.raises(StoreError, match="before open"):
        await unopened.put(full_case())
    with pytest.raises(StoreError, match="before open"):
        await unopened.list()


# -- SQLite specifics ------------------------------------------------------------------------

async def test_sqlite_file_is_in_wal_mode_and_its_folder_is_created(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "cases.db"
    store = SQLiteCaseStore(f"sqlite:///{path}")
    await store.open()
    try:
        await store.put(full_case())
        with closing(sqlite3.connect(path)) as reader:
            assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert reader.execute("SELECT count(*) FROM cases").fetchone() == (1,)
        assert path.with_name("cases.db-wal").exists()
    finally:
        await store.aclose()


async def test_sqlite_relative_and_memory_urls(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = SQLiteCaseStore("sqlite:///data/cases.db")
    assert relative.path == "data/cases.db"
    await relative.open()
    await relative.aclose()
    assert (tmp_path / "data" / "cases.db").exists()

    memory = SQLiteCaseStore("sqlite:///:memory:")
    await memory.open()
    try:
        case = full_case()
        await memory.put(case)
        assert await memory.get(case.id) == case
    finally:
        await memory.aclose()


@pytest.mark.parametrize("url", ["sqlite://cases.db", "sqlite:///", "file:///x.db", "cases.db"])
def test_sqlite_rejects_a_malformed_url(url: str) -> None:
    with pytest.raises(ConfigError, match=r"store\.url"):
        SQLiteCaseStore(url)


async def test_sqlite_open_on_an_unusable_path_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    store = SQLiteCaseStore(f"sqlite:///{blocker}/cases.db")
    with pytest.raises(StoreError, match="cannot open"):
        await store.open()


# -- PostgreSQL specifics --------------------------------------------------------------------

async def test_postgres_on_a_dead_port_is_a_store_error_naming_the_host() -> None:
    port = _closed_port()
    store = PostgresCaseStore(f"postgres://guardrail:s3cret-pw@127.0.0.1:{port}/cases",
                              timeout=0.5)
    with pytest.raises(StoreError) as raised:
        await store.open()
    message = str(raised.value)
    assert f"127.0.0.1:{port}/cases" in message
    assert "s3cret-pw" not in message and "s3cret-pw" not in repr(store)
    with pytest.raises(StoreError, match="before open"):
        await store.put(full_case())
    await store.aclose()


@pytest.fixture
def pg_database_url(postgres_url: str) -> Iterator[str]:
    """A database of its own, for tests that cut or drop its sessions."""
    database = f"db_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
    yield postgres_url.rsplit("/", 1)[0] + f"/{database}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def _terminate_sessions(admin_url: str, database_url: str) -> int:
    database = database_url.rsplit("/", 1)[1]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (database,),
        ).fetchall()
    return len(rows)


async def test_postgres_recovers_when_the_server_drops_its_sessions(
    postgres_url: str, pg_database_url: str
) -> None:
    store = PostgresCaseStore(pg_database_url, timeout=5.0)
    await store.open()
    try:
        await store.put(full_case(1))
        assert _terminate_sessions(postgres_url, pg_database_url) >= 1  # as on a restart
        after = full_case(2)
        await store.put(after)  # a dead pooled session is replaced, not handed out
        assert await store.get(after.id) == after
    finally:
        await store.aclose()


def test_postgres_rejects_a_malformed_url() -> None:
    with pytest.raises(ConfigError, match=r"store\.url") as raised:
        PostgresCaseStore("postgresql://u:topsecret@host:notaport/db?bogus_option=1")
    assert "topsecret" not in str(raised.value)
    with pytest.raises(ConfigError):
        PostgresCaseStore("mysql://host/db")


async def test_postgres_keeps_records_as_queryable_jsonb(pg_schema_url: str) -> None:
    store = PostgresCaseStore(pg_schema_url)
    await store.open()
    case = full_case()
    try:
        await store.put(case)
    finally:
        await store.aclose()
    with psycopg.connect(pg_schema_url) as connection:
        row = connection.execute(
            "SELECT pg_typeof(record)::text, record->'corrections'->0->>'inserted', "
            "jsonb_array_length(record->'steps') FROM cases WHERE id = %s", (case.id,),
        ).fetchone()
    assert row == ("jsonb", "Wait, this could enable break-ins.", 3)


# -- the recorder ----------------------------------------------------------------------------

async def test_recorder_stores_and_returns_true(store: CaseStore, tmp_path: Path) -> None:
    failures: list[Exception] = []
    fallback = tmp_path / "fallback" / "unstored.jsonl"
    recorder = CaseRecorder(store, fallback, on_failure=failures.append)
    case = full_case()
    assert await recorder.record(case) is True
    assert await store.get(case.id) == case
    assert not fallback.exists() and failures == []


async def test_recorder_keeps_cases_a_locked_sqlite_refuses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cases.db"
    store = SQLiteCaseStore(f"sqlite:///{path}", busy_timeout_ms=100)
    await store.open()
    failures: list[Exception] = []
    fallback = tmp_path / "spill" / "unstored.jsonl"
    recorder = CaseRecorder(store, fallback, on_failure=failures.append)
    # Another writer holds the write lock longer than the store will wait.
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        refused = [full_case(1), full_case(2)]
        with caplog.at_level(logging.WARNING, logger="guardrail.cases.recorder"):
            results = [await recorder.record(case) for case in refused]
        blocker.execute("ROLLBACK")

        assert results == [False, False]
        assert [type(failure) for failure in failures] == [StoreError, StoreError]
        assert "locked" in str(failures[0])
        assert any(refused[0].id in record.getMessage() for record in caplog.records)
        assert read_fallback(fallback) == refused
        assert fallback.stat().st_mode & 0o777 == 0o600  # user prompts: not world-readable

        # The lock gone, the store takes cases again and the fallback is left alone.
        later = full_case(3)
        assert await recorder.record(later) is True
        assert await store.get(later.id) == later
        assert await store.get(refused[0].id) is None
        assert len(fallback.read_text().splitlines()) == 2
    finally:
        blocker.close()
        await store.aclose()


async def test_recorder_keeps_cases_when_postgres_went_away(
    postgres_url: str, pg_database_url: str, tmp_path: Path
) -> None:
    store = PostgresCaseStore(pg_database_url, timeout=0.5)
    await store.open()
    failures: list[Exception] = []
    recorder = CaseRecorder(store, tmp_path / "unstored.jsonl", on_failure=failures.append)
    try:
        stored = full_case(1)
        assert await recorder.record(stored) is True
        database = pg_database_url.rsplit("/", 1)[1]
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {database} WITH (FORCE)")  # cuts the pool's sessions
        lost = full_case(2)
        assert await recorder.record(lost) is False
    finally:
        await store.aclose()
    assert len(failures) == 1 and isinstance(failures[0], StoreError)
    assert "127.0.0.1" in str(failures[0])
    assert read_fallback(tmp_path / "unstored.jsonl") == [lost]


async def test_recorder_keeps_a_case_postgres_cannot_represent(
    pg_schema_url: str, tmp_path: Path
) -> None:
    # PostgreSQL text and JSONB cannot hold U+0000; a model (or a prompt) can still produce it.
    store = PostgresCaseStore(pg_schema_url)
    await store.open()
    failures: list[Exception] = []
    recorder = CaseRecorder(store, tmp_path / "unstored.jsonl", on_failure=failures.append)
    try:
        case = full_case().model_copy(update={"client_content": "before\x00after"})
        assert await recorder.record(case) is False
        assert await store.get(case.id) is None
    finally:
        await store.aclose()
    assert isinstance(failures[0], StoreError) and "put failed" in str(failures[0])
    assert read_fallback(tmp_path / "unstored.jsonl") == [case]


async def test_recorder_lines_stay_whole_under_concurrent_failures(tmp_path: Path) -> None:
    dead = PostgresCaseStore(f"postgresql://guardrail@127.0.0.1:{_closed_port()}/cases",
                             timeout=0.5)
    with pytest.raises(StoreError):
        await dead.open()
    fallback = tmp_path / "unstored.jsonl"
    recorder = CaseRecorder(dead, fallback)
    cases = [full_case(number) for number in range(30)]
    results = await asyncio.gather(*(recorder.record(case) for case in cases))
    assert results == [False] * 30
    lines = fallback.read_text().splitlines()
    assert len(lines) == 30
    assert {json.loads(line)["id"] for line in lines} == {case.id for case in cases}
    assert sorted(read_fallback(fallback), key=lambda case: case.created_at) == cases


async def test_recorder_survives_a_failing_fallback_and_callback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unopened = SQLiteCaseStore(f"sqlite:///{tmp_path}/cases.db")  # put fails: never opened
    blocker = tmp_path / "file"
    blocker.write_text("a file where the fallback folder should be")

    def broken_callback(exc: Exception) -> None:
        raise RuntimeError("metrics backend down")

    recorder = CaseRecorder(unopened, blocker / "unstored.jsonl", on_failure=broken_callback)
    case = full_case()
    with caplog.at_level(logging.WARNING, logger="guardrail.cases.recorder"):
        assert await recorder.record(case) is False
    # Nowhere else to put it: the whole record goes to the error log.
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert any(case.withheld.split("\n")[0] in record.getMessage() for record in errors)
    assert any("on_failure" in record.getMessage() for record in errors)


async def test_recorder_keeps_a_copy_when_cancelled_mid_write(tmp_path: Path) -> None:
    path = tmp_path / "cases.db"
    store = SQLiteCaseStore(f"sqlite:///{path}", busy_timeout_ms=2000)
    await store.open()
    fallback = tmp_path / "unstored.jsonl"
    recorder = CaseRecorder(store, fallback)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the put waits on this lock
        case = full_case()
        task = asyncio.create_task(recorder.record(case))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert read_fallback(fallback) == [case]
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
        await store.aclose()


def test_read_fallback_skips_a_torn_line(tmp_path: Path) -> None:
    fallback = tmp_path / "unstored.jsonl"
    whole = full_case()
    fallback.write_text(whole.model_dump_json() + "\n" + whole.model_dump_json()[:40])
    assert read_fallback(fallback) == [whole]
    assert read_fallback(tmp_path / "absent.jsonl") == []
