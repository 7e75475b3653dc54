"""Our endpoint guard client's CPU per check: bursts of N concurrent Llama Guard checks against
the fake endpoint (``benchmarks/fake_guard.py``, its own process, answering after 50 ms), timed
in this process, which only runs the client.

    .venv/bin/python -m benchmarks.guard_client_cpu [--burst 50 200 800] [--options '{...}']

Printed per burst: wall time, this process's CPU time per check, checks/s, errors, and the
requests the endpoint got (fewer than checks with ``completions_batch``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.launch import start_fake_guard
from guardrail.config import GuardConfig
from guardrail.guards.base import GuardView
from guardrail.guards.generative.guard import GenerativeGuard, create_generative
from guardrail.guards.generative.runners.endpoint import GuardEndpoint


def views(count: int) -> list[GuardView]:
    return [GuardView(request="How do I keep a sourdough starter alive?", context=(),
                      step=f"Step {index}: feed the starter and let it rise for an hour.")
            for index in range(count)]


async def measure(url: str, bursts: list[int], options: dict[str, object]) -> None:
    guard = create_generative(GuardConfig(kind="llama-guard", url=url, timeout_s=30,
                                          options=options))
    assert isinstance(guard, GenerativeGuard) and isinstance(guard.runner, GuardEndpoint)
    await guard.check(views(1)[0])  # connections, the first request
    print("| burst | wall s | client CPU ms per check | checks/s | errors | batched requests |")
    print("|---|---|---|---|---|---|")
    for count in bursts:
        batched_before = guard.runner.requests_sent
        started, cpu_started = time.perf_counter(), time.process_time()
        results = await asyncio.gather(*(guard.check(view) for view in views(count)),
                                       return_exceptions=True)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        errors = sum(isinstance(result, BaseException) for result in results)
        batched = guard.runner.requests_sent - batched_before
        print(f"| {count} | {wall:.2f} | {cpu / count * 1000:.2f} | {count / wall:.0f} "
              f"| {errors} | {batched or '-'} |")
    await guard.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--burst", type=int, nargs="+", default=[50, 200, 800])
    parser.add_argument("--options", type=json.loads, default={},
                        help="guard.options as JSON, e.g. '{\"completions_batch\": 16}'")
    parser.add_argument("--delay-ms", type=float, default=50.0)
    args = parser.parse_args(argv)
    print(f"`python -m benchmarks.guard_client_cpu --options '{json.dumps(args.options)}'`: "
          f"bursts of concurrent Llama Guard checks against the fake endpoint answering in "
          f"{args.delay_ms:g} ms.\n")
    with tempfile.TemporaryDirectory(prefix="bench-guard-client-") as tmp:
        server, url = start_fake_guard(Path(tmp), args.delay_ms)
        try:
            server.wait_ready()
            asyncio.run(measure(url, args.burst, args.options))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
