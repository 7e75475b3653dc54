"""How fast ``guardrail harvest`` turns a large store into training data, and what it holds.

    python -m benchmarks.harvest_scale --cases 100000 [--postgres URL] [--intercepted-every 5]

A fresh store is filled with realistic cases (``benchmarks.case_scan.sample_case``: one in
``--intercepted-every`` intervened, the rest passed), then harvested in this process with the
command's own code: read through the store's cursor, the counted funnel, dedupe, split, and the
output written to a temporary folder. No guard re-judges (that costs what the guard costs, per
corrected case) and no evaluation set is loaded (decontamination needs them locally). Printed:
cases per second, wall time, and the peak Python memory of the harvest (tracemalloc), which
grows with the intercepted cases kept, not with the cases read.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchmarks.case_scan import fill, prepare
from guardrail.config import Config
from offline.harvest_command import HarvestConfig, harvest, write


def run(url: str, out: Path, *, trace: bool) -> tuple[float, int, int, str]:
    """(seconds, peak bytes with ``trace``, records written, funnel line). Timed and traced in
    separate passes: tracemalloc slows allocation-heavy code several times."""
    options = HarvestConfig(out=out, rejudge=False, decontaminate=False, seed=42,
                            overwrite=True)
    if trace:
        tracemalloc.start()
    started = time.perf_counter()
    result = asyncio.run(harvest(options, Config(), url))
    write(result, options, out)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] if trace else 0
    tracemalloc.stop()
    return elapsed, peak, len(result.train) + len(result.test), result.funnel.line()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--cases", default="20000,100000",
                        help="store sizes, comma-separated")
    parser.add_argument("--postgres", help="also a PostgreSQL store at this URL (a fresh schema)")
    args = parser.parse_args()
    sizes = [int(size) for size in args.cases.split(",")]
    print("| store | cases | harvest s | cases/s | peak MiB | records | funnel |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            urls = [("sqlite", f"sqlite:///{folder}/cases-{size}.db")]
            if args.postgres:
                urls.append(("postgresql", args.postgres))
            for name, url in urls:
                asyncio.run(prepare(url))
                fill(url, size)
                out = Path(folder) / f"harvest-{name}-{size}"
                seconds, _, records, funnel = run(url, out, trace=False)
                _, peak, _, _ = run(url, out, trace=True)
                print(f"| {name} | {size:,} | {seconds:.1f} | {size / seconds:,.0f} | "
                      f"{peak / 2**20:.1f} | {records:,} | {funnel} |", flush=True)


if __name__ == "__main__":
    main()
