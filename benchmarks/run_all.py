"""Runs every benchmark in this folder and writes what they print to benchmarks/RESULTS.md,
headed by the date, the machine and how to rerun.

    make bench        # or: .venv/bin/python -m benchmarks.run_all [--only load,...]

Each benchmark is a script that prints a Markdown section; it runs in its own process (the
proxies it measures in processes of their own), one after another so they do not share the
machine. A failed benchmark is marked in the file and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")

BENCHMARKS = {
    "proxy_overhead": ["-m", "benchmarks.proxy_overhead"],
    "load": ["-m", "benchmarks.load"],
    "guarded_stream_latency": ["-m", "benchmarks.guarded_stream_latency"],
    "guard_growth": ["-m", "benchmarks.guard_growth"],
    "embedded_guard_latency": ["benchmarks/embedded_guard_latency.py",
                               "--concurrency", "1,4,16,32"],
    "harvest_scale": ["-m", "benchmarks.harvest_scale", "--cases", "20000,100000"],
    "workers": ["-m", "benchmarks.workers"],
    "tracing_overhead": ["-m", "benchmarks.tracing_overhead"],
}


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kib = int(meminfo.read_text().split()[1])
        memory = f", {kib / 1024 ** 2:.0f} GiB memory"
    versions = []
    for package in ("torch", "uvicorn", "uvloop", "litellm"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return (f"{os.cpu_count()} CPU cores ({cpu}){memory}, no GPU used; "
            f"{platform.system()} {platform.release()}; Python {platform.python_version()}; "
            + ", ".join(versions))


def cpu_probe_ms() -> float:
    """A fixed piece of pure-Python work, timed: how fast the machine is right now. A shared
    machine's speed drifts (twice as slow at times, on the one these figures came from), so
    each section gives the probe before and after it."""
    started = time.perf_counter()
    total = 0
    for number in range(2_000_000):
        total += number
    return (time.perf_counter() - started) * 1000


def run(name: str, arguments: list[str]) -> tuple[str, bool, float]:
    """Run one benchmark, echoing its output as it comes; (output, ok, seconds)."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, *arguments], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    ok = process.wait() == 0
    return "".join(lines).strip(), ok, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    chosen = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    sections, failed = [], []
    for name in chosen:
        print(f"\n=== {name} ===", flush=True)
        before = cpu_probe_ms()
        output, ok, seconds = run(name, BENCHMARKS[name])
        after = cpu_probe_ms()
        if not ok:
            failed.append(name)
        status = "" if ok else " **This benchmark failed or missed its aim (exit status 1).**"
        sections.append(f"{output}\n\n_{name}: {seconds:.0f} s; CPU probe {before:.0f} ms "
                        f"before, {after:.0f} ms after._{status}")
    today = datetime.date.today().isoformat()
    header = (
        "# Benchmark results\n\n"
        f"Written by `make bench` (`python -m benchmarks.run_all`) on {today}.\n\n"
        f"Machine: {describe_machine()}.\n\n"
        "Rerun everything with `make bench` (it installs LiteLLM's proxy, the peer, in "
        "`.venv-litellm`), or one benchmark with `python -m benchmarks.run_all --only NAME` "
        f"({', '.join(BENCHMARKS)}); each section gives its own command. Figures from a shared "
        "machine vary from run to run (the CPU probe after each section is a fixed loop, timed: "
        "its drift is the machine's): compare rows of one run, not runs. Harvest speed: "
        "there is no harvest module yet; its benchmark comes with it.\n"
    )
    if args.only:
        header += f"\nThis run: {', '.join(chosen)} only.\n"
    args.output.write_text(header + "\n" + "\n\n".join(sections) + "\n")
    print(f"\nwrote {args.output}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
