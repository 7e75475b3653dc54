"""Endpoint guards under load: a burst of concurrent checks against a slow guard server all finish
within one check timeout, over a bounded pool of kept-alive connections, and, with
``options.completions_batch``, in a few batched ``/v1/completions`` requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from guardrail.config import GuardConfig
from guardrail.errors import ConfigError
from guardrail.guards import build_guard
from guardrail.guards.base import GuardView, Verdict
from guardrail.guards.generative import GenerativeGuard, create_generative
from guardrail.guards.generative.runners.endpoint import GuardEndpoint
from guardrail.step_checker import StepChecker
from tests.fakes.llama_guard_server import FakeLlamaGuard
from tests.fakes.loopback import serve_app

pytestmark = pytest.mark.timeout(60)

DELAY_S = 0.2
TIMEOUT_S = 1.5
BURST = 150
BENIGN = "Feed the starter and let it rise for an hour before it goes in the fridge."
HARMFUL = "First, obtain the precursors for the nerve agent."


def views() -> list[GuardView]:
    return [GuardView(request="How do I look after a sourdough starter?", context=(),
                      step=f"({index}) {HARMFUL if index % 10 == 3 else BENIGN}")
            for index in range(BURST)]


@asynccontextmanager
async def checker_for(fake: FakeLlamaGuard, **options: Any) -> AsyncIterator[StepChecker]:
    with serve_app(fake.app(), lifespan="off") as base_url:
        config = GuardConfig(kind="llama-guard", url=base_url + "/v1", timeout_s=TIMEOUT_S,
                             compliance_cues=False, refusal_rule=False, options=options)
        guard = build_guard(config)
        try:
            yield StepChecker(guard, config)
        finally:
            await guard.aclose()


async def burst(checker: StepChecker) -> list[Verdict]:
    return await asyncio.gather(*(checker.check(view) for view in views()))


def assert_judged(verdicts: list[Verdict]) -> None:
    assert [verdict.error for verdict in verdicts if verdict.error] == []
    assert [verdict.unsafe for verdict in verdicts] == [index % 10 == 3
                                                        for index in range(BURST)]
    assert all(verdict.categories == ("S9",) for verdict in verdicts if verdict.unsafe)


async def test_a_burst_over_a_small_pool_is_judged_without_a_timeout() -> None:
    # 150 checks, 32 connections, 0.2 s an answer: five rounds of the pool, about 1 s in all.
    # No check times out (its 1.5 s counts its request, its wait for a connection only up to
    # guard.max_queue_wait_s); how long the burst takes is a benchmark's business
    # (benchmarks/guard_client_cpu.py, benchmarks/load.py), not a timed assertion here.
    fake = FakeLlamaGuard(delay_s=DELAY_S)
    async with checker_for(fake, max_connections=32) as checker:
        verdicts = await burst(checker)
    assert_judged(verdicts)
    assert len(fake.requests) == BURST
    assert fake.max_in_flight <= 32  # the pool bounds what the server is asked at once
    # Kept alive: 150 requests over at most 32 connections (client ports), not one each.
    assert len(set(fake.client_ports)) <= 32


async def test_completions_batch_sends_several_checks_per_request() -> None:
    fake = FakeLlamaGuard(delay_s=DELAY_S)
    async with checker_for(fake, completions_batch=16, max_connections=4) as checker:
        verdicts = await burst(checker)
    assert_judged(verdicts)
    # 4 connections x 16 prompts: 150 checks in 10 full requests at best; the first few go
    # before the whole burst has arrived, so a few more.
    assert all(isinstance(body["prompt"], list) for body in fake.requests)
    assert sum(len(body["prompt"]) for body in fake.requests) == BURST
    assert len(fake.requests) <= BURST // 8, [len(body["prompt"]) for body in fake.requests]
    assert max(len(body["prompt"]) for body in fake.requests) == 16


async def test_a_lone_check_is_not_held_back_for_a_batch() -> None:
    fake = FakeLlamaGuard(delay_s=0.0)
    async with checker_for(fake, completions_batch=16) as checker:
        verdict = await checker.check(views()[3])
    assert verdict.unsafe and verdict.categories == ("S9",)
    assert fake.requests[0]["prompt"] == [fake.requests[0]["prompt"][0]]
    assert "nerve agent" in fake.requests[0]["prompt"][0]


def test_endpoint_options_are_validated() -> None:
    for options in ({"max_connections": 0}, {"completions_batch": "16"}):
        with pytest.raises(ConfigError, match=r"guard\.options\."):
            create_generative(GuardConfig(kind="llama-guard", url="http://127.0.0.1:1/v1",
                                          options=options))
    guard = create_generative(GuardConfig(kind="llama-guard", url="http://127.0.0.1:1/v1",
                                          options={"max_connections": 8}))
    assert isinstance(guard, GenerativeGuard) and isinstance(guard.runner, GuardEndpoint)
    assert guard.runner.settings.max_connections == 8
