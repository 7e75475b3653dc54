"""The cascade guard with two real backends: a Llama Guard endpoint and an LLM judge, each
against its fake server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from guardrail.config import GuardConfig
from guardrail.errors import ConfigError, UnknownBackendError
from guardrail.guards import build_guard
from guardrail.guards.base import GuardView
from guardrail.guards.capabilities import find_stats
from guardrail.guards.cascade import CascadeGuard
from guardrail.guards.plumbing.stats import GuardStatsCollector
from tests.fakes import FakeOpenAIApp, LoopbackServers, create_fake_openai_app
from tests.fakes.judge import FakeJudge
from tests.fakes.llama_guard_server import FakeLlamaGuard

pytestmark = pytest.mark.timeout(60)


def view(step: str, request: str = "Tell me about money.") -> GuardView:
    return GuardView(request=request, context=(), step=step)


HARMLESS = view("Banks keep deposits in accounts.")
WEAPON = view("Here is how to make a nerve agent.")
LAUNDER = view("Then launder the cash through a shell company.")


@dataclass
class Servers:
    llama_guard: FakeLlamaGuard
    judge: FakeJudge
    judge_app: FakeOpenAIApp
    llama_guard_url: str
    judge_url: str

    def stage(self, kind: str) -> dict[str, Any]:
        if kind == "llama-guard":
            return {"kind": "llama-guard", "url": self.llama_guard_url}
        return {"kind": "llm-judge", "model": "openai/judge", "url": self.judge_url,
                "api_key": "sk-judge"}


@contextmanager
def servers(judge: FakeJudge | None = None) -> Iterator[Servers]:
    # The Llama Guard fake knows weapons but not money laundering; the judge knows both.
    llama_guard = FakeLlamaGuard(rules={"nerve agent": "S9"})
    judge = judge or FakeJudge(rules={"nerve agent": "S9", "launder": "S2"})
    judge_app = create_fake_openai_app(responder=judge.respond, models=("judge",),
                                       api_key="sk-judge")
    with LoopbackServers() as loopback:
        lg_url = loopback.serve(llama_guard.app(), lifespan="off")
        judge_url = loopback.serve(judge_app)
        yield Servers(llama_guard, judge, judge_app, lg_url + "/v1", judge_url + "/v1")


@asynccontextmanager
async def cascade(first: dict[str, Any], second: dict[str, Any],
                  band: tuple[float, float] = (0.2, 0.8)) -> AsyncIterator[CascadeGuard]:
    config = GuardConfig(kind="cascade", compliance_cues=False,
                         options={"first": first, "second": second, "band": list(band)})
    guard = build_guard(config)
    assert isinstance(guard, CascadeGuard)
    try:
        yield guard
    finally:
        await guard.aclose()


async def test_confident_first_verdicts_are_final() -> None:
    with servers() as s:
        async with cascade(s.stage("llama-guard"), s.stage("llm-judge")) as guard:
            safe = await guard.check(HARMLESS)
            unsafe = await guard.check(WEAPON)
            stats = guard.stats()
    assert not safe.unsafe and safe.score == pytest.approx(0.01)
    assert unsafe.unsafe and unsafe.categories == ("S9",) and unsafe.score == pytest.approx(0.98)
    assert safe.extra["cascade"] == unsafe.extra["cascade"] == "first"
    assert safe.extra["first_guard"] == "llama-guard"
    assert s.judge.seen == []  # never asked
    assert stats == {"checks": 2, "escalated": 0, "first_errors": 0}


async def test_uncertain_scores_escalate_and_the_second_decides() -> None:
    with servers() as s:
        s.llama_guard.p_unsafe_no_match = 0.4  # unsure about anything it has no rule for
        async with cascade(s.stage("llama-guard"), s.stage("llm-judge")) as guard:
            launder = await guard.check(LAUNDER)
            harmless = await guard.check(HARMLESS)
            weapon = await guard.check(WEAPON)  # 0.98: confident, not escalated
            stats = guard.stats()
    # The first stage alone would have let the laundering step through (0.4 < 0.5).
    assert launder.unsafe and launder.categories == ("S2",)
    assert launder.extra["cascade"] == "second" and launder.extra["first_score"] == "0.4000"
    assert launder.extra["second_guard"] == "llm-judge" and launder.score == 0.95
    # The audit log keeps both answers: the judge's as the verdict's, Llama Guard's beside it.
    assert launder.raw is not None and '"unsafe"' in launder.raw
    assert launder.extra["first_raw"] == "\n\nsafe"
    assert not harmless.unsafe and harmless.extra["cascade"] == "second"
    assert weapon.unsafe and weapon.extra["cascade"] == "first"
    assert s.judge.seen == [LAUNDER.step, HARMLESS.step]
    assert stats == {"checks": 3, "escalated": 2, "first_errors": 0}


async def test_band_edges() -> None:
    """Escalation is for scores in [low, high): low escalates, high does not."""
    with servers() as s:
        s.llama_guard.p_unsafe_no_match = 0.4
        s.llama_guard.p_unsafe_match = 0.6
        async with cascade(s.stage("llama-guard"), s.stage("llm-judge"),
                           band=(0.4, 0.6)) as guard:
            at_low = await guard.check(HARMLESS)
            at_high = await guard.check(WEAPON)
    assert at_low.extra["cascade"] == "second"
    assert at_high.extra["cascade"] == "first" and at_high.unsafe  # 0.6 >= threshold 0.5


async def test_a_first_verdict_without_a_score_escalates() -> None:
    judge = FakeJudge(rules={"launder": "S2"}, score=None)
    with servers(judge) as s:
        async with cascade(s.stage("llm-judge"), s.stage("llama-guard")) as guard:
            verdict = await guard.check(WEAPON)
    assert judge.seen == [WEAPON.step]
    assert verdict.extra["cascade"] == "second" and verdict.extra["first_score"] == "none"
    assert verdict.unsafe and verdict.categories == ("S9",)  # Llama Guard's verdict
    assert len(s.llama_guard.requests) == 1


async def test_a_failing_first_stage_escalates() -> None:
    with servers() as s:
        s.llama_guard.status = 500
        async with cascade(s.stage("llama-guard"), s.stage("llm-judge")) as guard:
            verdicts = await guard.check_many([LAUNDER, HARMLESS])
            stats = guard.stats()
    assert [verdict.unsafe for verdict in verdicts] == [True, False]
    assert all(verdict.extra["first_error"] == "true" for verdict in verdicts)
    assert stats == {"checks": 2, "escalated": 2, "first_errors": 2}


async def test_check_many_escalates_only_the_uncertain_and_keeps_order() -> None:
    with servers() as s:
        s.llama_guard.p_unsafe_no_match = 0.3
        s.llama_guard.rules["deposits"] = "S2"  # confidently (0.98) unsafe for the first stage
        async with cascade(s.stage("llama-guard"), s.stage("llm-judge")) as guard:
            views = [HARMLESS, LAUNDER, WEAPON, view("The weather is fine today.")]
            verdicts = await guard.check_many(views)
    assert [v.extra["cascade"] for v in verdicts] == ["first", "second", "first", "second"]
    assert [v.unsafe for v in verdicts] == [True, True, True, False]
    assert sorted(s.judge.seen) == sorted([LAUNDER.step, "The weather is fine today."])


async def test_stats_are_exported_as_prometheus_counters() -> None:
    with servers() as s:
        s.llama_guard.p_unsafe_no_match = 0.5
        async with cascade(s.stage("llama-guard"), s.stage("llm-judge")) as guard:
            wrapped = build_guard(GuardConfig(kind="cascade", options={
                "first": s.stage("llama-guard"), "second": s.stage("llm-judge")}))
            try:
                # build_guard wraps it (compliance cues); the counters are still found.
                assert find_stats(wrapped) is not None
            finally:
                await wrapped.aclose()
            found = find_stats(guard)
            assert found is guard
            registry = CollectorRegistry()
            registry.register(GuardStatsCollector(found))
            await guard.check_many([HARMLESS, WEAPON, LAUNDER])
            text = generate_latest(registry).decode()
    assert 'guardrail_guard_stats_total{guard="cascade",stat="checks"} 3.0' in text
    assert 'guardrail_guard_stats_total{guard="cascade",stat="escalated"} 2.0' in text
    assert find_stats(object()) is None


LG = {"kind": "llama-guard", "url": "http://127.0.0.1:9/v1"}  # never called


async def test_the_embedded_guard_as_the_cheap_first_stage() -> None:
    """The intended deployment: the CPU guard first, a model guard for what it is unsure of."""
    with servers() as s:
        first = {"kind": "embedded"}
        async with cascade(first, s.stage("llm-judge"), band=(0.0, 0.0)) as guard:
            await asyncio.to_thread(guard.warm_up)  # loads the encoder, as the server does
            never = await guard.check_many([HARMLESS, WEAPON])
        async with cascade(first, s.stage("llm-judge"), band=(0.0, 1.0)) as guard:
            always = await guard.check_many([HARMLESS, WEAPON])
    assert [verdict.extra["cascade"] for verdict in never] == ["first", "first"]
    assert all(verdict.extra["first_guard"] == "embedded" for verdict in never)
    assert all(verdict.score is not None and 0 <= verdict.score <= 1 for verdict in never)
    assert [verdict.extra["cascade"] for verdict in always] == ["second", "second"]
    assert [verdict.unsafe for verdict in always] == [False, True]  # the judge decided
    assert sorted(s.judge.seen) == sorted([HARMLESS.step, WEAPON.step])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, r"^guard\.options\.second: Field required"),
        ({"first": LG, "second": {"kind": "none"}}, r"^guard\.options\.second\.kind: 'none'"),
        ({"first": LG, "second": {"kind": "llm-judge"}},
         r"^guard\.options\.second\.model: the llm-judge guard needs"),
        ({"second": {"kind": "llama-guard", "url": "http://x/v1"}, "band": [0.8, 0.2]},
         r"^guard\.options \(band\): .*0 <= low <= high <= 1"),
        ({"second": {"kind": "llama-guard", "url": "http://x/v1"}, "band": [0.1]},
         r"^guard\.options\.band"),
        ({"second": {"kind": "llama-guard", "url": "http://x/v1"},
          "first": {"kind": "llama-guard", "url": "http://x/v1", "threshold": 2}},
         r"^guard\.options\.first\.threshold: "),
        ({"second": {"kind": "llama-guard", "url": "http://x/v1"}, "thirds": {}},
         r"^guard\.options\.thirds: Extra inputs"),
    ],
)
def test_config_errors_name_the_field(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CascadeGuard(GuardConfig(kind="cascade", options=options))


def test_an_unknown_stage_kind_is_reported_with_the_known_ones() -> None:
    with pytest.raises(UnknownBackendError, match=r"^guard\.options\.second: unknown guard"):
        CascadeGuard(GuardConfig(kind="cascade", options={"first": LG, "second": {"kind": "nope"}}))
