"""Runs every benchmark in this folder, one after another, printing their figures.

    make bench        # or: .venv/bin/python -m benchmarks.run_all

Each benchmark prints its own table with the machine it ran on; copy them into
benchmarks/RESULTS.md with the date when they change.
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = (
    ("proxy overhead", ["-m", "benchmarks.proxy_overhead", "--requests", "100"]),
    ("guarded stream: added latency L, not S x L", ["-m", "benchmarks.guarded_stream_latency"]),
    ("guard cost as traces grow", ["-m", "benchmarks.guard_growth"]),
    ("embedded guard latency", ["benchmarks/embedded_guard_latency.py",
                                "--concurrency", "1,4,16,32"]),
)


def main() -> int:
    failed = []
    for title, arguments in BENCHMARKS:
        print(f"\n=== {title} ===", flush=True)
        if subprocess.run([sys.executable, *arguments], check=False).returncode != 0:
            failed.append(title)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
