"""Throughput with 1 and 2 workers (``guardrail serve --workers N``), and each worker's memory.

The fake model (its own process) streams N chunks as fast as it can; the proxy runs as users run
it (``guardrail serve``, SQLite store) with 1 and with 2 workers, the targets taking turns
(1 2 2 1, half the streams each time) so that a drift in the machine's speed falls on both. For
each guard kind asked (``none``: the relay alone; ``embedded``: the CPU guard in every worker)
the same streams at the same concurrency go through each, every stream's text checked against
the model's.

Printed: streams/s, time to first token and total time (p50 / p99), the proxy's CPU per stream
(all its processes), and each process's memory after the run: RSS, PSS (shared pages split among
the processes that map them) and USS (pages only it holds), which say what a worker costs and
whether anything is shared. The load average before and after, since the machine may be shared.

    .venv/bin/python -m benchmarks.workers [--guards none,embedded] [--streams 400]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.fake_upstream import texts
from benchmarks.launch import start_guardrail, start_upstream
from benchmarks.processes import ServerProcess
from benchmarks.stream_client import StreamResult, Target, percentile, run_requests

EXPECTED = texts


@dataclass
class Row:
    guard: str
    workers: int
    server: ServerProcess
    target: Target
    results: list[StreamResult] = field(default_factory=list)
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    memory: list[tuple[str, float, float, float]] = field(default_factory=list)
    """``(role, RSS, PSS, USS)`` of each process, MiB."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guards", default="none,embedded")
    parser.add_argument("--streams", type=int, default=400, help="streams per target (guard "
                        "none); a quarter of them with the embedded guard")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--chunks", type=int, default=100)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    print("## workers.py: throughput with 1 and 2 workers\n")
    print(f"`python -m benchmarks.workers --guards {args.guards} --streams {args.streams} "
          f"--concurrency {args.concurrency}`: `guardrail serve` with `server.workers` 1 and 2 "
          f"in front of a fake model streaming {args.chunks} chunks as fast as it can, "
          f"{args.concurrency} streams in flight, the targets taking turns (1 2 2 1); every "
          "stream's text checked.\n")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        workdir = Path(tmp)
        upstream, direct = start_upstream(workdir, args.chunks, 0.0)
        try:
            upstream.wait_ready()
            for guard in args.guards.split(","):
                streams = args.streams if guard == "none" else max(args.concurrency,
                                                                    args.streams // 4)
                rows += measure(workdir, direct, guard, streams, args.concurrency)
        finally:
            upstream.stop()
    report(rows, load_before, os.getloadavg())
    # A relayed stream that fails is a fault; guard timeouts under this load are a finding
    # (the CPU guard saturates), reported above.
    return 0 if all(not any(r.error for r in row.results)
                    for row in rows if row.guard == "none") else 1


def measure(workdir: Path, direct: Target, guard: str, streams: int, concurrency: int
            ) -> list[Row]:
    rows = []
    try:
        for workers in (1, 2):
            server, target = start_guardrail(f"guardrail-{guard}-{workers}w", workdir, direct,
                                             {"kind": guard}, workers=workers)
            rows.append(Row(guard, workers, server, target))
        for row in rows:
            row.server.wait_ready(300)
            asyncio.run(run_requests(row.target, concurrency, concurrency, EXPECTED))  # warm
        half = streams // 2
        for row in (rows[0], rows[1], rows[1], rows[0]):
            cpu = row.server.cpu_seconds()
            started = time.perf_counter()
            row.results += asyncio.run(run_requests(row.target, concurrency, half, EXPECTED))
            row.elapsed_s += time.perf_counter() - started
            row.cpu_s += row.server.cpu_seconds() - cpu
        for row in rows:
            row.memory = [(_role(pid, row.workers), rss, pss, uss)
                          for pid, rss, pss, uss in row.server.memory_by_process()]
    finally:
        for row in rows:
            row.server.stop()
    return rows


def report(rows: list[Row], load_before: tuple[float, ...], load_after: tuple[float, ...]
           ) -> None:
    print("| guard | workers | streams | errors | streams/s | TTFT p50 / p99 ms "
          "| total p50 / p99 ms | proxy CPU ms/stream |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        ok = [r for r in row.results if r.error is None and r.corrected is None]
        ttft = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
        total = [r.total_s * 1000 for r in ok]
        errors = sum(1 for r in row.results if r.error)
        print(f"| {row.guard} | {row.workers} | {len(row.results)} | {errors} "
              f"| {len(row.results) / row.elapsed_s:.1f} "
              f"| {percentile(ttft, 0.5):.0f} / {percentile(ttft, 0.99):.0f} "
              f"| {percentile(total, 0.5):.0f} / {percentile(total, 0.99):.0f} "
              f"| {row.cpu_s / max(1, len(row.results)) * 1000:.1f} |")
    print("\nMemory after the run, per process (MiB):\n")
    print("| guard | workers | process | RSS | PSS | USS |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        for role, rss, pss, uss in row.memory:
            print(f"| {row.guard} | {row.workers} | {role} | {rss:.0f} | {pss:.0f} | {uss:.0f} |")
    for row in rows:
        failures = [r.error for r in row.results if r.error]
        for failure in failures[:3]:
            print(f"\nerror ({row.guard}, {row.workers} workers): {failure}")
    print(f"\nLoad average (1 / 5 / 15 min) before: {' / '.join(f'{x:.1f}' for x in load_before)};"
          f" after: {' / '.join(f'{x:.1f}' for x in load_after)}; {os.cpu_count()} cores.")


def _role(pid: int, workers: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "gone"
    if "resource_tracker" in command:
        return "multiprocessing's resource tracker"
    if "spawn_main" in command:
        return "worker"
    return "server (the only process)" if workers == 1 else "supervisor"


if __name__ == "__main__":
    sys.exit(main())
