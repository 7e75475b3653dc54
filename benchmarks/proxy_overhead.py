"""Proxy overhead, side by side with LiteLLM's proxy.

One fast fake model (``benchmarks/fake_upstream.py``) streams a reasoning trace and answer in N
chunks. The same streamed requests go to it directly, through our proxy with ``guard.kind:
none``, through our proxy with the embedded guard (the defaults), and through LiteLLM's proxy
with no guardrail. Every server is its own process; this process is the client. At each
concurrency the targets take turns (A B C D, then D C B A, half the streams each time), so a
drift in the machine's speed falls on all of them.

Printed, per concurrency: time to first token and total time (p50, p99), the latency each
proxy adds to the direct p50, streams per second and their share of the direct rate, and each
proxy process's CPU time per stream. Every stream's text is checked against what the model sent.

    .venv/bin/python -m benchmarks.proxy_overhead [--concurrency 1,32,128] [--chunks 100]

LiteLLM's proxy is looked for at ``--litellm``, ``$LITELLM_PROXY_BIN``, ``.venv-litellm/bin/
litellm`` (what ``make bench`` installs) and on the PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.fake_upstream import ANSWER, REASONING, texts
from benchmarks.launch import litellm_executable, start_guardrail, start_litellm, start_upstream
from benchmarks.processes import ServerProcess
from benchmarks.stream_client import StreamResult, Target, percentile, run_requests

EXPECTED = texts  # every stream is checked against the text the model sent it


@dataclass
class Row:
    target: Target
    server: ServerProcess | None
    results: list[StreamResult] = field(default_factory=list)
    elapsed_s: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0

    @property
    def ok(self) -> list[StreamResult]:
        """Streams relayed untouched: not failed, not corrected by the guard."""
        return [r for r in self.results if r.error is None and r.corrected is None]

    @property
    def errors(self) -> int:
        return sum(1 for result in self.results if result.error is not None)

    @property
    def corrected(self) -> int:
        return sum(1 for result in self.results if result.corrected is not None)

    def ms(self, q: float, ttft: bool) -> float:
        samples = [(r.ttft_s if ttft else r.total_s) or 0.0 for r in self.ok]
        return percentile(samples, q) * 1000

    @property
    def rate(self) -> float:
        return len(self.ok) / self.elapsed_s if self.elapsed_s else 0.0


def measure(row: Row, concurrency: int, requests: int) -> None:
    cpu_before = row.server.cpu_seconds() if row.server else 0.0
    client_before = time.process_time()
    started = time.perf_counter()
    row.results += asyncio.run(run_requests(row.target, concurrency, requests, EXPECTED))
    row.elapsed_s += time.perf_counter() - started
    row.client_cpu_s += time.process_time() - client_before
    if row.server:
        row.server_cpu_s += row.server.cpu_seconds() - cpu_before


def run_level(targets: list[tuple[Target, ServerProcess | None]], concurrency: int,
              requests: int) -> list[Row]:
    rows = [Row(target, server) for target, server in targets]
    for row in rows:  # warm-up: connections, caches, the guard's first batches
        asyncio.run(run_requests(row.target, concurrency, max(concurrency, 4), EXPECTED))
    half = max(1, requests // 2)
    for order in (rows, rows[::-1]):
        for row in order:
            measure(row, concurrency, half)
    return rows


def print_level(concurrency: int, rows: list[Row]) -> None:
    direct = rows[0]
    print(f"\n#### concurrency {concurrency}\n")
    print("| target | TTFT p50 | TTFT p99 | total p50 | total p99 | added p50 (TTFT / total) "
          "| streams/s | % of direct | proxy CPU ms/stream | client CPU % | errors "
          "| guard corrections |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        added = ("—" if row is direct else
                 f"{row.ms(0.5, True) - direct.ms(0.5, True):+.1f} / "
                 f"{row.ms(0.5, False) - direct.ms(0.5, False):+.1f}")
        cpu = (f"{row.server_cpu_s / len(row.results) * 1000:.1f}"
               if row.server and row.results else "—")
        print(f"| {row.target.name} | {row.ms(0.5, True):.1f} | {row.ms(0.99, True):.1f} "
              f"| {row.ms(0.5, False):.1f} | {row.ms(0.99, False):.1f} | {added} "
              f"| {row.rate:.1f} | {row.rate / direct.rate * 100 if direct.rate else 0:.0f} % "
              f"| {cpu} | {row.client_cpu_s / row.elapsed_s * 100:.0f} % "
              f"| {row.errors} | {row.corrected} |")
    errors = [(row.target.name, r.error) for row in rows for r in row.results if r.error]
    for name, error in errors[:5]:
        print(f"\nerror ({name}): {error}")


def print_aims(levels: dict[int, list[Row]], ours: str, peer: str | None) -> bool:
    print("\n#### Aims\n")
    print("Our added p50 at most half of LiteLLM's (both TTFT and total), and our streams/s "
          "at least 90 % of direct, with `guard.kind: none`.\n")
    print("| concurrency | our added p50 (TTFT / total) | LiteLLM added p50 (TTFT / total) "
          "| ≤ half? | our streams/s vs direct | ≥ 90 %? |")
    print("|---|---|---|---|---|---|")
    met = True
    for concurrency, rows in levels.items():
        by_name = {row.target.name: row for row in rows}
        direct, our = rows[0], by_name[ours]
        ours_added = [our.ms(0.5, t) - direct.ms(0.5, t) for t in (True, False)]
        share = our.rate / direct.rate if direct.rate else 0.0
        fast_enough = share >= 0.9
        if peer is not None and peer in by_name:
            theirs = [by_name[peer].ms(0.5, t) - direct.ms(0.5, t) for t in (True, False)]
            half = all(o <= t / 2 for o, t in zip(ours_added, theirs, strict=True))
            peer_text = f"{theirs[0]:+.1f} / {theirs[1]:+.1f}"
        else:
            half, peer_text = False, "not measured"
        met = met and half and fast_enough
        print(f"| {concurrency} | {ours_added[0]:+.1f} / {ours_added[1]:+.1f} | {peer_text} "
              f"| {'yes' if half else 'no'} | {share * 100:.0f} % "
              f"| {'yes' if fast_enough else 'no'} |")
    return met


def run_regime(args: argparse.Namespace, delay_ms: float, litellm: Path | None,
               levels: list[int]) -> tuple[bool, int]:
    """Start the servers against a model with this pace, measure every concurrency, print."""
    paced = delay_ms > 0
    print(f"\n### The model sends a chunk every {delay_ms:g} ms\n" if paced else
          "\n### The model sends its chunks as fast as it can\n")
    print("Per-stream cost: the proxies' CPU per stream, and the latency they add when the "
          "machine is saturated. The model here has no pace of its own, so the direct rate is "
          "what the client and the fake can do; a proxy's share of it measures its CPU per "
          "stream against theirs, not whether it keeps up with a model (the paced run below "
          "asks that)." if not paced else
          f"A model's pace ({1000 / delay_ms:.0f} tokens/s per stream): whether each proxy keeps "
          "up, and what it adds when it does.")
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        upstream, direct = start_upstream(workdir, args.chunks, delay_ms)
        stack.callback(upstream.stop)
        upstream.wait_ready()
        servers: list[tuple[ServerProcess, Target]] = [
            start_guardrail("guardrail, guard none", workdir, direct, {"kind": "none"})]
        if not args.no_embedded:
            servers.append(start_guardrail("guardrail, embedded guard", workdir, direct,
                                           {"kind": "embedded"}))
        if litellm is not None:
            servers.append(start_litellm(litellm, workdir, direct))
        for server, _ in servers:
            stack.callback(server.stop)
        for server, _ in servers:
            server.wait_ready()
        targets: list[tuple[Target, ServerProcess | None]] = [(direct, None)]
        targets += [(target, server) for server, target in servers]
        results: dict[int, list[Row]] = {}
        for concurrency in levels:
            requests = args.requests or (max(20, 2 * concurrency) if paced
                                         else max(200, 4 * concurrency))
            results[concurrency] = run_level(targets, concurrency, requests)
            print_level(concurrency, results[concurrency])
        met = print_aims(results, "guardrail, guard none",
                         "LiteLLM proxy, no guardrail" if litellm else None)
        print("\nPeak memory (VmHWM): " + ", ".join(
            f"{server.name} {server.memory_mib('VmHWM'):.0f} MiB" for server, _ in servers)
            + f"; the fake model {upstream.memory_mib('VmHWM'):.0f} MiB.")
        errors = sum(row.errors for rows in results.values() for row in rows)
    return met, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,32,128",
                        help="comma-separated client concurrencies")
    parser.add_argument("--requests", type=int, default=0,
                        help="streams per target and concurrency (default: max(200, 4 x C) "
                             "unpaced, max(20, 2 x C) paced)")
    parser.add_argument("--chunks", type=int, default=100, help="chunks the model streams")
    parser.add_argument("--chunk-delay-ms", default="0,10",
                        help="comma-separated model paces to run: 0 = as fast as it can")
    parser.add_argument("--litellm", help="LiteLLM proxy executable")
    parser.add_argument("--no-embedded", action="store_true",
                        help="leave out the embedded-guard row")
    args = parser.parse_args(argv)
    levels = [int(value) for value in args.concurrency.split(",")]
    delays = [float(value) for value in args.chunk_delay_ms.split(",")]
    litellm = litellm_executable(args.litellm)

    print("## proxy_overhead.py: our proxy and LiteLLM's, side by side\n")
    print(f"`python -m benchmarks.proxy_overhead --concurrency {args.concurrency} "
          f"--chunks {args.chunks} --chunk-delay-ms {args.chunk_delay_ms}`: each stream is "
          f"{args.chunks} chunks ({len(REASONING)} characters of reasoning, {len(ANSWER)} of "
          "answer) from a fake model; every server in its own process with one worker, the "
          "client in another; times in ms; TTFT = first reasoning or answer text; every "
          "stream's text is checked against what the model sent. Proxy CPU is the proxy "
          "process's user + system time per stream.")
    if litellm is None:
        print("\nLiteLLM's proxy was not found (`make bench` installs it in .venv-litellm; "
              "or pass --litellm): its row is missing.")
    met, errors = True, 0
    for delay_ms in delays:
        regime_met, regime_errors = run_regime(args, delay_ms, litellm, levels)
        met, errors = met and regime_met, errors + regime_errors
    print(f"\nAims {'met' if met else 'NOT met'} on this run; {errors} streams failed.")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
