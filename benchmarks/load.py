"""Load: many concurrent streams through our proxy for a minute, with the shipped defaults.

The fake model (its own process) paces its chunks like a model does, slowly enough by default
that the 200 streams ask no more of the embedded guard than 2 CPU cores can judge; the proxy
runs as users run it (``guardrail serve``, the embedded guard, the SQLite store); this process
keeps ``--streams`` streams in flight for ``--duration`` seconds, starting a new one as each
ends.
Every stream must arrive whole and exactly as the model wrote it; the proxy's memory is sampled
every second; at the end every stream must have its case in the store.

Printed: streams finished, errors (with the first few), time to first token and total time,
the proxy's memory at start, its peak, and the peaks of the middle and last thirds of the run
(memory is bounded if the last third's peak is within 10 % of the middle third's; the first third
is the ramp-up), its memory every 10 s, and the cases stored against the streams sent.

    .venv/bin/python -m benchmarks.load [--streams 200] [--duration 60] [--guard embedded]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.fake_upstream import texts
from benchmarks.launch import start_guardrail, start_upstream
from benchmarks.processes import ServerProcess
from benchmarks.stream_client import StreamResult, percentile, run_for, run_requests

EXPECTED = texts  # every stream is checked against the text the model sent it
BOUNDED_GROWTH = 1.10


class MemorySampler:
    """The proxy's RSS once a second, in a thread (the client's loop is busy)."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - started, self.server.memory_mib()))
            self._stop.wait(1.0)

    def thirds(self) -> tuple[float, float]:
        """The peak RSS of the middle and of the last third of the run. The first third is
        the ramp-up (the guard's batches and the streams' buffers reaching full size)."""
        if not self.samples:
            return float("nan"), float("nan")
        end = self.samples[-1][0]
        middle = [rss for at, rss in self.samples if end / 3 < at <= 2 * end / 3]
        last = [rss for at, rss in self.samples if at > 2 * end / 3]
        return max(middle or [float("nan")]), max(last or middle or [float("nan")])

    def series(self, every_s: float = 10.0) -> str:
        shown, next_at = [], 0.0
        for at, rss in self.samples:
            if at >= next_at:
                shown.append(f"{at:.0f} s: {rss:.0f}")
                next_at += every_s
        return ", ".join(shown)


def stored_cases(database: Path) -> int:
    with sqlite3.connect(database) as connection:
        count: int = connection.execute("SELECT count(*) FROM cases").fetchone()[0]
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200, help="streams kept in flight")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--guard", default="embedded", help="guard.kind (default: embedded)")
    parser.add_argument("--chunks", type=int, default=100)
    # 200 streams at 5 tokens/s each ask the guard for about 10 streams' worth of checks a
    # second: within what the embedded guard judges on 2 CPU cores (about 15). At 20 ms a chunk
    # they ask for 100, the guard falls behind, and checks that wait past guard.timeout_s end
    # their streams (on_error: block).
    parser.add_argument("--chunk-delay-ms", type=float, default=200.0,
                        help="the model's pace: 200 ms a chunk is 5 tokens/s per stream")
    args = parser.parse_args(argv)

    print(f"## load.py: {args.streams} concurrent streams for {args.duration:.0f} s\n")
    print(f"`python -m benchmarks.load --streams {args.streams} --duration {args.duration:.0f} "
          f"--guard {args.guard} --chunk-delay-ms {args.chunk_delay_ms:g}`: our proxy "
          f"(`guard.kind: {args.guard}`, the other settings at their defaults, SQLite store) in "
          f"front of a fake model that streams {args.chunks} chunks, one every "
          f"{args.chunk_delay_ms:g} ms; every stream's text checked against the model's.\n")
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        workdir = Path(tmp)
        upstream, direct = start_upstream(workdir, args.chunks, args.chunk_delay_ms)
        proxy: ServerProcess | None = None
        try:
            upstream.wait_ready()
            proxy, target = start_guardrail("guardrail", workdir, direct, {"kind": args.guard})
            proxy.wait_ready()
            warm = asyncio.run(run_requests(target, 8, 16, EXPECTED))
            start_mib = proxy.memory_mib()
            with MemorySampler(proxy) as sampler:
                started = time.perf_counter()
                results = asyncio.run(run_for(target, args.streams, args.duration, EXPECTED))
                elapsed = time.perf_counter() - started
            peak_mib = proxy.memory_mib("VmHWM")
        finally:
            if proxy is not None:
                proxy.stop()
            upstream.stop()
        database = workdir / "guardrail.db"
        unstored = workdir / "guardrail-unstored.jsonl"
        fallback = len(unstored.read_text().splitlines()) if unstored.exists() else 0
        cases = stored_cases(database) + fallback
    return report(args, results, warm, elapsed, start_mib, peak_mib, sampler, cases)


def report(args: argparse.Namespace, results: list[StreamResult], warm: list[StreamResult],
           elapsed: float, start_mib: float, peak_mib: float, sampler: MemorySampler,
           cases: int) -> int:
    middle, last = sampler.thirds()
    errors = [result for result in results if result.error]
    corrected = [result for result in results if result.corrected]
    ok = [result for result in results if result.error is None and result.corrected is None]
    ttft = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    total = [r.total_s * 1000 for r in ok]
    sent = len(results) + len(warm)
    bounded = last <= middle * BOUNDED_GROWTH
    print("| streams finished | errors | guard corrections | streams/s | TTFT p50 / p99 ms "
          "| total p50 / p99 ms "
          "| RSS at start MiB | peak RSS MiB | peak, middle / last third MiB | cases stored "
          "/ streams sent |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {len(results)} | {len(errors)} | {len(corrected)} | {len(results) / elapsed:.1f} "
          f"| {percentile(ttft, 0.5):.0f} / {percentile(ttft, 0.99):.0f} "
          f"| {percentile(total, 0.5):.0f} / {percentile(total, 0.99):.0f} "
          f"| {start_mib:.0f} | {peak_mib:.0f} | {middle:.0f} / {last:.0f} "
          f"| {cases} / {sent} |")
    for result in errors[:5]:
        print(f"\nerror: {result.error}")
    print(f"\nProxy RSS (MiB) every 10 s: {sampler.series()}.")
    print(f"\nErrors: {len(errors)}. Guard corrections (the embedded guard judging a benign "
          f"step unsafe; not counted as errors, left out of the times): {len(corrected)}. "
          f"Memory {'bounded' if bounded else 'GREW'}: the last third's peak is "
          f"{last / middle * 100 - 100:+.1f} % on the middle third's. "
          f"Cases: {'every stream stored' if cases == sent else 'MISSING some'}.")
    return 0 if not errors and bounded and cases == sent else 1


if __name__ == "__main__":
    sys.exit(main())
