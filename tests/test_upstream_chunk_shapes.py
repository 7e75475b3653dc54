"""Upstream chunks of odd shapes, through the real proxy on loopback, streamed and not.

The fake model server sends exactly the chunks of each case over real SSE. A shape whose meaning
is clear is forwarded (the client gets the text, the finish reason, the usage, the upstream's
id); any other ends in a clean error naming what was malformed: an error event then ``[DONE]``
for a stream, an OpenAI-shaped 502 otherwise, and the case stored with ``action: error``. Never a
cut stream, never a 500.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.fakes.openai_server import FakeReply, create_fake_openai_app
from tests.proxy_harness import Proxy, running_proxy, sse_events, streamed_text
from tests.test_faults import assert_broken_stream, stored_case

ID = "chatcmpl-odd-shapes"
CREATED = 1_700_000_000
REASONING = "The user wants a greeting. A short and friendly hello will do. "
MORE = "More thought. "
ANSWER = "Hello there, nice to meet you!"
USAGE = {"prompt_tokens": 3, "completion_tokens": 17, "total_tokens": 20}
_UNSET: Any = object()


def chunk(delta: Any = _UNSET, finish: Any = None, **fields: Any) -> dict[str, Any]:
    """A well-formed chunk with one choice; ``fields`` add or replace top-level fields."""
    choice = {"index": 0, "delta": {} if delta is _UNSET else delta, "logprobs": None,
              "finish_reason": finish}
    return {"id": ID, "object": "chat.completion.chunk", "created": CREATED,
            "model": "fake-model", "choices": [choice], **fields}


def usage_chunk(**fields: Any) -> dict[str, Any]:
    return {"id": ID, "object": "chat.completion.chunk", "created": CREATED,
            "model": "fake-model", "choices": [], "usage": USAGE, **fields}


def stream_of(*middle: Any, first: Any = _UNSET, answer: Any = _UNSET, finish: Any = _UNSET,
              last: Any = _UNSET) -> tuple[Any, ...]:
    """A normal response (role, reasoning in two pieces, ``middle``, answer, finish, usage) with
    any part replaced; ``()`` leaves a part out."""

    def part(value: Any, default: Any) -> tuple[Any, ...]:
        value = default if value is _UNSET else value
        return value if isinstance(value, tuple) else (value,)

    return (
        *part(first, chunk({"role": "assistant", "content": ""})),
        chunk({"reasoning": REASONING[:30]}),
        chunk({"reasoning": REASONING[30:]}),
        *middle,
        *part(answer, chunk({"content": ANSWER})),
        *part(finish, chunk({}, "stop")),
        *part(last, usage_chunk()),
    )


@dataclass(frozen=True)
class Forwarded:
    """The client gets this text, finish reason ``stop``, the upstream's id and (if ``usage``)
    the usage."""

    reasoning: str = REASONING
    answer: str = ANSWER
    usage: bool = True


@dataclass(frozen=True)
class Broken:
    """A clean error whose message contains ``names``; ``after_answer``: the malformed chunk
    comes after the answer's text."""

    names: str
    after_answer: bool = False


# Python's JSON reader (and so the proxy's) accepts NaN, which is no timestamp.
NAN_CREATED = json.dumps(chunk({"role": "assistant", "content": ""}, created="NaN-here")
                         ).replace('"NaN-here"', "NaN")
TOO_DEEP = "[" * 100_000 + "]" * 100_000

SHAPES: dict[str, tuple[tuple[Any, ...], Forwarded | Broken]] = {
    # -- clear meaning: forwarded -----------------------------------------------------------------
    "usage-chunk-with-choices-null": (stream_of(last=usage_chunk(choices=None)), Forwarded()),
    "usage-chunk-without-choices": (stream_of(last={"id": ID, "usage": USAGE}), Forwarded()),
    "usage-null-on-every-chunk": (
        (*({**item, "usage": None} for item in stream_of(last=())), usage_chunk()),
        Forwarded()),
    "no-usage-at-all": (stream_of(last=()), Forwarded(usage=False)),
    "usage-a-string": (stream_of(last=usage_chunk(usage="20 tokens")), Forwarded(usage=False)),
    "delta-null": (stream_of(chunk(None), finish=chunk(None, "stop")), Forwarded()),
    "delta-missing": (stream_of(finish=chunk(_UNSET, "stop", choices=[
        {"index": 0, "finish_reason": "stop"}])), Forwarded()),
    "empty-object-first-and-between": (stream_of({}, first=({}, chunk({"role": "assistant"}))),
                                       Forwarded()),
    "empty-data-event": (stream_of("", " "), Forwarded()),
    "index-missing": (stream_of(chunk(choices=[{"delta": {"reasoning": MORE}}])),
                      Forwarded(reasoning=REASONING + MORE)),
    "reasoning-list-of-strings": (stream_of(chunk({"reasoning": ["More ", "thought. "]})),
                                  Forwarded(reasoning=REASONING + MORE)),
    "reasoning-content-list-of-text-parts": (
        stream_of(chunk({"reasoning_content": [{"type": "text", "text": "More "},
                                               {"text": "thought. "}]})),
        Forwarded(reasoning=REASONING + MORE)),
    "content-list-of-text-parts": (
        stream_of(answer=chunk({"content": [{"type": "text", "text": ANSWER[:9]},
                                            ANSWER[9:]]})),
        Forwarded()),
    "finish-reason-empty-string-until-the-end": (
        (*({**item, "choices": [{**item["choices"][0], "finish_reason": ""}]}
            for item in stream_of(finish=(), last=())),
         chunk({}, "stop"), usage_chunk()),
        Forwarded()),
    "created-not-a-number": (stream_of(first=NAN_CREATED), Forwarded()),
    # -- unclear meaning: a clean error naming what was malformed ---------------------------------
    "delta-a-string": (stream_of(chunk(MORE)), Broken("choices[0].delta is str")),
    "content-a-number": (stream_of(answer=chunk({"content": 42})),
                         Broken("choices[0].delta.content is int")),
    "content-an-object": (stream_of(answer=chunk({"content": {"text": ANSWER}})),
                          Broken("choices[0].delta.content is dict")),
    "content-part-of-another-type": (
        stream_of(answer=chunk({"content": [{"type": "image_url", "image_url": "x"}]})),
        Broken("choices[0].delta.content[0]")),
    "reasoning-a-number": (stream_of(chunk({"reasoning": 3.5})),
                           Broken("choices[0].delta.reasoning is float")),
    "reasoning-list-holding-a-number": (stream_of(chunk({"reasoning": ["More ", 7]})),
                                        Broken("choices[0].delta.reasoning[1] is int")),
    "reasoning-content-part-without-text": (
        stream_of(chunk({"reasoning_content": [{"type": "summary"}]})),
        Broken("choices[0].delta.reasoning_content[0]")),
    "chunk-a-json-array": (stream_of('[{"choices": []}]'), Broken("not an object")),
    "chunk-a-json-string": (stream_of('"More thought."'), Broken("not an object")),
    "chunk-a-json-number": (stream_of("42"), Broken("not an object")),
    "chunk-null": (stream_of("null"), Broken("not an object")),
    "chunk-nested-too-deep": (stream_of(TOO_DEEP), Broken("nested too deep")),
    "two-choices": (stream_of(answer=chunk(choices=[
        {"index": 0, "delta": {"content": ANSWER}, "finish_reason": None},
        {"index": 1, "delta": {"content": "Another answer."}, "finish_reason": None}])),
        Broken("choice index 1")),
    "only-choice-1": (stream_of(answer=chunk(choices=[
        {"index": 1, "delta": {"content": ANSWER}, "finish_reason": None}])),
        Broken("choice index 1")),
    "index-a-string": (stream_of(answer=chunk(choices=[
        {"index": "0", "delta": {"content": ANSWER}, "finish_reason": None}])),
        Broken("choices[0].index is str")),
    "choices-a-dict": (stream_of(answer=chunk(choices={
        "index": 0, "delta": {"content": ANSWER}, "finish_reason": None})),
        Broken("choices is dict")),
    "choices-a-string": (stream_of(answer=chunk(choices=ANSWER)), Broken("choices is str")),
    "choice-a-string": (stream_of(answer=chunk(choices=[ANSWER])),
                        Broken("choices[0] is str")),
    "choice-null": (stream_of(answer=chunk(choices=[None])), Broken("choices[0] is NoneType")),
    "text-after-the-finish-reason": (stream_of(last=(chunk({"content": "And more."}),
                                                     usage_chunk())),
                                     Broken("content holds text after the finish_reason",
                                            after_answer=True)),
    "message-instead-of-delta": (stream_of(answer=chunk(choices=[
        {"index": 0, "message": {"role": "assistant", "content": ANSWER}}])),
        Broken("choices[0] has a message but no delta")),
    "finish-reason-a-number": (stream_of(finish=chunk({}, 1)),
                               Broken("choices[0].finish_reason is int", after_answer=True)),
    "finish-reason-an-object": (stream_of(finish=chunk({}, {"type": "stop"})),
                                Broken("choices[0].finish_reason is dict",
                                       after_answer=True)),
}


# LiteLLM reads the provider's stream itself and hands the upstream its own chunk objects, so
# some shapes end differently there: its reader fails on them first (a clean error all the same,
# with LiteLLM's message), or it copes in its own way.
LITELLM_FAILS_FIRST = Broken("")
LITELLM: dict[str, Forwarded | Broken] = {
    "empty-data-event": LITELLM_FAILS_FIRST,  # the OpenAI SDK's SSE reader parses "" as JSON
    "delta-a-string": LITELLM_FAILS_FIRST,
    "chunk-a-json-array": LITELLM_FAILS_FIRST,
    "chunk-a-json-string": LITELLM_FAILS_FIRST,
    "chunk-a-json-number": LITELLM_FAILS_FIRST,
    "chunk-nested-too-deep": LITELLM_FAILS_FIRST,
    "choices-a-dict": LITELLM_FAILS_FIRST,
    "choices-a-string": LITELLM_FAILS_FIRST,
    "choice-a-string": LITELLM_FAILS_FIRST,
    "choice-null": LITELLM_FAILS_FIRST,
    "finish-reason-an-object": Broken("", after_answer=True),
    # LiteLLM renames vLLM's ``reasoning`` to ``reasoning_content``.
    "reasoning-a-number": Broken("choices[0].delta.reasoning_content is float"),
    "reasoning-list-holding-a-number": Broken("choices[0].delta.reasoning_content[1] is int"),
    "chunk-null": Forwarded(),  # skipped, as an empty object is
    "finish-reason-a-number": Forwarded(),  # "Unmapped finish_reason '1', defaulting to 'stop'"
}
LITELLM_LOSES_TEXT = pytest.mark.xfail(
    strict=True, reason="LiteLLM drops text it cannot read (a delta.content that is not a "
    "string, a message in place of a delta) before the upstream sees the chunk: the answer is "
    "lost without an error (LiteLLM's behaviour, not ours)")
LITELLM_MARKS = {shape: [LITELLM_LOSES_TEXT] for shape in (
    "content-list-of-text-parts", "content-a-number", "content-an-object",
    "content-part-of-another-type", "message-instead-of-delta")}


def responder(body: dict[str, Any]) -> FakeReply:
    """The user's message names the shape the fake sends."""
    return FakeReply(chunks=SHAPES[body["messages"][-1]["content"]][0])


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """One proxy (the openai upstream) for the table."""
    upstream = create_fake_openai_app(responder=responder)
    with running_proxy(tmp_path_factory.mktemp("shapes"), guard="none",
                       upstream_app=upstream) as running:
        yield running


@pytest.fixture(scope="module")
def litellm_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """One proxy with the litellm upstream (``openai/`` provider) for the table."""
    upstream = create_fake_openai_app(responder=responder)
    overrides = {"upstream": {"kind": "litellm", "model": "openai/fake-model",
                              "api_key": "sk-fake"}}
    with running_proxy(tmp_path_factory.mktemp("litellm-shapes"), guard="none",
                       upstream_app=upstream, overrides=overrides) as running:
        yield running


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_odd_chunk_shape(proxy: Proxy, shape: str, stream: bool) -> None:
    check_shape(proxy, shape, stream, SHAPES[shape][1], exact_usage=True)


# LiteLLM's pydantic types warn when they serialise a field of an odd type; here (where warnings
# are errors, in the proxy's thread too) that would stand in for what LiteLLM does in service.
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("shape", [pytest.param(shape, marks=LITELLM_MARKS.get(shape, []))
                                   for shape in SHAPES])
def test_odd_chunk_shape_through_litellm(litellm_proxy: Proxy, shape: str, stream: bool) -> None:
    # LiteLLM counts usage itself when the server sends none (or none it can read).
    check_shape(litellm_proxy, shape, stream, LITELLM.get(shape, SHAPES[shape][1]),
                exact_usage=False)


def check_shape(proxy: Proxy, shape: str, stream: bool, expected: Forwarded | Broken, *,
                exact_usage: bool) -> None:
    """Send the shape, streamed or not; check what the client gets and the stored case."""
    if stream:
        response, raw = proxy.stream_raw(shape, stream_options={"include_usage": True})
    else:
        response = proxy.chat(shape)
        raw = response.content
    if isinstance(expected, Broken):
        events = assert_broken_stream(proxy, response, raw, stream)
        error = events[-2]["error"] if stream else response.json()["error"]
        assert expected.names in error["message"], error["message"]
        assert "\n" not in error["message"]
        case = stored_case(proxy, response.headers["x-guardrail-case-id"])
        assert expected.names in case["error"]
        if stream:
            # What came before the malformed chunk, at most; nothing after it.
            reasoning, content = streamed_text(events)
            assert REASONING.startswith(reasoning)
            assert ANSWER.startswith(content) if expected.after_answer else content == ""
        return
    assert response.status_code == 200, response.text[:500]
    if stream:
        events = sse_events(raw)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert not any("error" in event for event in chunks), chunks
        assert {event["id"] for event in chunks} == {ID}
        assert (expected.reasoning, expected.answer) == streamed_text(events)
        finishes = [choice["finish_reason"] for event in chunks
                    for choice in event["choices"] if choice.get("finish_reason")]
        assert finishes == ["stop"]
        usage = chunks[-1]["usage"]
        summary = chunks[-1]["guardrail"]
    else:
        body = response.json()
        assert body["id"] == ID
        message = body["choices"][0]["message"]
        assert (message.get("reasoning_content"), message["content"]) == (
            expected.reasoning, expected.answer)
        assert body["choices"][0]["finish_reason"] == "stop"
        usage = body.get("usage")
        summary = body["guardrail"]
    if exact_usage:
        assert usage == (USAGE if expected.usage else None)
    else:
        assert usage["total_tokens"] > 0
    case = stored_case(proxy, summary["case_id"])
    assert case["action"] == "pass" and case["error"] is None
