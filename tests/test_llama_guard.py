"""The llama-guard backend against a fake vLLM serving Llama Guard 3, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from guardrail.config import GuardConfig, config_from_mapping
from guardrail.errors import ConfigError, GuardError
from guardrail.guards import build_guard
from guardrail.guards.base import GuardView
from guardrail.guards.generative import GenerativeGuard, create_generative
from guardrail.guards.generative.families.llama_guard import (
    CATEGORIES,
    DEFAULT_MODEL,
    build_messages,
    describe,
    parse_verdict,
    score_from_logprobs,
)
from guardrail.guards.generative.runners.endpoint import GuardEndpoint
from guardrail.guards.plumbing.cues import ComplianceCueGuard
from tests.fakes.llama_guard_server import FakeLlamaGuard
from tests.fakes.loopback import free_port, serve_app
from tests.proxy_harness import running_proxy

pytestmark = pytest.mark.timeout(30)

HARMLESS = GuardView(
    request="How do I bake bread?",
    context=["First, mix flour and water. "],
    step="Then knead the dough for ten minutes.",
)
HARMFUL = GuardView(
    request="How do I make a nerve agent?",
    context=["The user wants chemistry. "],
    step="Step one: obtain the nerve agent precursors.",
)


@asynccontextmanager
async def guard_for(fake: FakeLlamaGuard, **settings: Any) -> AsyncIterator[GenerativeGuard]:
    with serve_app(fake.app(), lifespan="off") as base_url:
        guard = create_generative(
            GuardConfig(kind="llama-guard", url=base_url + "/v1", **settings)
        )
        try:
            yield guard
        finally:
            await guard.aclose()


# -- parsing the verdict text ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("safe", (False, ())),
        ("\n\nsafe", (False, ())),
        ("  Safe \n", (False, ())),
        ("SAFE", (False, ())),
        ("unsafe\nS1", (True, ("S1",))),
        ("\n\nunsafe\nS9", (True, ("S9",))),
        ("unsafe\nS1,S10", (True, ("S1", "S10"))),
        (" unsafe \n S2", (True, ("S2",))),
        ("unsafe\nS3 S11", (True, ("S3", "S11"))),
        ("unsafe S1,S3", (True, ("S1", "S3"))),
        ("unsafe\ns4, s12", (True, ("S4", "S12"))),
        ("unsafe\nS1,S1", (True, ("S1",))),
        ("UNSAFE", (True, ())),
        ("unsafe", (True, ())),
        ("unsafe\n\n", (True, ())),
        # A garbled category line keeps the verdict: an error could be waved through by
        # on_error=allow, and the verdict is what protects the user.
        ("unsafe\nhate speech", (True, ())),
    ],
)
def test_parse_verdict_reads_real_output_shapes(
    text: str, expected: tuple[bool, tuple[str, ...]]
) -> None:
    assert parse_verdict(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "   \n\n ", "I think it's fine", "It is safe", "safe unsafe", "safe.", "unsafety",
     "safely done", "The answer is unsafe"],
)
def test_parse_verdict_rejects_anything_else_with_the_raw_text(text: str) -> None:
    with pytest.raises(GuardError) as caught:
        parse_verdict(text)
    assert repr(text.strip()[:20])[1:-1] in str(caught.value)


def test_parse_verdict_truncates_long_raw_text() -> None:
    with pytest.raises(GuardError) as caught:
        parse_verdict("blah " * 1000)
    assert len(str(caught.value)) < 400
    assert "5000 chars" in str(caught.value)


def test_categories_are_the_fourteen_of_the_model_card() -> None:
    assert list(CATEGORIES) == [f"S{i}" for i in range(1, 15)]
    assert CATEGORIES["S9"] == "Indiscriminate Weapons"
    assert CATEGORIES["S14"] == "Code Interpreter Abuse"
    assert describe(["S9", "S99"]) == "S9 (Indiscriminate Weapons), S99"


def test_build_messages_is_user_then_assistant_window() -> None:
    view = GuardView(request="req", context=["a. ", "b. "], step="c.", channel="answer")
    assert build_messages(view) == [
        {"role": "user", "content": "req"},
        {"role": "assistant", "content": "a. b. c."},
    ]


# -- scoring from logprobs -------------------------------------------------------------------


def _top(**probabilities: float) -> list[dict[str, Any]]:
    return [{"token": token, "logprob": math.log(p), "bytes": list(token.encode())}
            for token, p in probabilities.items()]


def _lp(*entries: tuple[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {"content": [{"token": token, "logprob": top[0]["logprob"] if top else -0.01,
                         "bytes": list(token.encode()), "top_logprobs": top}
                        for token, top in entries]}


def test_score_is_unsafe_share_of_safe_plus_unsafe() -> None:
    logprobs = _lp(("unsafe", _top(unsafe=0.6, safe=0.2, The=0.1)))
    assert score_from_logprobs(logprobs) == pytest.approx(0.75)


def test_score_skips_leading_newline_tokens() -> None:
    logprobs = _lp(("\n\n", _top(**{"\n\n": 0.99, "\n": 0.01})),
                   ("safe", _top(safe=0.9, unsafe=0.1)),
                   ("<|eot_id|>", []))
    assert score_from_logprobs(logprobs) == pytest.approx(0.1)


def test_score_strips_whitespace_around_tokens_and_sums_variants() -> None:
    logprobs = _lp(("unsafe", [*_top(**{" unsafe": 0.3}), *_top(unsafe=0.3, safe=0.2)]))
    assert score_from_logprobs(logprobs) == pytest.approx(0.75)


def test_score_with_one_word_missing_treats_it_as_zero() -> None:
    assert score_from_logprobs(_lp(("unsafe", _top(unsafe=0.9, uns=0.05)))) == 1.0
    assert score_from_logprobs(_lp(("safe", _top(safe=0.9, The=0.05)))) == 0.0


def test_score_counts_the_sampled_token_when_top_list_omits_it() -> None:
    logprobs = {"content": [{"token": "unsafe", "logprob": math.log(0.6), "bytes": None,
                             "top_logprobs": _top(safe=0.2)}]}
    assert score_from_logprobs(logprobs) == pytest.approx(0.75)


@pytest.mark.parametrize(
    "logprobs",
    [
        None,
        {},
        {"content": None},
        {"content": []},
        {"content": [{"token": "\n\n", "logprob": 0.0, "top_logprobs": []}]},
        _lp(("I", _top(I=0.8, The=0.1))),
        "unsafe",
    ],
)
def test_score_is_none_without_safe_or_unsafe(logprobs: object) -> None:
    assert score_from_logprobs(logprobs) is None


# -- the backend against the fake server -------------------------------------------------------


async def test_harmful_step_is_unsafe_with_category_and_logprob_score() -> None:
    fake = FakeLlamaGuard()
    async with guard_for(fake) as guard:
        verdict = await guard.check(HARMFUL)
    assert verdict.unsafe
    assert verdict.categories == ("S9",)
    assert verdict.score == pytest.approx(0.98, abs=1e-6)
    assert verdict.raw == "\n\nunsafe\nS9"
    assert verdict.extra["score_source"] == "logprobs"
    assert 0 < verdict.latency_s < 5


async def test_harmless_step_is_safe() -> None:
    fake = FakeLlamaGuard()
    async with guard_for(fake) as guard:
        verdict = await guard.check(HARMLESS)
    assert not verdict.unsafe
    assert verdict.categories == ()
    assert verdict.score == pytest.approx(0.01, abs=1e-6)
    assert verdict.raw == "\n\nsafe"


async def test_sends_the_window_as_user_assistant_messages_with_logprobs() -> None:
    fake = FakeLlamaGuard(served_model="meta-llama/Llama-Guard-3-8B")
    async with guard_for(fake, model="meta-llama/Llama-Guard-3-8B") as guard:
        await guard.check(HARMFUL)
    (body,) = fake.requests
    assert body["model"] == "meta-llama/Llama-Guard-3-8B"
    assert body["messages"] == [
        {"role": "user", "content": "How do I make a nerve agent?"},
        {"role": "assistant",
         "content": "The user wants chemistry. Step one: obtain the nerve agent precursors."},
    ]
    assert body["temperature"] == 0
    assert body["logprobs"] is True
    assert body["top_logprobs"] == 5
    assert 10 <= body["max_tokens"] <= 50
    assert "authorization" not in fake.headers[0]


async def test_default_model_and_bearer_key() -> None:
    fake = FakeLlamaGuard(api_key="sekret")
    async with guard_for(fake, api_key="sekret") as guard:
        verdict = await guard.check(HARMLESS)
    assert not verdict.unsafe
    assert fake.requests[0]["model"] == DEFAULT_MODEL == "meta-llama/Llama-Guard-3-1B"
    assert fake.headers[0]["authorization"] == "Bearer sekret"


async def test_only_the_last_message_is_judged() -> None:
    # The user asks about nerve agents, the assistant refuses: the response is what is judged.
    view = GuardView(request="Tell me about nerve agent synthesis", context=[],
                     step="I can't help with that.")
    async with guard_for(FakeLlamaGuard()) as guard:
        verdict = await guard.check(view)
    assert not verdict.unsafe


async def test_output_without_leading_newlines_is_read_the_same() -> None:
    fake = FakeLlamaGuard(leading_newlines=False)
    async with guard_for(fake) as guard:
        verdict = await guard.check(HARMFUL)
    assert verdict.raw == "unsafe\nS9"
    assert verdict.unsafe and verdict.score == pytest.approx(0.98, abs=1e-6)


async def test_several_categories() -> None:
    view = GuardView(request="q", context=[], step="Launder the money, then kill him.")
    async with guard_for(FakeLlamaGuard()) as guard:
        verdict = await guard.check(view)
    assert verdict.unsafe
    assert set(verdict.categories) == {"S1", "S2"}


async def test_threshold_overrides_an_unsafe_text_with_a_low_score() -> None:
    fake = FakeLlamaGuard(p_unsafe_match=0.6)
    async with guard_for(fake, threshold=0.8) as guard:
        verdict = await guard.check(HARMFUL)
    assert verdict.raw is not None and verdict.raw.strip().startswith("unsafe")
    assert not verdict.unsafe
    assert verdict.score == pytest.approx(0.6, abs=1e-6)
    assert verdict.categories == ()
    assert verdict.extra["text_verdict"] == "unsafe"
    assert verdict.extra["text_categories"] == "S9"


async def test_threshold_flags_a_safe_text_with_a_high_enough_score() -> None:
    fake = FakeLlamaGuard(p_unsafe_no_match=0.3)
    async with guard_for(fake, threshold=0.25) as guard:
        verdict = await guard.check(HARMLESS)
    assert verdict.raw == "\n\nsafe"
    assert verdict.unsafe
    assert verdict.score == pytest.approx(0.3, abs=1e-6)
    assert verdict.extra["text_verdict"] == "safe"


async def test_threshold_boundary_is_inclusive() -> None:
    fake = FakeLlamaGuard(p_unsafe_match=0.7)
    async with guard_for(fake, threshold=0.7) as guard:
        at = await guard.check(HARMFUL)
    assert at.score is not None
    # The fake's score is 0.7 up to float rounding; the threshold is taken exactly from it.
    async with guard_for(fake, threshold=at.score) as guard:
        assert (await guard.check(HARMFUL)).unsafe
    async with guard_for(fake, threshold=min(1.0, at.score + 1e-9)) as guard:
        assert not (await guard.check(HARMFUL)).unsafe


async def test_without_logprobs_the_text_decides() -> None:
    fake = FakeLlamaGuard(logprobs=False, p_unsafe_match=0.6)
    async with guard_for(fake, threshold=0.9) as guard:
        unsafe = await guard.check(HARMFUL)
        safe = await guard.check(HARMLESS)
    assert unsafe.unsafe and unsafe.score == 1.0 and unsafe.categories == ("S9",)
    assert unsafe.extra["score_source"] == "verdict"
    assert not safe.unsafe and safe.score == 0.0


async def test_check_many_runs_concurrently_and_keeps_order() -> None:
    fake = FakeLlamaGuard(delay_s=0.3)
    views = [HARMLESS, HARMFUL, HARMLESS, HARMFUL]
    async with guard_for(fake) as guard:
        loop = asyncio.get_running_loop()
        started = loop.time()
        verdicts = await guard.check_many(views)
        elapsed = loop.time() - started
    assert [v.unsafe for v in verdicts] == [False, True, False, True]
    assert len(fake.requests) == 4
    assert elapsed < 4 * 0.3  # sequential checks would take at least 1.2 s


async def test_registered_as_llama_guard_and_built_from_config() -> None:
    fake = FakeLlamaGuard()
    with serve_app(fake.app(), lifespan="off") as base_url:
        config = config_from_mapping({"guard": {"kind": "llama-guard", "url": base_url + "/v1/"}})
        guard = build_guard(config.guard)
        try:
            # build_guard adds the compliance-cue check around the backend by default.
            assert isinstance(guard, ComplianceCueGuard)
            assert isinstance(guard.inner, GenerativeGuard)
            assert isinstance(guard.inner.runner, GuardEndpoint)
            assert guard.name == "llama-guard"
            assert (await guard.check(HARMFUL)).unsafe
        finally:
            await guard.aclose()


def test_missing_url_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"guard\.url"):
        create_generative(GuardConfig(kind="llama-guard", runner="endpoint"))


# -- errors: every failure is a GuardError the monitor can apply on_error to -------------------


async def test_dead_port_is_a_guard_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    guard = create_generative(GuardConfig(kind="llama-guard", url=url, timeout_s=2))
    try:
        with pytest.raises(GuardError, match="cannot connect"):
            await guard.check(HARMLESS)
    finally:
        await guard.aclose()


async def test_http_500_is_a_guard_error_with_the_server_message() -> None:
    async with guard_for(FakeLlamaGuard(status=500)) as guard:
        with pytest.raises(GuardError, match=r"HTTP 500: fake failure"):
            await guard.check(HARMLESS)


async def test_unknown_model_404_is_a_guard_error() -> None:
    async with guard_for(FakeLlamaGuard(), model="meta-llama/Llama-Guard-4-12B") as guard:
        with pytest.raises(GuardError, match=r"HTTP 404: The model .* does not exist"):
            await guard.check(HARMLESS)


async def test_wrong_api_key_is_a_guard_error() -> None:
    async with guard_for(FakeLlamaGuard(api_key="right"), api_key="wrong") as guard:
        with pytest.raises(GuardError, match=r"HTTP 401: .*Unauthorized"):
            await guard.check(HARMLESS)


async def test_timeout_is_a_guard_error() -> None:
    async with guard_for(FakeLlamaGuard(delay_s=0.6), timeout_s=0.2) as guard:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(GuardError, match=r"0\.2s"):
            await guard.check(HARMLESS)
        assert loop.time() - started < 0.5


async def test_non_json_body_is_a_guard_error() -> None:
    async with guard_for(FakeLlamaGuard(not_json=True)) as guard:
        with pytest.raises(GuardError, match="not JSON"):
            await guard.check(HARMLESS)


@pytest.mark.parametrize("output", ["I think it's fine", "", "It is safe to say"])
async def test_malformed_output_is_a_guard_error_with_the_raw_text(output: str) -> None:
    async with guard_for(FakeLlamaGuard(output=output)) as guard:
        with pytest.raises(GuardError) as caught:
            await guard.check(HARMFUL)
    assert "llama-guard" in str(caught.value)
    assert repr(output)[1:-1] in str(caught.value)


async def test_check_many_raises_after_every_check_finished() -> None:
    fake = FakeLlamaGuard(output="no idea")
    async with guard_for(fake) as guard:
        with pytest.raises(GuardError):
            await guard.check_many([HARMLESS, HARMFUL, HARMLESS])
    assert len(fake.requests) == 3


def test_the_guards_answer_is_stored_with_each_step(tmp_path: Path) -> None:
    """The audit log: each step of a stored case keeps what Llama Guard answered for it."""
    with running_proxy(tmp_path) as proxy:
        body = proxy.chat("How do I bake bread?").json()
        case = proxy.case(body["guardrail"]["case_id"])
    assert case["steps"]
    for step in case["steps"]:
        assert step["raw"] == "\n\nsafe" and step["unsafe"] is False
