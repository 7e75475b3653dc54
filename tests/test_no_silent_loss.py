"""No silent loss: an exception nobody foresaw, raised while a response is produced (by a
corrector, a guard, the upstream's parser), ends in an OpenAI-shaped error the client can read
and a stored case that names it, streamed or not. Through the real proxy on loopback."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from guardrail.config import CorrectionConfig, GuardConfig
from guardrail.correctors import CORRECTORS
from guardrail.correctors.base import CorrectionContext, CorrectionPlan
from guardrail.guards import GUARDS
from guardrail.guards.base import GuardView, Verdict
from guardrail.upstreams import chunks
from tests.fakes.openai_server import FakeReply
from tests.proxy_harness import Proxy, running_proxy, sse_events, streamed_text

UNSAFE = FakeReply(
    reasoning="The user asks about a pipe bomb. I will explain how to build the pipe bomb now.",
    answer="Here it is.",
)
SAFE = FakeReply(reasoning="The user asks for a fruit salad. Apples and pears are good.",
                 answer="Cut apples and pears.")


class ExplodingCorrector:
    name = "exploding"

    def __init__(self, config: CorrectionConfig) -> None:
        del config

    async def plan(self, context: CorrectionContext) -> CorrectionPlan:
        raise RuntimeError("corrector bug")

    async def aclose(self) -> None:
        return None


class ExplodingGuard:
    name = "exploding-guard"

    def __init__(self, config: GuardConfig) -> None:
        del config

    async def check(self, view: GuardView) -> Verdict:
        raise KeyError("guard bug")

    async def check_many(self, views: Sequence[GuardView]) -> list[Verdict]:
        raise KeyError("guard bug")

    async def aclose(self) -> None:
        return None


CORRECTORS.register("exploding")(ExplodingCorrector)
GUARDS.register("exploding-guard")(ExplodingGuard)


def read_stream(proxy: Proxy) -> tuple[list[Any], dict[str, Any]]:
    response, raw = proxy.stream_raw("tell me")
    assert response.status_code == 200
    events = sse_events(raw)
    assert events[-1] == "[DONE]", "a stream always ends with [DONE]"
    return events, proxy.case(response.headers["x-guardrail-case-id"])


def error_event(events: list[Any]) -> dict[str, Any]:
    errors = [event for event in events if isinstance(event, dict) and "error" in event]
    assert len(errors) == 1, events
    error: dict[str, Any] = errors[0]["error"]
    return error


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_a_corrector_that_raises(tmp_path: Path, stream: bool) -> None:
    with running_proxy(tmp_path, UNSAFE,
                       overrides={"correction": {"strategy": "exploding"}}) as proxy:
        if stream:
            events, case = read_stream(proxy)
            error = error_event(events)
            assert error["type"] == "server_error" and error["code"] == "internal_error"
            assert "RuntimeError" in error["message"]
            assert "pipe bomb" not in streamed_text(events)[0], "nothing flagged leaked"
        else:
            response = proxy.chat("tell me")
            assert response.status_code == 500
            body = response.json()
            assert body["error"]["code"] == "internal_error", body
            case = proxy.case(response.headers["x-guardrail-case-id"])
    assert case["status"] == "complete"
    assert case["action"] == "error"
    assert case["error"] == "InternalError: RuntimeError: corrector bug"
    assert case["flagged"], "the flag that led to the corrector is kept"


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
@pytest.mark.parametrize("on_error", ["block", "allow"])
def test_a_guard_that_raises(tmp_path: Path, stream: bool, on_error: str) -> None:
    overrides = {"guard": {"kind": "exploding-guard", "on_error": on_error,
                           "compliance_cues": False}}
    with running_proxy(tmp_path, SAFE, overrides=overrides) as proxy:
        if stream:
            events, case = read_stream(proxy)
            reasoning, content = streamed_text(events)
        else:
            response = proxy.chat("tell me")
            assert response.status_code == 200, response.text
            message = response.json()["choices"][0]["message"]
            reasoning, content = message.get("reasoning_content") or "", message["content"]
            case = proxy.case(response.headers["x-guardrail-case-id"])
    assert case["status"] == "complete"
    judged = [step for step in case["steps"] if step["error"]]
    assert judged and all(step["error"] == "KeyError: 'guard bug'" for step in judged)
    if on_error == "block":
        assert case["action"] == "error" and case["error"] == "guard: KeyError: 'guard bug'"
        assert (reasoning, content) == ("", "")
    else:
        assert case["action"] == "pass" and case["error"] is None
        assert (reasoning, content) == (SAFE.reasoning, SAFE.answer)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_the_upstream_parser_raising(tmp_path: Path, stream: bool,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls = itertools.count()
    feed = chunks.ChunkMapper.feed

    def failing_feed(self: chunks.ChunkMapper, chunk: dict[str, Any]) -> Any:
        if next(calls) == 5:
            raise ZeroDivisionError("parser bug")
        return feed(self, chunk)

    monkeypatch.setattr(chunks.ChunkMapper, "feed", failing_feed)
    with running_proxy(tmp_path, SAFE, guard="none") as proxy:
        if stream:
            events, case = read_stream(proxy)
            error = error_event(events)
            assert error["type"] == "upstream_error", error
            assert "ZeroDivisionError" in error["message"]
        else:
            response = proxy.chat("tell me")
            assert response.status_code == 502, response.text
            assert "ZeroDivisionError" in response.json()["error"]["message"]
            case = proxy.case(response.headers["x-guardrail-case-id"])
    assert case["status"] == "complete"
    assert case["action"] == "error"
    assert case["error"] == "UpstreamStreamBroken: upstream failed: ZeroDivisionError: parser bug"
