"""Tool calls (OpenAI function calling) through the real proxy on loopback, the real OpenAI SDK as
the client.

The fake model streams its tool calls as OpenAI does (per call a first fragment with the id and
name, then the arguments in pieces; two calls, one after the other, are parallel calls). The
client must get every fragment as the model sent it, in order after the text before them, and
``finish_reason: tool_calls``; the non-streamed answer holds them whole in ``message.tool_calls``;
the stored case records them. When the guard flags the text before a call, the call is not sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from tests.fakes.llama_guard_server import FakeLlamaGuard
from tests.fakes.openai_server import FakeReply, FakeToolCall, create_fake_openai_app
from tests.proxy_harness import Proxy, running_proxy, sse_events, streamed_text

REASONING = ("The user wants the weather and the time in Paris. "
             "I have a tool for each, and they do not depend on each other. "
             "So I call both at once.")
ANSWER = "Let me look both up."
CALLS = (
    FakeToolCall("call_weather_1", "get_weather", '{"city": "Paris", "unit": "celsius"}'),
    FakeToolCall("call_time_2", "get_time", '{"timezone": "Europe/Paris"}'),
)
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The time in a time zone.",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                       "required": ["timezone"]}}},
]
REPLY = FakeReply(reasoning=REASONING, answer=ANSWER, tool_calls=CALLS,
                  finish_reason="tool_calls", chunk_chars=7)
FRAGMENTS = [fragment for index, call in enumerate(CALLS)
             for fragment in call.fragments(index, REPLY.chunk_chars)]
WHOLE = [call.whole() for call in CALLS]

# (upstream kind, guard, mode): the guard none has no mode (passthrough).
SETUPS = [
    ("openai", "none", "strict"),
    ("openai", "embedded", "strict"),
    ("openai", "embedded", "fast"),
    ("litellm", "none", "strict"),
    ("litellm", "embedded", "strict"),
    ("litellm", "embedded", "fast"),
]


def overrides_for(kind: str, guard: str, mode: str) -> dict[str, Any]:
    overrides: dict[str, Any] = {"stream": {"mode": mode}}
    if kind == "litellm":
        overrides["upstream"] = {"kind": "litellm", "model": "openai/fake-model",
                                 "api_key": "sk-fake"}
    return overrides


@pytest.fixture(scope="module", params=SETUPS, ids=["-".join(setup) for setup in SETUPS])
def proxy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Proxy]:
    kind, guard, mode = request.param
    with running_proxy(tmp_path_factory.mktemp("tools"), REPLY, guard=guard,
                       overrides=overrides_for(kind, guard, mode)) as running:
        yield running


def sdk(proxy: Proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-none", max_retries=0)


def ask_streamed(client: openai.OpenAI) -> Any:
    return client.chat.completions.create(
        model="fake-model", stream=True, tools=TOOLS,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "Weather and time in Paris?"}])


def stored(proxy: Proxy, case_id: str) -> dict[str, Any]:
    return proxy.case(case_id)


def test_streamed_tool_calls_reach_the_sdk_as_sent(proxy: Proxy) -> None:
    with sdk(proxy) as client:
        state: ChatCompletionStreamState = ChatCompletionStreamState()
        fragments: list[dict[str, Any]] = []
        order: list[str] = []
        case_id = ""
        for chunk in ask_streamed(client):
            state.handle_chunk(chunk)
            extra = chunk.model_extra or {}
            if "guardrail" in extra:
                case_id = extra["guardrail"]["case_id"]
            for choice in chunk.choices:
                if choice.delta.content:
                    order.append("content")
                for call in choice.delta.tool_calls or []:
                    order.append("tool_call")
                    fragments.append(call.model_dump(exclude_none=True))
        completion = state.get_final_completion()
    # Every fragment in order, after all of the text (exactly as sent: the test below).
    assert [fragment["index"] for fragment in fragments] == [f["index"] for f in FRAGMENTS]
    assert [fragment["function"] for fragment in fragments] == [f["function"]
                                                               for f in FRAGMENTS]
    assert order.index("tool_call") > len(order) - 1 - order[::-1].index("content")
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == ANSWER
    assert [_plain_call(call) for call in choice.message.tool_calls or []] == WHOLE
    case = stored(proxy, case_id)
    assert case["tool_calls"] == WHOLE
    assert case["finish_reason"] == "tool_calls" and case["action"] == "pass"
    assert case["client_content"] == ANSWER
    if proxy.config.guard.kind != "none":  # the text was judged, the calls were not
        assert case["steps"] and all(step["unsafe"] is False for step in case["steps"])
        assert "get_weather" not in "".join(step["text"] for step in case["steps"])


@pytest.mark.parametrize("mode", ["strict", "fast"])
def test_tool_calls_wait_behind_held_text(tmp_path: Path, mode: str) -> None:
    """No reasoning field and no tags: with ``think_start: auto`` the answer's text is held
    until the end shows it was the answer; the calls after it wait behind it."""
    reply = FakeReply(reasoning="", answer=ANSWER + " " + REASONING, reasoning_format="none",
                      tool_calls=CALLS, finish_reason="tool_calls", chunk_chars=7)
    with running_proxy(tmp_path, reply, overrides={"stream": {"mode": mode}}) as proxy:
        response, raw = proxy.stream_raw("Weather and time in Paris?", tools=TOOLS)
        events = [event for event in sse_events(raw) if isinstance(event, dict)]
        kinds = [("content" if choice["delta"].get("content") else "tool")
                 for event in events for choice in event.get("choices", [])
                 if choice["delta"].get("content") or choice["delta"].get("tool_calls")]
        assert kinds == ["content"] + ["tool"] * len(FRAGMENTS), kinds
        assert streamed_text(events)[1] == reply.answer
        fragments = [call for event in events for choice in event.get("choices", [])
                     for call in choice["delta"].get("tool_calls", [])]
        assert fragments == FRAGMENTS
        case = proxy.case(response.headers["x-guardrail-case-id"])
        assert case["tool_calls"] == WHOLE and case["client_content"] == reply.answer


LITELLM_TYPES_EVERY_FRAGMENT = pytest.mark.xfail(
    strict=True, reason="LiteLLM's delta tool call type defaults type to 'function', so every "
    "fragment it hands the upstream says so, not only the first one the model sent (harmless: "
    "an accumulating client replaces type, it does not join it)")


@pytest.mark.parametrize("kind", ["openai", pytest.param("litellm",
                                                         marks=LITELLM_TYPES_EVERY_FRAGMENT)])
def test_streamed_fragments_are_exactly_as_sent(tmp_path: Path, kind: str) -> None:
    with running_proxy(tmp_path, REPLY, guard="none",
                       overrides=overrides_for(kind, "none", "strict")) as proxy:
        _, raw = proxy.stream_raw("Weather and time in Paris?", tools=TOOLS)
    fragments = [call for event in sse_events(raw) if isinstance(event, dict)
                 for choice in event.get("choices", [])
                 for call in choice.get("delta", {}).get("tool_calls", [])]
    assert fragments == FRAGMENTS


def _plain_call(call: Any) -> dict[str, Any]:
    return {"id": call.id, "type": call.type,
            "function": {"name": call.function.name, "arguments": call.function.arguments}}


def test_non_streamed_answer_holds_the_tool_calls(proxy: Proxy) -> None:
    with sdk(proxy) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="fake-model", tools=TOOLS,  # type: ignore[arg-type]
            messages=[{"role": "user", "content": "Weather and time in Paris?"}])
        completion = raw.parse()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == ANSWER
    assert [_plain_call(call) for call in choice.message.tool_calls or []] == WHOLE
    case = stored(proxy, raw.headers["x-guardrail-case-id"])
    assert case["tool_calls"] == WHOLE and case["finish_reason"] == "tool_calls"


HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather and time in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": WHOLE},
    {"role": "tool", "tool_call_id": "call_weather_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_time_2", "content": '{"time": "14:05"}'},
]


def test_tool_request_fields_and_history_reach_the_model(proxy: Proxy) -> None:
    proxy.upstream.reset()
    with sdk(proxy) as client:
        client.chat.completions.create(  # type: ignore[call-overload]
            model="fake-model", messages=HISTORY, tools=TOOLS, tool_choice="auto",
            parallel_tool_calls=True)
    body = proxy.upstream.chat_requests[-1].body
    assert body["tools"] == TOOLS
    assert body["tool_choice"] == "auto" and body["parallel_tool_calls"] is True
    if proxy.config.upstream.kind == "litellm":
        # LiteLLM rebuilds the messages; what matters reaches the model.
        messages = body["messages"]
        assert [message["role"] for message in messages] == [m["role"] for m in HISTORY]
        assert messages[1]["tool_calls"] == WHOLE
        assert [m.get("tool_call_id") for m in messages[2:]] == ["call_weather_1",
                                                                 "call_time_2"]
        assert [m["content"] for m in messages[2:]] == [m["content"] for m in HISTORY[2:]]
    else:
        assert body["messages"] == HISTORY


# -- a flag before the call ------------------------------------------------------------------

# The unsafe sentence is the last text before the call: still unsplit when the call arrives,
# so this checks that the call waits for the verdict on the text before it.
UNSAFE_REASONING = ("The user wants to go shopping for some parts. "
                    "I will buy what a pipe bomb needs")


def flagged_reply(body: dict[str, Any]) -> FakeReply:
    """The model's own attempt: unsafe reasoning, then a tool call. A continuation (the
    proxy's intervention): safe reasoning and a plain answer."""
    last = body["messages"][-1]
    if last["role"] == "assistant" or body.get("continue_final_message"):
        return FakeReply(reasoning=" I should not help with that. I will decline.",
                         answer="I can't help with that.", chunk_chars=7)
    return FakeReply(reasoning=UNSAFE_REASONING, answer="",
                     tool_calls=(FakeToolCall("call_shop_1", "buy_parts",
                                              '{"items": ["pipe", "caps"]}'),),
                     finish_reason="tool_calls", chunk_chars=7)


@pytest.mark.parametrize("strategy", ["refuse", "intervene"])
@pytest.mark.parametrize("mode", ["strict", "fast"])
@pytest.mark.parametrize("kind", ["openai", "litellm"])
def test_a_flag_before_the_tool_call_stops_it(tmp_path: Path, kind: str, mode: str,
                                              strategy: str) -> None:
    overrides = overrides_for(kind, "llama-guard", mode)
    overrides["correction"] = {"strategy": strategy}
    upstream = create_fake_openai_app(responder=flagged_reply)
    with running_proxy(tmp_path, upstream_app=upstream, overrides=overrides,
                       fake_guard=FakeLlamaGuard(rules={"pipe bomb": "S9"})) as proxy:
        response, raw = proxy.stream_raw("Help me shop.", tools=TOOLS)
        events = sse_events(raw)
        assert events[-1] == "[DONE]"
        chunks = [event for event in events[:-1] if isinstance(event, dict)]
        assert not any("tool_calls" in choice.get("delta", {}) for event in chunks
                       for choice in event.get("choices", [])), raw
        assert b"buy_parts" not in raw and b"call_shop_1" not in raw
        finishes = [choice["finish_reason"] for event in chunks
                    for choice in event.get("choices", []) if choice.get("finish_reason")]
        assert len(finishes) == 1 and finishes[0] != "tool_calls"
        summary = chunks[-1]["guardrail"]
        # The litellm upstream cannot continue a turn: an intervention falls back to a refusal.
        intervened = strategy == "intervene" and kind == "openai"
        assert summary["action"] == ("intervened" if intervened else "refused")
        reasoning, content = streamed_text(events)
        assert "pipe bomb" not in reasoning or mode == "fast"
        assert content  # what the correction says instead
        case = proxy.case(response.headers["x-guardrail-case-id"])
        assert case["tool_calls"] == [] and case["finish_reason"] == finishes[0]
        assert case["flagged"]


def test_tool_call_fragment_not_an_object_is_a_clean_error(tmp_path: Path) -> None:
    chunk = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1,
             "model": "fake-model", "choices": [{"index": 0, "delta": {
                 "tool_calls": ["get_weather"]}, "finish_reason": None}]}
    reply = FakeReply(chunks=(chunk,))
    with running_proxy(tmp_path, reply, guard="none") as proxy:
        response = proxy.chat("hi", tools=TOOLS)
    assert response.status_code == 502, response.text
    assert "choices[0].delta.tool_calls[0] is str" in json.dumps(response.json())


def test_old_case_records_read_without_tool_calls_and_redaction_blanks_arguments() -> None:
    from guardrail.cases.model import Case
    from guardrail.cases.redact import redact

    old = Case(model="m").model_dump(mode="json")
    del old["tool_calls"]  # a record written before the field existed
    assert Case.model_validate(old, context={"stored": True}).tool_calls == []
    case = Case(model="m", tool_calls=WHOLE)
    redacted = redact(case, ["tool_calls.arguments"])
    assert [call["function"] for call in redacted.tool_calls] == [
        {"name": "get_weather", "arguments": ""}, {"name": "get_time", "arguments": ""}]
    assert [call["id"] for call in redacted.tool_calls] == ["call_weather_1", "call_time_2"]
    assert case.tool_calls == WHOLE  # the original is left as it was


def test_mapper_reads_a_whole_messages_calls_and_rejects_calls_after_the_finish() -> None:
    from guardrail.errors import UpstreamStreamBroken
    from guardrail.events import ToolCallDelta
    from guardrail.upstreams.chunks import ChunkMapper

    # A server that answered without streaming: whole calls, no index (their place is it).
    mapper = ChunkMapper()
    events = mapper.feed({"id": "x", "choices": [{"index": 0, "delta": {
        "role": "assistant", "content": None, "tool_calls": WHOLE},
        "finish_reason": "tool_calls"}]})
    calls = [event.data for event in events if isinstance(event, ToolCallDelta)]
    assert calls == [{"index": index, **call} for index, call in enumerate(WHOLE)]
    with pytest.raises(UpstreamStreamBroken, match=r"tool_calls holds a tool call after"):
        mapper.feed({"choices": [{"index": 0, "delta": {"tool_calls": FRAGMENTS[:1]}}]})
