"""What traces cost per streamed chunk: the guarded stream run in process (no HTTP, so nothing
hides the difference) over an in-memory upstream of small chunks and a guard that answers at
once, with tracing off (``NO_SPAN``) and on (the OpenTelemetry SDK, a batch processor and an
exporter that drops the spans, so the cost is ours and the SDK's, not a network's). CPU time of
the process (its threads included: the batch processor's), not wall time, so that other work on
a shared machine does not blur the comparison.

    .venv/bin/python -m benchmarks.tracing_overhead [--chunks 4000] [--repeats 15]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from guardrail.cases.model import Case
from guardrail.config import Config, UpstreamConfig
from guardrail.correctors import build_corrector
from guardrail.events import Finish, TextDelta, UpstreamEvent
from guardrail.guards.base import SAFE, GuardView, Verdict
from guardrail.metrics import Metrics
from guardrail.monitor import GuardedStream
from guardrail.tracing import NoTracer, Tracer
from guardrail.tracing_otel import tracer_with
from guardrail.upstreams.base import ChatRequest

WORDS = ("The", "model", "works", "through", "the", "problem", "one", "careful", "step", "at",
         "a", "time.")


class _Dropped(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class _InstantGuard:
    name = "instant"

    async def check(self, view: GuardView) -> Verdict:
        return SAFE

    async def check_many(self, views: Sequence[GuardView]) -> list[Verdict]:
        return [SAFE for _ in views]

    async def aclose(self) -> None:
        return None


class _MemoryUpstream:
    name = "memory"

    def __init__(self, chunks: int) -> None:
        self.config = UpstreamConfig()
        self.chunks = [WORDS[i % len(WORDS)] + " " for i in range(chunks)]

    async def stream(self, request: ChatRequest) -> AsyncIterator[UpstreamEvent]:
        for text in self.chunks:
            yield TextDelta("reasoning", text)
        yield Finish("stop")

    async def list_models(self) -> list[dict[str, Any]]:
        return []

    async def aclose(self) -> None:
        return None


async def one_request(tracer: Tracer, upstream: _MemoryUpstream, config: Config,
                      metrics: Metrics) -> tuple[float, int]:
    started = time.process_time()
    case = Case(model="m", upstream=upstream.name)
    # What the chat route and the case lifecycle do with the request span.
    span = tracer.start("POST /v1/chat/completions", {"guardrail.case_id": case.id})
    stream = GuardedStream(request=ChatRequest(body={"messages": []}), upstream=upstream,
                           guard=_InstantGuard(), corrector=build_corrector(config.correction),
                           config=config, metrics=metrics, case=case, span=span)
    async for _ in stream.events():
        pass
    span.set({"guardrail.action": case.action})
    span.end()
    return time.process_time() - started, len(case.steps)


async def measure(chunks: int, repeats: int) -> dict[str, list[float]]:
    config = Config()
    metrics = Metrics()
    upstream = _MemoryUpstream(chunks)
    tracers: dict[str, Tracer] = {"off": NoTracer(),
                                  "on": tracer_with(BatchSpanProcessor(_Dropped()))}
    times: dict[str, list[float]] = {name: [] for name in tracers}
    for tracer in tracers.values():  # warm up both
        await one_request(tracer, upstream, config, metrics)
    for _ in range(repeats):  # interleaved, so drift in the machine's load hits both alike
        for name, tracer in tracers.items():
            elapsed, steps = await one_request(tracer, upstream, config, metrics)
            times[name].append(elapsed)
    times["steps"] = [float(steps)]
    for tracer in tracers.values():
        tracer.shutdown()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    times = asyncio.run(measure(args.chunks, args.repeats))
    steps = int(times.pop("steps")[0])
    per_chunk = {name: statistics.median(values) / args.chunks * 1e6
                 for name, values in times.items()}
    spread = {name: (min(values) / args.chunks * 1e6, max(values) / args.chunks * 1e6)
              for name, values in times.items()}
    print("## Tracing overhead (in process, CPU per chunk)\n")
    print(f"One guarded stream (strict) of {args.chunks} chunks, {steps} steps and checks, "
          f"{steps + 3} spans when on; median of {args.repeats} interleaved runs.\n")
    print("| traces | CPU µs per chunk (median) | min-max |")
    print("|---|---|---|")
    for name in ("off", "on"):
        low, high = spread[name]
        print(f"| {name} | {per_chunk[name]:.2f} | {low:.2f}-{high:.2f} |")
    extra = per_chunk["on"] - per_chunk["off"]
    print(f"\nOn costs {extra:+.2f} µs per chunk ({extra / per_chunk['off'] * 100:+.1f} %), "
          f"{extra * args.chunks / steps:+.1f} µs per step.")


if __name__ == "__main__":
    main()
