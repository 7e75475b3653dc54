"""Backpressure towards the model: while a stream has more steps waiting for a verdict than
``4 x guard.max_concurrency``, its producer stops reading the upstream, in strict and fast mode,
and reads on as verdicts come.

The upstream here is an in-process ``Upstream`` that counts the events read from it: over
loopback HTTP, socket buffers would hide a stalled reader for any response of a test's size.
The guard is a registered backend that answers nothing until the test releases it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from guardrail.cases.model import Case
from guardrail.config import GuardConfig, UpstreamConfig, config_from_mapping
from guardrail.correctors import build_corrector
from guardrail.events import Finish, TextDelta, UpstreamEvent
from guardrail.guards import GUARDS, create_guard
from guardrail.guards.base import GuardView, Verdict, check_each
from guardrail.metrics import Metrics
from guardrail.monitor import GuardedStream, OutputEvent
from guardrail.upstreams.base import ChatRequest

STEPS = 120
PER_STREAM = 2  # guard.max_concurrency: up to 8 steps waiting before the read stops


class HeldGuard:
    """Judges every step safe, once the test releases it."""

    name = "held-verdicts"

    def __init__(self, config: GuardConfig | None = None) -> None:
        self.release = asyncio.Event()

    async def check(self, view: GuardView) -> Verdict:
        await self.release.wait()
        return Verdict(unsafe=False)

    async def check_many(self, views: Sequence[GuardView]) -> list[Verdict]:
        return await check_each(self.check, views)

    async def aclose(self) -> None:
        pass


GUARDS.register("held-verdicts")(HeldGuard)


class CountingUpstream:
    name = "counting"

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.read = 0

    async def stream(self, request: ChatRequest) -> AsyncIterator[UpstreamEvent]:
        for number in range(STEPS):
            self.read += 1
            yield TextDelta("reasoning", f"This is sentence number {number} of the plan. ")
        yield Finish("stop")

    async def list_models(self) -> list[dict[str, Any]]:
        return []

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("mode", ["strict", "fast"])
def test_the_upstream_is_not_read_far_ahead_of_the_verdicts(mode: str) -> None:
    config = config_from_mapping({
        "upstream": {"url": "http://127.0.0.1:9/v1"},
        "guard": {"kind": "held-verdicts", "max_concurrency": PER_STREAM,
                  "compliance_cues": False},
        "correction": {"strategy": "refuse"},
        "stream": {"mode": mode, "min_step_chars": 10},
    })

    async def run() -> tuple[int, int, list[OutputEvent]]:
        guard = create_guard(config.guard)
        assert isinstance(guard, HeldGuard)
        upstream = CountingUpstream(config.upstream)
        monitor = GuardedStream(
            request=ChatRequest(body={"model": "m", "messages": [
                {"role": "user", "content": "Plan my week."}]}),
            upstream=upstream, guard=guard, corrector=build_corrector(config.correction),
            config=config, metrics=Metrics(), case=Case(model="m", upstream="counting"))
        events: list[OutputEvent] = []

        async def consume() -> None:
            async for event in monitor.events():
                events.append(event)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)  # the producer reads on until it stalls
        read_while_held = upstream.read
        guard.release.set()
        await asyncio.wait_for(task, 30)
        return read_while_held, upstream.read, events

    read_while_held, read, events = asyncio.run(run())
    # Each event is one step: reading stopped a step or two past 4 x max_concurrency waiting.
    assert 4 * PER_STREAM <= read_while_held <= 4 * PER_STREAM + 2, read_while_held
    assert read == STEPS  # and went on to the end once verdicts came
    text = "".join(event.text for event in events if isinstance(event, TextDelta))
    assert text == "".join(f"This is sentence number {n} of the plan. " for n in range(STEPS))
