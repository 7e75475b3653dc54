"""Backpressure: a guard that falls behind makes the proxy refuse new requests up front (503 with
``Retry-After``, before any text), so that the streams it took keep their checks in time."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from guardrail.config import config_from_mapping
from guardrail.guards.base import GuardView, Verdict
from guardrail.guards.capabilities import ReportsBacklog, find_backlog
from guardrail.guards.plumbing.cues import ComplianceCueGuard
from guardrail.guards.plumbing.load import GuardBacklog, LoadMeter
from guardrail.metrics import Metrics
from server.app import create_app
from server.backpressure import UNGATED, Admission, AdmissionGate, BackpressureGauges, Refusal
from tests.fakes.loopback import LoopbackServers
from tests.fakes.openai_server import FakeReply, create_fake_openai_app


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the meter -----------------------------------------------------------------------------------


def test_meter_counts_checks_in_the_guard_and_measures_its_busy_rate() -> None:
    clock = Clock()
    meter = LoadMeter(clock)
    assert meter.backlog() == GuardBacklog(checks=0, rate=None, oldest_s=0.0)
    with meter.track():
        clock.now += 0.1
        with meter.track(3):
            assert meter.backlog().checks == 4
            assert meter.backlog().oldest_s == pytest.approx(0.1)
            clock.now += 0.1
        # 3 checks done at busy 0.2 s: the first mark, no rate yet (one instant only).
        assert meter.backlog().rate is None
        clock.now += 0.1
    # One more at busy 0.3 s: 1 check in the 0.1 s since the last mark.
    assert meter.backlog().rate == pytest.approx(10.0)
    assert meter.backlog().checks == 0 and meter.backlog().oldest_s == 0.0
    clock.now += 50.0  # idle time does not dilute the rate, and the rate is kept
    with meter.track(4):
        clock.now += 0.2
    assert meter.backlog().rate == pytest.approx(5 / 0.3)


def test_meter_counts_no_rate_for_checks_that_fail_or_are_cancelled() -> None:
    clock = Clock()
    meter = LoadMeter(clock)
    for _ in range(3):
        with pytest.raises(TimeoutError), meter.track():
            clock.now += 1.0
            raise TimeoutError
    backlog = meter.backlog()
    assert backlog.checks == 0 and backlog.rate is None


def test_expected_wait_is_the_backlog_at_the_rate_or_the_oldest_wait() -> None:
    assert GuardBacklog(checks=40, rate=100.0, oldest_s=0.1).expected_wait_s() == 0.4
    assert GuardBacklog(checks=40, rate=100.0, oldest_s=0.1).expected_wait_s(60) == 1.0
    # A guard that stopped answering: its rate says little, the oldest check's wait says it.
    assert GuardBacklog(checks=2, rate=100.0, oldest_s=7.0).expected_wait_s() == 7.0
    assert GuardBacklog(checks=0, rate=None, oldest_s=0.0).expected_wait_s() == 0.0


# -- the gate ------------------------------------------------------------------------------------


class Source:
    name = "fake"

    def __init__(self) -> None:
        self.state = GuardBacklog(checks=0, rate=100.0, oldest_s=0.0)

    def backlog(self) -> GuardBacklog:
        return self.state

    async def check(self, view: GuardView) -> Verdict:
        raise NotImplementedError

    async def check_many(self, views: Any) -> list[Verdict]:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


def gate_for(source: Source, clock: Clock, **backpressure: Any) -> AdmissionGate:
    config = config_from_mapping({"guard": {"timeout_s": 8, "max_concurrency": 4},
                                  "server": {"backpressure": backpressure}})
    return AdmissionGate(config, source, Metrics(), clock)


def test_gate_refuses_past_the_bound_and_says_when_to_come_back() -> None:
    source, clock = Source(), Clock()
    gate = gate_for(source, clock)  # bound: a quarter of the 8 s timeout
    assert gate.max_wait_s == 2.0 and isinstance(source, ReportsBacklog)
    source.state = GuardBacklog(checks=190, rate=100.0, oldest_s=0.2)
    assert isinstance(gate.admit(), Admission)
    source.state = GuardBacklog(checks=350, rate=100.0, oldest_s=0.2)
    refusal = gate.admit()
    assert isinstance(refusal, Refusal)
    # The checks in the guard (3.5 s of them) drain to the bound in 1.5 s.
    assert refusal.retry_after_s == 2
    assert "would wait 3.5 s" in refusal.message
    # A guard that stopped answering: at most half the check timeout.
    source.state = GuardBacklog(checks=3, rate=100.0, oldest_s=7.5)
    refusal = gate.admit()
    assert isinstance(refusal, Refusal) and refusal.retry_after_s == 4
    assert gate.metrics.backpressure_rejections._value.get() == 2


def test_gate_counts_admitted_streams_until_their_first_check() -> None:
    source, clock = Source(), Clock()
    gate = gate_for(source, clock)
    source.state = GuardBacklog(checks=0, rate=100.0, oldest_s=0.0)
    admitted = [gate.admit() for _ in range(60)]
    # Each admitted stream counts as 4 checks (guard.max_concurrency) until it sends one:
    # 50 streams fill the 2 s bound at 100 checks/s, the 52nd would wait past it.
    assert sum(isinstance(one, Admission) for one in admitted) == 51
    assert isinstance(admitted[-1], Refusal)
    for one in admitted[:10]:
        assert isinstance(one, Admission)
        one.checking()
        one.checking()  # idempotent
    assert isinstance(gate.admit(), Admission)
    # Streams that send checks tell how many a new one will bring: 10 checking streams with
    # 10 checks in the guard, one each; the 42 not yet checking count as 42 checks, not 168.
    source.state = GuardBacklog(checks=10, rate=100.0, oldest_s=0.0)
    state = gate.state()
    assert state is not None and state[1] == pytest.approx(0.52) and state[2] == 42
    for one in admitted[:10]:
        assert isinstance(one, Admission)
        one.end()
        one.end()
    # None checking now: a new stream counts as guard.max_concurrency checks again.
    state = gate.state()
    assert state is not None and state[1] == pytest.approx(42 * 4 / 100 + 0.1)
    # An admission never released stops counting after guard.timeout_s.
    clock.now += 8.0
    state = gate.state()
    assert state is not None and state[2] == 0


def test_gate_admits_one_at_a_time_until_the_rate_is_known_and_honours_a_count_bound() -> None:
    source, clock = Source(), Clock()
    gate = gate_for(source, clock, max_guard_backlog=50)
    source.state = GuardBacklog(checks=0, rate=None, oldest_s=0.0)
    first = gate.admit()
    assert isinstance(first, Admission) and isinstance(gate.admit(), Refusal)
    first.checking()
    assert isinstance(gate.admit(), Admission)
    source.state = GuardBacklog(checks=50, rate=1000.0, oldest_s=0.0)
    refusal = gate.admit()
    assert isinstance(refusal, Refusal) and "50 checks in the guard" in refusal.message


def test_gate_reads_a_wrapped_guard_and_is_off_when_disabled_or_unguarded() -> None:
    source, clock = Source(), Clock()
    assert find_backlog(ComplianceCueGuard(source)) is source
    assert gate_for(source, clock, enabled=False).admit() is UNGATED
    none_config = config_from_mapping({"guard": {"kind": "none"}})
    source.name = "none"
    assert AdmissionGate(none_config, source, Metrics(), clock).admit() is UNGATED


# -- the proxy, with the embedded guard saturated ------------------------------------------------

SENTENCES = [
    "A starter is flour and water colonised by wild yeast and lactic acid bacteria.",
    "Before leaving, it helps to feed the starter and let it rise for an hour or two.",
    "Then it can go into the refrigerator, where the cold slows fermentation a great deal.",
    "A stiffer starter, with less water, lasts longer because the microbes eat more slowly.",
    "Some bakers dry a thin layer on baking paper and crumble it into a jar as a backup.",
    "On return, the starter needs two or three feedings at room temperature to recover.",
    "A layer of grey liquid on top is only alcohol from hungry yeast and can be poured off.",
    "I will give the steps in order and mention the dried backup as an option.",
]
REASONING = " ".join(f"{sentence[:-1]} (part {index})." for index, sentence in
                     enumerate(SENTENCES * 2))
ANSWER = "Feed it, let it rise, then refrigerate it in a covered jar until you are back."
GUARD_TIMEOUT_S = 1.0
# The gate's bound, above the timeout on purpose: the streams it admits put more in the guard
# than it judges within guard.timeout_s, as streams admitted under a lower bound do when they
# keep sending checks after the guard fell behind (benchmarks/RESULTS.md), only every time.
MAX_WAIT_S = 3.0
PER_STREAM = 16  # guard.max_concurrency: a stream's steps may all be in the guard at once
STREAMS = 160
RUN_S = 4.0
CHUNK_DELAY_S = 0.05  # paced: about 1.5 s a stream, sending checks for all of it once admitted


def metric_values(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items()))
            values[key] = sample.value
    return values


async def one_stream(client: openai.AsyncOpenAI, number: int) -> dict[str, Any]:
    stream = await client.chat.completions.create(
        model="fake-model", stream=True,
        messages=[{"role": "user", "content": f"Keep my sourdough starter alive? ({number})"}])
    reasoning, content, summary = [], [], None
    async for chunk in stream:
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            reasoning.append(extra.get("reasoning_content") or "")
            content.append(choice.delta.content or "")
        summary = (chunk.model_extra or {}).get("guardrail", summary)
    assert summary is not None, "the last chunk carries the guardrail summary"
    return {"summary": summary, "reasoning": "".join(reasoning), "content": "".join(content)}


def test_saturated_embedded_guard_refuses_up_front_and_no_accepted_stream_times_out(
    tmp_path: Path,
) -> None:
    # Paced streams: each admitted stream goes on sending checks for about a second, so the
    # guard falls behind after the gate let the streams in; their checks then wait in the guard's
    # queue (load, which guard.timeout_s does not count) and the streams slow down, not fail.
    accepted, refused, failed, metrics = run_saturated(tmp_path, max_queue_wait_s=60.0)
    timeouts = sum(value for key, value in metrics.items()
                   if key.startswith("guardrail_guard_errors_total") and "kind=timeout" in key)
    rate = metrics["guardrail_guard_rate"]
    waits = queue_waits(metrics)
    print(f"accepted {len(accepted)}, refused {len(refused)}, guard rate {rate:.0f} checks/s, "
          f"checks {metrics.get('guardrail_checks_total,channel=reasoning,guard=embedded')}, "
          f"queue waits (le: count) {waits}")
    # The load was more than the guard could take: the streams offered would have put
    # STREAMS x PER_STREAM checks in it at once, more than it judges within the timeout (its
    # rate on an idle 2-core machine, with the large batches of a full queue, is about 700/s;
    # a machine several times faster needs more streams here).
    assert STREAMS * PER_STREAM / rate > GUARD_TIMEOUT_S, (rate, len(accepted))
    # ... and the streams it took overloaded it: checks waited in its queue for longer than
    # the whole timeout (the queue wait is a metric: guardrail_guard_queue_wait_seconds), and
    # not one timed out for it; with max_queue_wait_s 0 (the wait counted, as before) hundreds
    # do here.
    assert waits["+Inf"] >= len(accepted)  # every stream's checks went through the queue
    assert waits["+Inf"] > waits[f"{GUARD_TIMEOUT_S}"], waits
    assert not failed, failed[:3]
    assert timeouts == 0
    assert len(accepted) >= 16  # it went on serving while it refused
    for result in accepted:
        assert result["summary"]["action"] != "error", result["summary"]
        if result["summary"]["action"] == "pass":  # the guard may judge a benign step unsafe
            assert (result["reasoning"], result["content"]) == (REASONING, ANSWER)
    assert refused, "the guard was saturated, yet nothing was refused"
    assert metrics["guardrail_backpressure_rejections_total"] == len(refused)
    for error in refused:
        assert error.status_code == 503
        assert int(error.response.headers["retry-after"]) >= 1
        assert error.code == "guard_overloaded" and error.type == "server_error"
        assert "overloaded" in error.message
        assert "x-guardrail-case-id" not in error.response.headers  # refused before any case


def queue_waits(metrics: dict[str, float]) -> dict[str, float]:
    """The queue wait histogram's cumulative counts by upper bound (``le``)."""
    prefix = "guardrail_guard_queue_wait_seconds_bucket,guard=embedded,le="
    return {key[len(prefix):]: value for key, value in metrics.items()
            if key.startswith(prefix)}


def run_saturated(tmp_path: Path, max_queue_wait_s: float
                  ) -> tuple[list[dict[str, Any]], list[openai.APIStatusError], list[str],
                             dict[str, float]]:
    reply = FakeReply(reasoning=REASONING, answer=ANSWER, chunk_chars=48,
                      chunk_delay_s=CHUNK_DELAY_S)
    with LoopbackServers() as servers:
        upstream = servers.serve(create_fake_openai_app(reply))
        config = config_from_mapping({
            "upstream": {"url": f"{upstream}/v1"},
            "guard": {"kind": "embedded", "timeout_s": GUARD_TIMEOUT_S,
                      "max_queue_wait_s": max_queue_wait_s, "max_concurrency": PER_STREAM},
            "correction": {"strategy": "refuse"},
            "stream": {"min_step_chars": 24},
            "store": {"url": f"sqlite:///{tmp_path / 'cases.db'}",
                      "fallback_path": str(tmp_path / "unstored.jsonl")},
            "server": {"backpressure": {"max_guard_wait_s": MAX_WAIT_S}},
        })
        # The embedded guard loads its encoder at start-up: seconds on a busy machine.
        started = time.monotonic()
        url = servers.serve(create_app(config), startup_timeout_s=120)
        print(f"proxy start {time.monotonic() - started:.1f} s")
        accepted, refused, failed = asyncio.run(saturate(url))
        metrics = metric_values(httpx.get(f"{url}/metrics").text)
    return accepted, refused, failed, metrics


async def saturate(url: str) -> tuple[list[dict[str, Any]], list[openai.APIStatusError],
                                      list[str]]:
    accepted: list[dict[str, Any]] = []
    refused: list[openai.APIStatusError] = []
    failed: list[str] = []
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                timeout=30)
    async with client:
        accepted.append(await one_stream(client, -1))  # the guard's first checks: its rate
        deadline = time.monotonic() + RUN_S
        numbers = iter(range(10**6))

        async def worker() -> None:
            while time.monotonic() < deadline:
                try:
                    accepted.append(await one_stream(client, next(numbers)))
                except openai.InternalServerError as error:
                    if error.status_code != 503:
                        failed.append(f"HTTP {error.status_code}: {error.message}")
                    refused.append(error)
                    await asyncio.sleep(0.05)  # a test cannot wait the whole Retry-After
                except openai.APIError as error:  # an error event after the stream began
                    failed.append(f"{type(error).__name__}: {error.message}")

        await asyncio.gather(*(worker() for _ in range(STREAMS)))
    return accepted, refused, failed


def test_with_several_workers_the_gauges_are_real_gauges_set_as_requests_come() -> None:
    # Several workers: a scrape reads the workers' metric files, never a custom collector, so
    # the gate sets real gauges (combined over the workers by their multiprocess_mode).
    source, clock = Source(), Clock()
    gate = gate_for(source, clock)
    registry = CollectorRegistry()
    gauges = BackpressureGauges(gate, registry)
    gate.publish = gauges.publish
    source.state = GuardBacklog(checks=40, rate=100.0, oldest_s=0.1)
    assert isinstance(gate.admit(), Admission)
    assert registry.get_sample_value("guardrail_guard_backlog") == 40
    assert registry.get_sample_value("guardrail_guard_expected_wait_seconds") == 0.4
    assert registry.get_sample_value("guardrail_guard_rate") == 100
    source.state = GuardBacklog(checks=7, rate=50.0, oldest_s=0.1)
    gauges.sync()  # at a scrape of this worker
    assert registry.get_sample_value("guardrail_guard_backlog") == 7
    assert registry.get_sample_value("guardrail_admissions_pending") == 1
