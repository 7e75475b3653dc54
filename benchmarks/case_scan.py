"""How fast the case stores stream cases to the offline harvest, and whether memory stays flat.

    python -m benchmarks.case_scan --cases 25000,100000 [--postgres URL] [--batch-size 500]

For each size: a fresh store (a SQLite file; a fresh schema on ``--postgres`` if given) is
filled with that many realistic cases (an intervened case of about 3 KB: steps, a correction,
usage), written in bulk with the store's own upsert, then read back with ``store.scan`` oldest
first. Printed: cases per second of the scan, and the peak Python memory the scan allocated
(tracemalloc, in a second pass), which should not grow with the number of cases.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
import tracemalloc
import uuid
from contextlib import closing
from pathlib import Path

from guardrail.cases import Case, build_store
from guardrail.cases.base import CaseQuery
from guardrail.config import StoreConfig


def sample_case(number: int) -> Case:
    return Case.model_validate({
        "id": f"case_{number:08d}_{uuid.uuid4().hex[:8]}", "created_at": 1.7e9 + number * 0.5,
        "model": "deepseek-r1-distill-qwen-7b", "upstream": "openai", "guard": "llama-guard",
        "mode": "stepwise", "stream": True,
        "action": "intervened" if number % 5 == 0 else "pass",
        "request": {"messages": [{"role": "user",
                                  "content": f"Question {number}: how do locks work? " * 8}]},
        "steps": [{"index": index, "channel": "reasoning", "unsafe": index == 3,
                   "text": f"Step {index} of the reasoning about the question, in a sentence "
                           f"or two of ordinary length for a reasoning model. " * 2,
                   "score": 0.01 * index, "raw": "safe", "latency_ms": 12.5, "released": True}
                  for index in range(8)],
        "withheld": "The part that was cut. " * 6,
        "client_reasoning": "What the client saw of the reasoning. " * 10,
        "client_content": "The final answer the client received. " * 6,
        "finish_reason": "stop",
        "flagged": [{"step": 3, "categories": ["S2"], "score": 0.93}],
        "corrections": [{"round": 1, "strategy": "intervene", "cause": "step 3 unsafe (S2)",
                         "inserted": "Wait, I should not help with that.",
                         "continuation": "Let me answer safely instead. " * 5,
                         "outcome": "completed"}],
        "usage": {"prompt_tokens": 80, "completion_tokens": 600},
        "timings": {"total_ms": 2100.0, "guard_total_ms": 100.0, "guard_max_ms": 20.0},
    })


def fill(url: str, count: int) -> None:
    """Bulk insert through the store's own upsert (one transaction), so the rows are exactly
    what ``put`` writes."""
    from guardrail.cases import postgres_store, sqlite_store

    if url.startswith("sqlite"):
        rows = (sqlite_store._row(sample_case(n)) for n in range(count))
        with closing(sqlite3.connect(sqlite_store.sqlite_path(url))) as database:
            database.executemany(sqlite_store._UPSERT, rows)
            database.commit()
        return
    import psycopg

    with psycopg.connect(url) as connection, connection.cursor() as cursor:
        batch: list[tuple[object, ...]] = []
        for n in range(count):
            batch.append(postgres_store._row(sample_case(n)))
            if len(batch) == 2000:
                cursor.executemany(postgres_store._UPSERT, batch)
                batch.clear()
        if batch:
            cursor.executemany(postgres_store._UPSERT, batch)


async def scan(url: str, batch_size: int, *, trace: bool) -> tuple[int, float, int]:
    """Cases read, seconds, and (with ``trace``) the peak memory the scan allocated. Timed
    and traced in separate passes: tracemalloc slows allocation-heavy code several times."""
    store = build_store(StoreConfig(url=url))
    await store.open()
    try:
        if trace:
            tracemalloc.start()
        started = time.perf_counter()
        count = 0
        async for _ in store.scan(CaseQuery(), batch_size=batch_size):
            count += 1
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
        tracemalloc.stop()
    finally:
        await store.aclose()
    return count, elapsed, peak


def postgres_schema(url: str) -> str:
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


async def prepare(url: str) -> None:
    store = build_store(StoreConfig(url=url))
    await store.open()
    await store.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="25000,100000")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--postgres", metavar="URL", help="also measure this PostgreSQL")
    args = parser.parse_args()
    sizes = [int(size) for size in args.cases.split(",")]
    print("| store | cases | fill s | scan s | cases/s | scan peak memory MiB |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            targets = [("sqlite", f"sqlite:///{Path(folder) / f'cases-{size}.db'}")]
            if args.postgres:
                targets.append(("postgresql", postgres_schema(args.postgres)))
            for name, url in targets:
                asyncio.run(prepare(url))
                started = time.perf_counter()
                fill(url, size)
                filled = time.perf_counter() - started
                count, elapsed, _ = asyncio.run(scan(url, args.batch_size, trace=False))
                assert count == size, (count, size)
                _, _, peak = asyncio.run(scan(url, args.batch_size, trace=True))
                print(f"| {name} | {size:,} | {filled:.1f} | {elapsed:.1f} | "
                      f"{count / elapsed:,.0f} | {peak / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
