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
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.fake_upstream import texts
from benchmarks.launch import start_fake_guard, start_guardrail, start_upstream
from benchmarks.processes import ServerProcess
from benchmarks.stream_client import StreamResult, Target, percentile, run_for, run_requests

EXPECTED = texts  # every stream is checked against the text the model sent it
BOUNDED_GROWTH = 1.10


class MemorySampler:
    """The proxy's RSS once a second, in a thread (the client's loop is busy)."""

    def __init__(self, server: ServerProcess, target: Target | None = None) -> None:
        self.server = server
        self.samples: list[tuple[float, float]] = []
        self.target = target
        self.guard_states: list[str] = []
        """The guard's backlog (from ``/metrics``) every 5 s."""
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
            at = time.monotonic() - started
            self.samples.append((at, self.server.memory_mib()))
            if self.target is not None and len(self.samples) % 5 == 1:
                self.guard_states.append(f"{at:.0f} s: {guard_state(self.target)}")
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
    parser.add_argument("--guard-delay-ms", type=float, default=50.0,
                        help="for llama-guard: the fake endpoint's time per answer")
    parser.add_argument("--guard-options", type=json.loads, default={},
                        help='guard.options as JSON, e.g. \'{"completions_batch": 16}\'')
    parser.add_argument("--no-backpressure", action="store_true",
                        help="server.backpressure.enabled: false (admit every request)")
    parser.add_argument("--max-guard-wait-s", type=float, default=None,
                        help="server.backpressure.max_guard_wait_s (default: its own)")
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
          f"--guard {args.guard} --chunk-delay-ms {args.chunk_delay_ms:g}"
          + (f" --guard-options '{json.dumps(args.guard_options)}'" if args.guard_options else "")
          + (f" --guard-delay-ms {args.guard_delay_ms:g}" if args.guard == "llama-guard" else "")
          + (" --no-backpressure" if args.no_backpressure else "")
          + (f" --max-guard-wait-s {args.max_guard_wait_s:g}" if args.max_guard_wait_s else "")
          + f"`: our proxy (`guard.kind: {args.guard}`"
          + (f", `guard.options: {json.dumps(args.guard_options)}`" if args.guard_options else "")
          + (f", a fake Llama Guard endpoint (vLLM's wire format, its own process) answering in "
             f"{args.guard_delay_ms:g} ms" if args.guard == "llama-guard" else "")
          + (", `server.backpressure.enabled: false`" if args.no_backpressure else "")
          + (f", `server.backpressure.max_guard_wait_s: {args.max_guard_wait_s:g}`"
             if args.max_guard_wait_s else "")
          + f", the other settings at their defaults, SQLite store) in "
          f"front of a fake model that streams {args.chunks} chunks, one every "
          f"{args.chunk_delay_ms:g} ms; every stream's text checked against the model's.\n")
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        workdir = Path(tmp)
        upstream, direct = start_upstream(workdir, args.chunks, args.chunk_delay_ms)
        proxy: ServerProcess | None = None
        guard_server: ServerProcess | None = None
        guard: dict[str, object] = {"kind": args.guard}
        if args.guard_options:
            guard["options"] = args.guard_options
        try:
            if args.guard == "llama-guard":
                guard_server, guard["url"] = start_fake_guard(workdir, args.guard_delay_ms)
                guard_server.wait_ready()
            upstream.wait_ready()
            server: dict[str, object] | None = None
            if args.no_backpressure:
                server = {"backpressure": {"enabled": False}}
            elif args.max_guard_wait_s is not None:
                server = {"backpressure": {"max_guard_wait_s": args.max_guard_wait_s}}
            proxy, target = start_guardrail("guardrail", workdir, direct, guard, server=server)
            proxy.wait_ready()
            refused: list[float] = []
            warm = asyncio.run(run_requests(target, 8, 16, EXPECTED, refused))
            start_mib = proxy.memory_mib()
            servers = [server for server in (proxy, guard_server, upstream) if server is not None]
            cpu_before = [server.cpu_seconds() for server in servers]
            with MemorySampler(proxy, target) as sampler:
                started = time.perf_counter()
                results = asyncio.run(run_for(target, args.streams, args.duration, EXPECTED,
                                              refused))
                elapsed = time.perf_counter() - started
            cpu = {server.name: (server.cpu_seconds() - before) / elapsed
                   for server, before in zip(servers, cpu_before, strict=True)}
            peak_mib = proxy.memory_mib("VmHWM")
            guard_errors = scrape_guard_errors(target)
        finally:
            if proxy is not None:
                proxy.stop()
            if guard_server is not None:
                guard_server.stop()
            upstream.stop()
        database = workdir / "guardrail.db"
        unstored = workdir / "guardrail-unstored.jsonl"
        fallback = len(unstored.read_text().splitlines()) if unstored.exists() else 0
        cases = stored_cases(database) + fallback
    print("CPU use during the run (cores busy, of the machine's "
          f"{os.cpu_count()}): " + ", ".join(f"{name} {share:.2f}" for name, share in cpu.items())
          + ".\n")
    return report(args, results, warm, elapsed, start_mib, peak_mib, sampler, cases,
                  guard_errors, refused)


def _spread(values: list[float]) -> str:
    if not values:
        return "none"
    return f"{min(values):g}-{max(values):g} s"


def guard_state(target: Target) -> str:
    """The backpressure gauges: checks in the guard, a new check's expected wait, admitted
    requests not yet checking, the guard's measured rate."""
    base = target.base_url.removesuffix("/v1")
    try:
        text = httpx.get(f"{base}/metrics", timeout=10).text
    except httpx.HTTPError as error:
        return f"({type(error).__name__})"
    values = {family.name: family.samples[0].value
              for family in text_string_to_metric_families(text) if family.samples}
    return (f"{values.get('guardrail_guard_backlog', 0):.0f} checks, wait "
            f"{values.get('guardrail_guard_expected_wait_seconds', 0):.2f} s, "
            f"{values.get('guardrail_admissions_pending', 0):.0f} pending, rate "
            f"{values.get('guardrail_guard_rate', 0):.0f}/s")


def scrape_guard_errors(target: Target) -> dict[str, float]:
    """``guardrail_guard_errors_total`` from the proxy's ``/metrics``, by kind (``timeout``,
    ``error``): what the streams' ``action`` alone cannot tell apart."""
    base = target.base_url.removesuffix("/v1")
    text = httpx.get(f"{base}/metrics", timeout=30).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "guardrail_guard_errors":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    kind = sample.labels["kind"]
                    found[kind] = found.get(kind, 0.0) + sample.value
    return found


def report(args: argparse.Namespace, results: list[StreamResult], warm: list[StreamResult],
           elapsed: float, start_mib: float, peak_mib: float, sampler: MemorySampler,
           cases: int, guard_errors: dict[str, float], refused: list[float]) -> int:
    middle, last = sampler.thirds()
    errors = [result for result in results if result.error]
    corrected = [result for result in results if result.corrected]
    ok = [result for result in results if result.error is None and result.corrected is None]
    ttft = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    total = [r.total_s * 1000 for r in ok]
    sent = len(results) + len(warm)
    bounded = last <= middle * BOUNDED_GROWTH
    print("| streams finished | errors | refused up front (503) | guard corrections | streams/s "
          "| TTFT p50 / p99 ms "
          "| total p50 / p99 ms "
          "| RSS at start MiB | peak RSS MiB | peak, middle / last third MiB | cases stored "
          "/ streams sent |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {len(results)} | {len(errors)} | {len(refused)} | {len(corrected)} "
          f"| {len(results) / elapsed:.1f} "
          f"| {percentile(ttft, 0.5):.0f} / {percentile(ttft, 0.99):.0f} "
          f"| {percentile(total, 0.5):.0f} / {percentile(total, 0.99):.0f} "
          f"| {start_mib:.0f} | {peak_mib:.0f} | {middle:.0f} / {last:.0f} "
          f"| {cases} / {sent} |")
    for result in errors[:5]:
        print(f"\nerror: {result.error}")
    print(f"\nProxy RSS (MiB) every 10 s: {sampler.series()}.")
    if sampler.guard_states:
        print(f"\nThe guard every 5 s: {'; '.join(sampler.guard_states)}.")
    print(f"\nErrors: {len(errors)}. Guard corrections (the embedded guard judging a benign "
          f"step unsafe; not counted as errors, left out of the times): {len(corrected)}. "
          f"Memory {'bounded' if bounded else 'GREW'}: the last third's peak is "
          f"{last / middle * 100 - 100:+.1f} % on the middle third's. "
          f"Cases: {'every stream stored' if cases == sent else 'MISSING some'}. "
          f"Guard timeouts: {guard_errors.get('timeout', 0):.0f}, other guard errors: "
          f"{guard_errors.get('error', 0):.0f} (the proxy's guardrail_guard_errors_total). "
          f"Refused up front (503, backpressure): {len(refused)}, each sent again after its "
          f"Retry-After ({_spread(refused)}); not in the streams sent.")
    return 0 if not errors and bounded and cases == sent else 1


if __name__ == "__main__":
    sys.exit(main())
