"""Per-step latency of the embedded guard on this machine, with concurrent checks.

Each of C workers plays a stream: it checks fresh steps one after another, each with the
previous four steps as context and the stream's request, as the proxy sends them. Steps are new
text every time (nothing comes from the guard's embedding memory except, as in the proxy, the
request and the context steps). Reported per concurrency level: median and p95 latency of one
check, throughput, and how many checks each forward pass judged on average.

    .venv/bin/python benchmarks/embedded_guard_latency.py --concurrency 1,4,16,32

``--model DIR`` (repeatable) measures other heads (``guard.model`` folders) in the same run, side
by side with the shipped one, level by level in turn, so that a shared machine's drift hits all
of them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from guardrail.config import GuardConfig
from guardrail.guards import build_guard
from guardrail.guards.base import GuardView
from guardrail.guards.embedded import EmbeddedGuard

SENTENCES = [
    "First, I need to understand what the user is actually asking for here.",
    "The question is about the boiling point of water at high altitude, which depends on pressure.",
    "Let me recall the relevant formula and check the units before computing anything.",
    "So the total cost is the unit price times the quantity, plus the shipping fee.",
    "I should mention that the answer may differ slightly depending on local regulations.",
    "Next, consider the edge case where the list is empty, because the loop would never run.",
    "Therefore, the function returns the index of the first element greater than the target.",
    "Wait, that does not match the example, so I must have swapped the two arguments.",
]
REQUEST = "Can you explain, step by step, how to solve this problem and check the result?"


def step_text(worker: int, index: int) -> str:
    base = SENTENCES[(worker + index) % len(SENTENCES)]
    return f"{base} (case {worker}.{index})"


async def run_level(guard: EmbeddedGuard, concurrency: int, steps: int) -> dict[str, float]:
    latencies: list[float] = []

    async def worker(number: int) -> None:
        history: list[str] = []
        for index in range(steps):
            step = step_text(number, index)
            view = GuardView(f"{REQUEST} [{number}]", tuple(history[-4:]), step)
            started = time.perf_counter()
            await guard.check(view)
            latencies.append(time.perf_counter() - started)
            history.append(step)

    batches = guard.batches
    started = time.perf_counter()
    await asyncio.gather(*(worker(number) for number in range(concurrency)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p95_ms": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000,
        "checks_per_s": len(ordered) / elapsed,
        "checks_per_batch": len(ordered) / max(1, guard.batches - batches),
        "checks": len(ordered),
    }


async def main(levels: list[int], steps: int, models: list[str]) -> None:
    # The step checks alone: the compliance-cue wrapper adds nothing for these benign steps.
    guards: dict[str, EmbeddedGuard] = {}
    loads: list[str] = []
    for model in [None, *models]:
        guard = build_guard(GuardConfig(kind="embedded", compliance_cues=False, model=model))
        assert isinstance(guard, EmbeddedGuard)
        started = time.perf_counter()
        await asyncio.to_thread(guard.warm_up)
        name = model or "shipped"
        loads.append(f"{name} {time.perf_counter() - started:.1f} s")
        await run_level(guard, 2, 3)  # first passes allocate; keep them out of the figures
        guards[name] = guard

    import torch

    print("## embedded_guard_latency.py: the embedded guard's latency per step\n")
    print(f"`python benchmarks/embedded_guard_latency.py --concurrency "
          f"{','.join(map(str, levels))}"
          f"{''.join(f' --model {model}' for model in models)}`: {steps} benign steps checked "
          f"by each of N concurrent streams; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; guard load {', '.join(loads)}.\n")
    print("| head | concurrent streams | checks | median ms | p95 ms | checks/s "
          "| steps per forward pass |")
    print("|---|---|---|---|---|---|---|")
    for level in levels:
        for name, guard in guards.items():
            row = await run_level(guard, level, steps)
            print(f"| {name} | {level} | {row['checks']:.0f} | {row['median_ms']:.1f} "
                  f"| {row['p95_ms']:.1f} | {row['checks_per_s']:.1f} "
                  f"| {row['checks_per_batch']:.1f} |")
    for guard in guards.values():
        await guard.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4,16,32",
                        help="comma-separated numbers of concurrent streams")
    parser.add_argument("--steps", type=int, default=24, help="steps each stream checks")
    parser.add_argument("--model", action="append", default=[],
                        help="another guard.model folder to measure alongside (repeatable)")
    arguments = parser.parse_args()
    asyncio.run(main([int(n) for n in arguments.concurrency.split(",")], arguments.steps,
                     arguments.model))
