"""Faults, through the real proxy on loopback: every way the model upstream or the guard can fail
ends in a clean OpenAI-shaped error (or the ``guard.on_error`` behaviour), a stored case naming
the error, a response in bounded time, no task left running in the proxy, and a proxy that
serves the next request normally.

"No task left running" is checked on the proxy's own event loop: the app is wrapped in a probe
that learns the loop, and the tasks on it are counted before and after the fault.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest

from guardrail.config import Config
from server.app import create_app
from tests import proxy_harness
from tests.fakes.llama_guard_server import FakeLlamaGuard
from tests.fakes.loopback import free_port
from tests.fakes.openai_server import FakeReply, create_fake_openai_app
from tests.proxy_harness import Proxy, running_proxy, sse_events, streamed_text

REASONING = (
    "The user asks for a fruit salad. Apples and pears are a good start. "
    "Then a squeeze of lemon keeps them fresh."
)
ANSWER = "Cut apples and pears, add lemon juice, and serve cold."
GOOD = FakeReply(reasoning=REASONING, answer=ANSWER)
BOUND_S = 5.0
"""Every faulty response must end within this (the timeouts involved are all under 1 s)."""


class LoopProbe:
    """An ASGI wrapper that remembers the event loop the proxy runs on."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)

    def tasks(self) -> int:
        """Tasks alive on the proxy's loop, not counting the one that counts them."""
        assert self.loop is not None

        async def count() -> int:
            return len(asyncio.all_tasks()) - 1

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(5)

    def settles_to(self, baseline: int, within_s: float = 3.0) -> int:
        deadline = time.monotonic() + within_s
        while (now := self.tasks()) > baseline and time.monotonic() < deadline:
            time.sleep(0.02)
        return now


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[LoopProbe]]:
    """Every app running_proxy creates in this test gets a probe (appended in order)."""
    probes: list[LoopProbe] = []

    def probed_app(config: Config) -> LoopProbe:
        wrapped = LoopProbe(create_app(config))
        probes.append(wrapped)
        return wrapped

    monkeypatch.setattr(proxy_harness, "create_app", probed_app)
    yield probes


def faulty_first(fault: FakeReply) -> Any:
    """A responder: messages saying "fault" get ``fault``, everything else the good reply."""

    def respond(body: dict[str, Any]) -> FakeReply:
        text = str(body.get("messages", [{}])[-1].get("content", ""))
        return fault if "fault" in text else GOOD

    return respond


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and error["type"]
    return error


def timed_request(proxy: Proxy, stream: bool) -> tuple[httpx.Response, bytes, float]:
    start = time.monotonic()
    if stream:
        response, raw = proxy.stream_raw("fault please")
    else:
        response = proxy.chat("fault please")
        raw = response.content
    return response, raw, time.monotonic() - start


def assert_next_request_is_normal(proxy: Proxy) -> None:
    body = proxy.chat("a normal question").json()
    assert body["choices"][0]["message"]["content"] == ANSWER
    _, raw = proxy.stream_raw("a normal question")
    assert streamed_text(sse_events(raw)) == (REASONING, ANSWER)


def assert_broken_stream(proxy: Proxy, response: httpx.Response, raw: bytes,
                         stream: bool) -> list[Any]:
    """A stream that broke off: an error event then ``[DONE]`` (streamed) or a 502, and the case
    stored as an error. Returns the SSE events (empty when not streamed)."""
    events: list[Any] = []
    if stream:
        assert response.status_code == 200
        events = sse_events(raw)
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        case_id = events[-2]["guardrail"]["case_id"]
    else:
        error = assert_openai_error(response, 502)
        case_id = response.headers["x-guardrail-case-id"]
    assert error["type"] == "upstream_error" and error["code"] == "upstream_stream_broken"
    case = stored_case(proxy, case_id)
    assert case["action"] == "error" and "UpstreamStreamBroken" in case["error"]
    return events


def stored_case(proxy: Proxy, case_id: str) -> dict[str, Any]:
    # The final record (status complete), polled briefly as a client would: never the
    # in-progress one a stream stores as it starts.
    return proxy.case(case_id)


# -- the model upstream --------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_upstream_refusing_connections(
    tmp_path: Path, probe: list[LoopProbe], stream: bool
) -> None:
    overrides = {"upstream": {"url": f"http://127.0.0.1:{free_port()}/v1",
                              "connect_timeout_s": 1}}
    with running_proxy(tmp_path, guard="none", overrides=overrides) as proxy:
        baseline = probe[0].tasks()
        for _ in range(2):  # and again: a refused upstream does not wedge the proxy
            response, _, elapsed = timed_request(proxy, stream)
            assert elapsed < BOUND_S
            error = assert_openai_error(response, 502)
            assert error["type"] == "upstream_error"
            assert error["code"] == "upstream_unavailable"
            case = stored_case(proxy, response.headers["x-guardrail-case-id"])
            assert case["action"] == "error" and "UpstreamUnavailable" in case["error"]
        assert probe[0].settles_to(baseline) == baseline
        assert proxy.client.get("/healthz").status_code == 200
        label = str(stream).lower()
        counted = f'guardrail_requests_total{{status="error",stream="{label}"}} 2.0'
        assert counted in proxy.client.get("/metrics").text


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_upstream_answering_500(tmp_path: Path, probe: list[LoopProbe], stream: bool) -> None:
    fault = FakeReply(http_status=500, error_message="CUDA out of memory")
    upstream = create_fake_openai_app(responder=faulty_first(fault))
    with running_proxy(tmp_path, guard="none", upstream_app=upstream) as proxy:
        baseline = probe[0].tasks()
        response, _, elapsed = timed_request(proxy, stream)
        assert elapsed < BOUND_S
        error = assert_openai_error(response, 502)
        assert error["type"] == "upstream_error" and error["code"] == "upstream_http_error"
        assert "CUDA out of memory" in error["message"]
        case = stored_case(proxy, response.headers["x-guardrail-case-id"])
        assert case["action"] == "error" and "CUDA out of memory" in case["error"]
        # A stream's in-progress write starts before the upstream answers: it must land before
        # the final record, never over it.
        assert case["status"] == "complete"
        assert probe[0].settles_to(baseline) == baseline
        assert_next_request_is_normal(proxy)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_upstream_stalling_past_the_read_timeout(
    tmp_path: Path, probe: list[LoopProbe], stream: bool
) -> None:
    # The first event comes at once, the next only after 3 s: the 0.5 s read timeout fires
    # mid-stream, long before the fake would go on.
    fault = FakeReply(reasoning=REASONING, answer=ANSWER, chunk_delay_s=3.0)
    upstream = create_fake_openai_app(responder=faulty_first(fault))
    overrides = {"upstream": {"read_timeout_s": 0.5}}
    with running_proxy(tmp_path, guard="none", upstream_app=upstream,
                       overrides=overrides) as proxy:
        baseline = probe[0].tasks()
        response, raw, elapsed = timed_request(proxy, stream)
        assert elapsed < 2.5, f"the 0.5 s read timeout took {elapsed:.2f} s"
        if stream:
            assert response.status_code == 200  # the stream had started
            events = sse_events(raw)
            assert events[-1] == "[DONE]"
            error = events[-2]["error"]
            case_id = events[-2]["guardrail"]["case_id"]
        else:
            error = assert_openai_error(response, 504)
            case_id = response.headers["x-guardrail-case-id"]
        assert error["type"] == "upstream_error" and error["code"] == "upstream_timeout"
        case = stored_case(proxy, case_id)
        assert case["action"] == "error" and "UpstreamTimeout" in case["error"]
        # The proxy hung up on the stalled upstream rather than waiting it out.
        record = proxy.upstream.chat_requests[0]
        assert record.ended.wait(2) and record.disconnected and not record.completed
        assert probe[0].settles_to(baseline) == baseline
        assert_next_request_is_normal(proxy)


@pytest.mark.parametrize("die_mode", ["reset", "eof"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_upstream_dying_mid_stream(
    tmp_path: Path, probe: list[LoopProbe], stream: bool, die_mode: Literal["reset", "eof"],
) -> None:
    fault = FakeReply(reasoning=REASONING, answer=ANSWER, die_after_chunks=8,
                      die_mode=die_mode)
    upstream = create_fake_openai_app(responder=faulty_first(fault))
    with running_proxy(tmp_path, guard="none", upstream_app=upstream) as proxy:
        baseline = probe[0].tasks()
        response, raw, elapsed = timed_request(proxy, stream)
        assert elapsed < BOUND_S
        events = assert_broken_stream(proxy, response, raw, stream)
        if stream:
            reasoning, content = streamed_text(events)
            assert REASONING.startswith(reasoning) and content == ""
        assert probe[0].settles_to(baseline) == baseline
        assert_next_request_is_normal(proxy)


@pytest.mark.parametrize(
    "malformed",
    ["data: {\"choices\": [{\"delta\": not json\n\n", "data: [1, 2, 3]\n\n"],
    ids=["not-json", "not-an-object"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_upstream_sending_malformed_sse(
    tmp_path: Path, probe: list[LoopProbe], stream: bool, malformed: str
) -> None:
    # Paced, so the fake is still sending when the proxy gives up on it.
    fault = FakeReply(reasoning=REASONING, answer=ANSWER, malformed_after_chunks=6,
                      malformed_event=malformed, chunk_delay_s=0.05)
    upstream = create_fake_openai_app(responder=faulty_first(fault))
    with running_proxy(tmp_path, guard="none", upstream_app=upstream) as proxy:
        baseline = probe[0].tasks()
        response, raw, elapsed = timed_request(proxy, stream)
        assert elapsed < BOUND_S
        events = assert_broken_stream(proxy, response, raw, stream)
        if stream:
            # Nothing after the malformed line reached the client.
            reasoning, content = streamed_text(events)
            assert len(reasoning) <= 5 * fault.chunk_chars and content == ""
        record = proxy.upstream.chat_requests[0]
        assert record.ended.wait(2) and record.disconnected and not record.completed
        assert probe[0].settles_to(baseline) == baseline
        assert_next_request_is_normal(proxy)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_upstream_error_object_mid_stream(
    tmp_path: Path, probe: list[LoopProbe], stream: bool
) -> None:
    fault = FakeReply(reasoning=REASONING, answer=ANSWER, error_after_chunks=5,
                      error_message="generation failed: engine dead")
    upstream = create_fake_openai_app(responder=faulty_first(fault))
    with running_proxy(tmp_path, guard="none", upstream_app=upstream) as proxy:
        baseline = probe[0].tasks()
        response, raw, elapsed = timed_request(proxy, stream)
        assert elapsed < BOUND_S
        if stream:
            events = sse_events(raw)
            error, case_id = events[-2]["error"], events[-2]["guardrail"]["case_id"]
        else:
            error = assert_openai_error(response, 502)
            case_id = response.headers["x-guardrail-case-id"]
        assert "engine dead" in error["message"]
        assert "engine dead" in stored_case(proxy, case_id)["error"]
        assert probe[0].settles_to(baseline) == baseline
        assert_next_request_is_normal(proxy)


# -- the guard -----------------------------------------------------------------------------------

GUARD_FAULTS: dict[str, dict[str, Any]] = {
    "timeout": {"delay_s": 3.0},
    "http-500": {"status": 500},
    "not-json": {"not_json": True},
    "garbage-verdict": {"output": "I'm sorry, I cannot classify this conversation."},
}


@pytest.mark.parametrize("on_error", ["block", "allow"])
@pytest.mark.parametrize("fault", list(GUARD_FAULTS))
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_guard_failing(
    tmp_path: Path, probe: list[LoopProbe], stream: bool, fault: str, on_error: str
) -> None:
    guard = FakeLlamaGuard(**GUARD_FAULTS[fault])
    # The timeout is short for the fault, but long enough that a healthy guard on loopback
    # answers within it on a loaded 2-core machine (the recovery check below).
    overrides = {"guard": {"on_error": on_error, "timeout_s": 0.8}}
    with running_proxy(tmp_path, GOOD, fake_guard=guard, overrides=overrides) as proxy:
        baseline = probe[0].tasks()
        response, raw, elapsed = timed_request(proxy, stream)
        assert elapsed < BOUND_S
        assert response.status_code == 200
        if stream:
            events = sse_events(raw)
            assert events[-1] == "[DONE]"
            summary = events[-2]["guardrail"]
            finish = events[-2]["choices"][0]["finish_reason"]
            reasoning, content = streamed_text(events)
        else:
            body = response.json()
            summary = body["guardrail"]
            finish = body["choices"][0]["finish_reason"]
            message = body["choices"][0]["message"]
            reasoning, content = message.get("reasoning_content") or "", message["content"]
        assert guard.requests, "the guard was never asked"
        case = stored_case(proxy, summary["case_id"])
        metrics = proxy.client.get("/metrics").text
        if on_error == "block":
            # Nothing unjudged reaches the client: the response is cut as a content filter.
            assert summary["action"] == "error"
            assert finish == "content_filter"
            assert content == "" and reasoning == ""
            assert case["action"] == "error" and case["error"].startswith("guard:")
        else:
            assert summary["action"] == "pass"
            assert (reasoning, content) == (REASONING, ANSWER)
            assert case["action"] == "pass"
        kind = "timeout" if fault == "timeout" else None
        assert f'decision="{on_error}",guard="llama-guard"' in metrics
        if kind:
            assert f'kind="{kind}"' in metrics
        assert probe[0].settles_to(baseline) == baseline
        # The guard recovers: the same proxy judges the next request normally.
        for name in GUARD_FAULTS[fault]:
            setattr(guard, name, FakeLlamaGuard.__dataclass_fields__[name].default)
        body = proxy.chat("a normal question").json()
        assert body["guardrail"]["action"] == "pass"
        assert body["guardrail"]["checks"] >= 2
        assert body["choices"][0]["message"]["content"] == ANSWER
