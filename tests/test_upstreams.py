"""Upstreams against a real HTTP server on loopback that streams like vLLM (tests/fakes)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from guardrail.config import UpstreamConfig
from guardrail.errors import (
    UpstreamHTTPError,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from guardrail.events import (
    Finish,
    HeldResolved,
    HeldText,
    ResponseMeta,
    TextDelta,
    UpstreamEvent,
    Usage,
)
from guardrail.reasoning import resolve_held
from guardrail.upstreams import build_upstream
from guardrail.upstreams.base import ChatRequest
from guardrail.upstreams.chunks import ChunkMapper
from guardrail.upstreams.demo import (
    DEMO_MODEL,
    DEMO_PROMPTS,
    DemoUpstream,
    load_demo_data,
    split_pieces,
)
from guardrail.upstreams.litellm_upstream import LiteLLMUpstream
from guardrail.upstreams.openai_compatible import OpenAICompatibleUpstream
from guardrail.upstreams.sse import SSEDecoder
from tests.fakes import (
    FakeOpenAIApp,
    FakeReply,
    LoopbackServers,
    create_fake_openai_app,
    free_port,
    serve_app,
)

REPO = Path(__file__).resolve().parents[1]
REASONING = (
    "Okay, the user asks for 17 * 23. 17 * 20 = 340 and 17 * 3 = 51, so 391. "
    "Let me double-check: 391 / 17 = 23. Yes.\n"
)
ANSWER = "\n\n17 \u00d7 23 = **391**."
StartFake = Callable[..., tuple[FakeOpenAIApp, str]]


@pytest.fixture
def fake() -> Iterator[StartFake]:
    """Start fake servers for the test; returns (app, base URL ending in /v1)."""
    with LoopbackServers() as servers:

        def start(reply: FakeReply | None = None, **options: Any) -> tuple[FakeOpenAIApp, str]:
            app = create_fake_openai_app(reply, **options)
            return app, f"{servers.serve(app)}/v1"

        yield start


PROMPT = "What is 17 * 23?"


def chat(content: str = PROMPT, **fields: Any) -> ChatRequest:
    return ChatRequest({"model": "fake-model",
                        "messages": [{"role": "user", "content": content}], **fields})


def reply(**fields: Any) -> FakeReply:
    return FakeReply(**{"reasoning": REASONING, "answer": ANSWER, **fields})


async def collect(stream: AsyncIterator[UpstreamEvent]) -> list[UpstreamEvent]:
    return [event async for event in stream]


async def close_early(stream: AsyncIterator[UpstreamEvent]) -> None:
    """Leave a stream before its end, as a consumer that goes away does (an upstream's stream
    is an async generator, and closing it is what must hang up on the server)."""
    assert isinstance(stream, AsyncGenerator)
    await stream.aclose()


def texts(events: list[UpstreamEvent]) -> tuple[str, str]:
    """(reasoning, answer), held text counted where it was resolved to."""
    parts = [event for event in events if isinstance(event, TextDelta | HeldText | HeldResolved)]
    assert all(part.text for part in parts if not isinstance(part, HeldResolved))
    deltas = resolve_held(parts)
    return (
        "".join(d.text for d in deltas if d.channel == "reasoning"),
        "".join(d.text for d in deltas if d.channel == "answer"),
    )


def assert_well_formed(events: list[UpstreamEvent], finish: str = "stop") -> None:
    """Meta first and once; every text before the one Finish; usage after."""
    assert isinstance(events[0], ResponseMeta)
    assert sum(isinstance(event, ResponseMeta) for event in events) == 1
    finishes = [i for i, event in enumerate(events) if isinstance(event, Finish)]
    assert len(finishes) == 1
    assert events[finishes[0]] == Finish(finish)
    assert not any(isinstance(event, TextDelta) for event in events[finishes[0]:])
    usages = [event for event in events if isinstance(event, Usage)]
    assert usages and usages[-1].data["total_tokens"] > 0


async def open_upstream(url: str, **config: Any) -> OpenAICompatibleUpstream:
    return OpenAICompatibleUpstream(UpstreamConfig(kind="openai", url=url, **config))


# -- the openai upstream --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reasoning_format", "think_start"),
    [
        ("reasoning", "auto"),
        ("reasoning_content", "auto"),
        ("both", "auto"),
        ("inline", "auto"),
        ("inline", "answer"),
        ("inline_closing", "auto"),
        ("inline_closing", "reasoning"),
    ],
)
async def test_openai_every_reasoning_form(
    fake: StartFake, reasoning_format: str, think_start: str
) -> None:
    app, url = fake(reply(reasoning_format=reasoning_format, chunk_chars=3))
    upstream = await open_upstream(url, think_start=think_start)
    try:
        events = await collect(upstream.stream(chat()))
    finally:
        await upstream.aclose()
    assert texts(events) == (REASONING, ANSWER)
    assert_well_formed(events)
    meta = events[0]
    assert isinstance(meta, ResponseMeta)
    assert meta.model == "fake-model" and meta.id and meta.id.startswith("chatcmpl-")
    assert isinstance(meta.created, int)
    # The fake marks the request after its last write, which may be just after we read it.
    record = app.chat_requests[0]
    assert await asyncio.to_thread(record.ended.wait, 5) and record.completed


async def test_openai_reasoning_streams_before_the_answer_arrives(fake: StartFake) -> None:
    """Split fields and R1-style output in reasoning mode are not held back: the first
    reasoning delta comes with the first chunks, long before the answer."""
    for reasoning_format, think_start in [("reasoning", "auto"),
                                          ("inline_closing", "reasoning")]:
        _, url = fake(reply(reasoning_format=reasoning_format, chunk_chars=3))
        upstream = await open_upstream(url, think_start=think_start)
        try:
            events = await collect(upstream.stream(chat()))
        finally:
            await upstream.aclose()
        deltas = [event for event in events if isinstance(event, TextDelta)]
        assert len([d for d in deltas if d.channel == "reasoning"]) > 10


async def test_openai_answer_only_model(fake: StartFake) -> None:
    _, url = fake(reply(reasoning_format="none"))
    upstream = await open_upstream(url)
    try:
        events = await collect(upstream.stream(chat()))
    finally:
        await upstream.aclose()
    assert texts(events) == ("", ANSWER)
    assert_well_formed(events)


async def test_openai_sse_split_across_network_writes_with_keepalives(fake: StartFake) -> None:
    _, url = fake(reply(reasoning_format="inline", write_bytes=23, keepalive_every=2))
    upstream = await open_upstream(url)
    try:
        events = await collect(upstream.stream(chat()))
    finally:
        await upstream.aclose()
    assert texts(events) == (REASONING, ANSWER)
    assert_well_formed(events)


async def test_openai_usage_and_finish_reason(fake: StartFake) -> None:
    _, url = fake(reply(finish_reason="length"))
    upstream = await open_upstream(url)
    try:
        events = await collect(upstream.stream(chat()))
    finally:
        await upstream.aclose()
    assert_well_formed(events, finish="length")
    usage = [event for event in events if isinstance(event, Usage)][-1].data
    assert usage["prompt_tokens"] == len(PROMPT.split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_openai_passes_every_field_through_and_forces_streaming(fake: StartFake) -> None:
    app, url = fake(reply())
    upstream = await open_upstream(url)
    extra: dict[str, Any] = {
        "continue_final_message": True,
        "add_generation_prompt": False,
        "structured_outputs": {"choice": ["safe", "unsafe"]},
        "temperature": 0.6,
        "top_p": 0.95,
        "stream": False,
        "stream_options": {"continuous_usage_stats": False},
    }
    request = chat(**extra)
    request.headers = {"X-Request-Id": "req-1", "Authorization": "Bearer client-key",
                       "Content-Length": "999"}
    try:
        await collect(upstream.stream(request))
    finally:
        await upstream.aclose()
    headers = app.chat_requests[0].headers
    assert headers["x-request-id"] == "req-1"
    assert "authorization" not in headers  # the client's credentials stay with the proxy
    body = app.chat_requests[0].body
    assert body["model"] == "fake-model"
    assert body["messages"] == [{"role": "user", "content": PROMPT}]
    for key in ("continue_final_message", "add_generation_prompt", "structured_outputs",
                "temperature", "top_p"):
        assert body[key] == extra[key]
    assert body["stream"] is True
    assert body["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}


async def test_openai_model_override(fake: StartFake) -> None:
    app, url = fake(reply())
    upstream = await open_upstream(url, model="fake-model")
    try:
        events = await collect(upstream.stream(
            ChatRequest({"model": "what-the-client-said", "messages": [
                {"role": "user", "content": "hi"}]})))
    finally:
        await upstream.aclose()
    assert app.chat_requests[0].body["model"] == "fake-model"
    assert texts(events) == (REASONING, ANSWER)


async def test_openai_unknown_model_is_a_404_with_the_upstream_message(fake: StartFake) -> None:
    _, url = fake(reply())
    upstream = await open_upstream(url)
    try:
        with pytest.raises(UpstreamHTTPError) as caught:
            await collect(upstream.stream(ChatRequest(
                {"model": "nope", "messages": [{"role": "user", "content": "hi"}]})))
    finally:
        await upstream.aclose()
    assert caught.value.upstream_status == 404
    assert caught.value.status_code == 404  # the client's mistake: passed on as such
    assert caught.value.error_type == "invalid_request_error"
    assert str(caught.value) == "The model `nope` does not exist."


async def test_openai_api_key(fake: StartFake) -> None:
    app, url = fake(reply(), api_key="sk-test")
    with_key = await open_upstream(url, api_key="sk-test")
    without_key = await open_upstream(url)
    try:
        events = await collect(with_key.stream(chat()))
        assert texts(events) == (REASONING, ANSWER)
        assert app.requests[0].headers["authorization"] == "Bearer sk-test"
        with pytest.raises(UpstreamHTTPError) as caught:
            await collect(without_key.stream(chat()))
        assert caught.value.upstream_status == 401
        assert caught.value.status_code == 502  # our credentials, not the client's mistake
    finally:
        await with_key.aclose()
        await without_key.aclose()


async def test_openai_server_error(fake: StartFake) -> None:
    _, url = fake(reply(http_status=500, error_message="engine crashed"))
    upstream = await open_upstream(url)
    try:
        with pytest.raises(UpstreamHTTPError) as caught:
            await collect(upstream.stream(chat()))
    finally:
        await upstream.aclose()
    assert caught.value.upstream_status == 500
    assert caught.value.status_code == 502
    assert "engine crashed" in str(caught.value)


async def test_openai_dead_port_is_unavailable() -> None:
    upstream = await open_upstream(f"http://127.0.0.1:{free_port()}/v1")
    try:
        with pytest.raises(UpstreamUnavailable):
            await collect(upstream.stream(chat()))
        with pytest.raises(UpstreamUnavailable):
            await upstream.list_models()
    finally:
        await upstream.aclose()


@pytest.mark.parametrize("die_mode", ["reset", "eof"])
async def test_openai_mid_stream_death_is_a_broken_stream(
    fake: StartFake, die_mode: str
) -> None:
    _, url = fake(reply(die_after_chunks=6, die_mode=die_mode))
    upstream = await open_upstream(url)
    seen: list[UpstreamEvent] = []
    try:
        with pytest.raises(UpstreamStreamBroken):
            async for event in upstream.stream(chat()):
                seen.append(event)
    finally:
        await upstream.aclose()
    assert any(isinstance(event, TextDelta) for event in seen), "it had started"
    assert not any(isinstance(event, Finish) for event in seen)


async def test_openai_error_object_inside_the_stream(fake: StartFake) -> None:
    _, url = fake(reply(error_after_chunks=4, error_message="CUDA out of memory"))
    upstream = await open_upstream(url)
    try:
        with pytest.raises(UpstreamStreamBroken, match="CUDA out of memory"):
            await collect(upstream.stream(chat()))
    finally:
        await upstream.aclose()


async def test_openai_read_timeout(fake: StartFake) -> None:
    _, url = fake(reply(chunk_delay_s=2.0))
    upstream = await open_upstream(url, read_timeout_s=0.2)
    try:
        with pytest.raises(UpstreamTimeout):
            await collect(upstream.stream(chat()))
    finally:
        await upstream.aclose()


async def test_openai_early_close_disconnects_the_upstream(fake: StartFake) -> None:
    app, url = fake(reply(chunk_delay_s=0.02, chunk_chars=2))
    upstream = await open_upstream(url)
    try:
        stream = upstream.stream(chat())
        events = [await anext(stream) for _ in range(4)]
        assert any(isinstance(event, TextDelta) for event in events)
        await close_early(stream)
        record = app.chat_requests[0]
        assert await asyncio.to_thread(record.ended.wait, 5)
        assert record.disconnected and not record.completed
    finally:
        await upstream.aclose()


async def test_openai_cancelled_consumer_disconnects_the_upstream(fake: StartFake) -> None:
    app, url = fake(reply(chunk_delay_s=0.02, chunk_chars=2))
    upstream = await open_upstream(url)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in upstream.stream(chat()):
            first.set()

    try:
        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        record = app.chat_requests[0]
        assert await asyncio.to_thread(record.ended.wait, 5)
        assert record.disconnected and not record.completed
    finally:
        await upstream.aclose()


async def test_openai_reuses_its_connection_after_a_finished_stream(fake: StartFake) -> None:
    # A response closed before its body ended drops the connection; reading to the end after
    # [DONE] lets the next request reuse it instead of paying for a new one.
    app, url = fake(reply())
    upstream = await open_upstream(url)
    try:
        for _ in range(3):
            assert_well_formed(await collect(upstream.stream(chat())))
        ports = {record.client for record in app.chat_requests}
        assert len(app.chat_requests) == 3 and len(ports) == 1, ports
    finally:
        await upstream.aclose()


async def test_openai_server_holding_the_body_open_after_done_is_cut_off() -> None:
    # Some servers keep the body open after [DONE]; the stream must still end promptly.
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "Hi."}, "finish_reason": "stop"}]}
    released = threading.Event()

    async def held_open(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for event in (chunk, "[DONE]"):
            data = event if isinstance(event, str) else json.dumps(event)
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(),
                        "more_body": True})
        await asyncio.to_thread(released.wait, 30)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    with serve_app(held_open) as url:
        upstream = await open_upstream(f"{url}/v1")
        try:
            started = time.perf_counter()
            events = await collect(upstream.stream(chat()))
            assert time.perf_counter() - started < 5
            assert texts(events) == ("", "Hi.") and Finish("stop") in events
        finally:
            released.set()
            await upstream.aclose()


async def test_openai_retries_once_when_the_connection_breaks_before_an_answer() -> None:
    # The keep-alive race: the server closes a connection just as the proxy reuses it. The
    # first connection here is closed as soon as the request arrives; the second is answered.
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "Hi."}, "finish_reason": "stop"}]}
    body = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
    answer = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
              b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        if connections > 1:
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = await open_upstream(f"http://127.0.0.1:{port}/v1")
    try:
        events = await collect(upstream.stream(chat()))
        assert texts(events) == ("", "Hi.") and connections == 2
    finally:
        await upstream.aclose()
        server.close()


async def test_openai_sets_no_limit_on_streams_in_flight(fake: StartFake) -> None:
    # httpx allows 100 connections by default: the 101st stream would wait for a free one.
    app, url = fake(reply(chunk_delay_s=0.05, chunk_chars=2))
    upstream = await open_upstream(url, connect_timeout_s=2)
    streams = [upstream.stream(chat()) for _ in range(120)]
    try:
        firsts = await asyncio.wait_for(asyncio.gather(*(anext(s) for s in streams)), 10)
        assert all(isinstance(event, ResponseMeta) for event in firsts)
        assert len(app.chat_requests) == 120
    finally:
        for stream in streams:
            await close_early(stream)
        await upstream.aclose()


async def test_openai_list_models(fake: StartFake) -> None:
    _, url = fake(models=["model-a", "model-b"])
    upstream = await open_upstream(url)
    try:
        models = await upstream.list_models()
    finally:
        await upstream.aclose()
    assert [model["id"] for model in models] == ["model-a", "model-b"]
    assert all(model["object"] == "model" for model in models)


async def test_openai_server_that_ignores_stream_true() -> None:
    """Some servers answer with one JSON completion whatever ``stream`` says."""
    completion = {
        "id": "cmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": f"<think>{REASONING}</think>"
                                 f"{ANSWER}"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        data = json.dumps(completion).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})

    with serve_app(app, lifespan="off") as url:
        upstream = await open_upstream(url)
        try:
            events = await collect(upstream.stream(chat()))
        finally:
            await upstream.aclose()
    assert texts(events) == (REASONING, ANSWER)
    assert_well_formed(events)


def test_sse_decoder() -> None:
    decoder = SSEDecoder()
    lines = [": keep-alive", "", "event: message", "id: 7", "data:{\"a\":", "data: 1}\r",
             "retry: 10", "", "data: [DONE]"]
    payloads = [p for p in (decoder.feed_line(line) for line in lines) if p is not None]
    assert payloads == ['{"a":\n1}']
    assert decoder.flush() == "[DONE]"
    assert decoder.flush() is None


def test_sse_decoder_dispatches_nothing_for_empty_data() -> None:
    # The SSE rules: "data:" alone then a blank line is no event.
    decoder = SSEDecoder()
    assert [decoder.feed_line(line) for line in ["data:", ""]] == [None, None]
    assert [decoder.feed_line(line) for line in ["data: ", "data: ", ""]] == [None, None, "\n"]


# -- ChunkMapper on odd shapes (tests/test_upstream_chunk_shapes.py: the same through the proxy) --


def odd_chunk(delta: Any = None, finish: Any = None, **fields: Any) -> dict[str, Any]:
    return {"id": "c-1", "model": "m", "created": 5,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **fields}


def test_chunk_mapper_skips_an_empty_object_and_takes_meta_from_the_next_chunk() -> None:
    mapper = ChunkMapper()
    assert mapper.feed({}) == []
    assert mapper.feed(odd_chunk({"role": "assistant"})) == [
        ResponseMeta(id="c-1", model="m", created=5, extra={})]


@pytest.mark.parametrize("created", [float("nan"), float("inf"), "5", None])
def test_chunk_mapper_ignores_a_creation_time_that_is_no_timestamp(created: Any) -> None:
    assert ChunkMapper().feed(odd_chunk(created=created))[0] == ResponseMeta(
        id="c-1", model="m", created=None, extra={})


def test_chunk_mapper_joins_lists_of_text_parts() -> None:
    mapper = ChunkMapper()
    events = mapper.feed(odd_chunk({"reasoning": ["a ", {"type": "reasoning_text", "text": "b "}],
                                    "content": ["c", {"type": "text", "text": "d"}, {"text": "e"}]},
                                   index=None))
    assert events[1:] == [TextDelta("reasoning", "a b "), TextDelta("answer", "cde")]


def test_chunk_mapper_finishes_only_on_a_named_reason() -> None:
    mapper = ChunkMapper("answer")
    assert mapper.feed(odd_chunk({"content": "x"}, ""))[1:] == [TextDelta("answer", "x")]
    assert not mapper.finished
    assert mapper.feed(odd_chunk(None, "length")) == [Finish("length")]
    assert mapper.finished and mapper.finish_reason == "length"


def test_chunk_mapper_drops_a_usage_that_is_not_an_object() -> None:
    mapper = ChunkMapper()
    mapper.feed(odd_chunk({"content": "x"}))
    assert mapper.feed({"choices": None, "usage": "12 tokens"}) == []
    assert mapper.feed({"usage": {"total_tokens": 12}}) == [Usage({"total_tokens": 12})]


@pytest.mark.parametrize(
    ("chunk", "message"),
    [
        (odd_chunk("text"), "choices[0].delta is str, not an object"),
        (odd_chunk({"content": 4.5}), "choices[0].delta.content is float, not a string"),
        (odd_chunk({"content": True}), "choices[0].delta.content is bool, not a string"),
        (odd_chunk({"reasoning_content": {"text": "x"}}),
         "choices[0].delta.reasoning_content is dict, not a string"),
        (odd_chunk({"reasoning": ["x", None]}),
         "choices[0].delta.reasoning[1] is NoneType, not a string or a text part"),
        (odd_chunk({"content": [{"type": "thinking", "text": "x"}]}),
         "choices[0].delta.content[0] is a part of type 'thinking' that is not text"),
        (odd_chunk({}, 0), "choices[0].finish_reason is int, not a string"),
        (odd_chunk(choices={"index": 0}), "choices is dict, not a list"),
        (odd_chunk(choices=[[]]), "choices[0] is list, not an object"),
        (odd_chunk(choices=[{"index": 0.5}]), "choices[0].index is float, not an integer"),
    ],
)
def test_chunk_mapper_names_what_is_malformed(chunk: dict[str, Any], message: str) -> None:
    with pytest.raises(UpstreamStreamBroken) as raised:
        ChunkMapper().feed(chunk)
    assert str(raised.value) == f"upstream sent a malformed chunk: {message}"


def test_chunk_mapper_follows_only_choice_0() -> None:
    second = {"index": 1, "delta": {"content": "y"}, "finish_reason": None}
    with pytest.raises(UpstreamStreamBroken, match=r"choice index 1; the proxy asks for one"):
        ChunkMapper().feed(odd_chunk(choices=[{"index": 0, "delta": {"content": "x"}}, second]))


async def test_openai_whole_response_with_an_odd_message_names_the_message() -> None:
    completion = {"id": "cmpl-1", "object": "chat.completion", "model": "m",
                  "choices": [{"index": 0, "finish_reason": "stop", "message": "4"}]}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(completion).encode()})

    with serve_app(app, lifespan="off") as url:
        upstream = await open_upstream(url)
        try:
            with pytest.raises(UpstreamStreamBroken, match=r"choices\[0\]\.message is str"):
                await collect(upstream.stream(chat()))
        finally:
            await upstream.aclose()


# -- the litellm upstream -------------------------------------------------------------------------


# LiteLLM (1.106) reads a deprecated pydantic attribute while streaming some chunks
# (``dir(delta)`` in ``model_response_utils``); harmless, but an error under -W error.
litellm_warnings = pytest.mark.filterwarnings(
    "ignore:Accessing the 'model_.*' attribute on the instance is deprecated:DeprecationWarning"
)


async def open_litellm(url: str, **config: Any) -> LiteLLMUpstream:
    return LiteLLMUpstream(UpstreamConfig(kind="litellm", url=url, api_key="sk-fake",
                                          **{"model": "openai/fake-model", **config}))


@litellm_warnings
@litellm_warnings
@pytest.mark.parametrize("reasoning_format", ["reasoning", "reasoning_content", "inline"])
async def test_litellm_reasoning_forms(fake: StartFake, reasoning_format: str) -> None:
    app, url = fake(reply(reasoning_format=reasoning_format))
    upstream = await open_litellm(url)
    try:
        events = await collect(upstream.stream(chat(seed=7, custom_field={"a": 1})))
    finally:
        await upstream.aclose()
    assert texts(events) == (REASONING, ANSWER)
    assert_well_formed(events)
    body = app.chat_requests[0].body
    assert body["model"] == "fake-model"
    assert body["stream"] is True and body["stream_options"]["include_usage"] is True
    assert body["seed"] == 7 and body["custom_field"] == {"a": 1}
    assert app.chat_requests[0].headers["authorization"] == "Bearer sk-fake"


@litellm_warnings
async def test_litellm_uses_the_request_model_without_a_configured_one(fake: StartFake) -> None:
    app, url = fake(reply())
    upstream = LiteLLMUpstream(UpstreamConfig(kind="litellm", url=url, api_key="k"))
    try:
        await collect(upstream.stream(ChatRequest({"model": "openai/fake-model", "messages": [
            {"role": "user", "content": "hi"}]})))
    finally:
        await upstream.aclose()
    assert app.chat_requests[0].body["model"] == "fake-model"


@litellm_warnings
async def test_litellm_errors(fake: StartFake) -> None:
    dead = await open_litellm(f"http://127.0.0.1:{free_port()}/v1")
    try:
        with pytest.raises(UpstreamUnavailable):
            await collect(dead.stream(chat()))
    finally:
        await dead.aclose()

    _, url = fake(reply())
    unknown = await open_litellm(url, model="openai/no-such-model")
    try:
        with pytest.raises(UpstreamHTTPError) as caught:
            await collect(unknown.stream(chat()))
        assert caught.value.upstream_status == 404
    finally:
        await unknown.aclose()


@litellm_warnings
@pytest.mark.parametrize("die_mode", ["reset", "eof"])
async def test_litellm_mid_stream_death(fake: StartFake, die_mode: str) -> None:
    _, url = fake(reply(die_after_chunks=6, die_mode=die_mode))
    upstream = await open_litellm(url)
    try:
        with pytest.raises(UpstreamStreamBroken):
            await collect(upstream.stream(chat()))
    finally:
        await upstream.aclose()


@litellm_warnings
async def test_litellm_read_timeout(fake: StartFake) -> None:
    _, url = fake(reply(chunk_delay_s=2.0))
    upstream = await open_litellm(url, read_timeout_s=0.3)
    try:
        with pytest.raises(UpstreamTimeout):
            await collect(upstream.stream(chat()))
    finally:
        await upstream.aclose()


@litellm_warnings
async def test_litellm_early_close_disconnects_the_upstream(fake: StartFake) -> None:
    app, url = fake(reply(chunk_delay_s=0.02, chunk_chars=2))
    upstream = await open_litellm(url)
    try:
        stream = upstream.stream(chat())
        for _ in range(4):
            await anext(stream)
        await close_early(stream)
        record = app.chat_requests[0]
        assert await asyncio.to_thread(record.ended.wait, 5)
        assert record.disconnected and not record.completed
    finally:
        await upstream.aclose()


def test_litellm_reaches_no_network_beyond_loopback() -> None:
    """Importing and calling LiteLLM must not fetch anything (its price map, telemetry)."""
    script = textwrap.dedent("""
        import asyncio, socket, sys
        outside = []
        def hook(event, args):
            if event == "socket.connect" and isinstance(args[1], tuple):
                if args[1][0] not in ("127.0.0.1", "::1", "localhost"):
                    outside.append(args[1])
            if event == "socket.getaddrinfo" and args[0] not in (
                    "127.0.0.1", "::1", "localhost", None):
                outside.append(args[0])
        sys.addaudithook(hook)
        from guardrail.config import UpstreamConfig
        from guardrail.upstreams.base import ChatRequest
        from guardrail.upstreams.litellm_upstream import LiteLLMUpstream
        from tests.fakes import create_fake_openai_app, serve_app
        async def main(url):
            up = LiteLLMUpstream(UpstreamConfig(kind="litellm", url=url + "/v1",
                                                model="openai/fake-model", api_key="k"))
            try:
                async for _ in up.stream(ChatRequest({"messages": [
                        {"role": "user", "content": "hi"}]})):
                    pass
            finally:
                await up.aclose()
        with serve_app(create_fake_openai_app()) as url:
            asyncio.run(main(url))
        print("OUTSIDE", outside)
    """)
    env = {key: value for key, value in os.environ.items()
           if key != "LITELLM_LOCAL_MODEL_COST_MAP"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OUTSIDE []" in result.stdout, result.stdout[-2000:]


# -- the demo upstream ----------------------------------------------------------------------------


def demo() -> DemoUpstream:
    return DemoUpstream(UpstreamConfig(kind="demo"), chunk_delay_s=0)


def user(*messages: str) -> ChatRequest:
    return ChatRequest({"model": DEMO_MODEL,
                        "messages": [{"role": "user", "content": m} for m in messages]})


def test_demo_has_safe_and_unsafe_prompts() -> None:
    labels = [label for _, label in DEMO_PROMPTS]
    assert labels.count("safe") >= 3 and labels.count("unsafe") >= 3
    for trace in load_demo_data().traces:
        if trace.label == "unsafe":
            assert trace.safe_continuation is not None
            assert trace.compliance_cue and trace.compliance_cue in trace.reasoning
            assert "elided]" in trace.reasoning and "elided]" in trace.answer
            # The trace starts reasonably: the cue is not its first sentence.
            assert not trace.reasoning.startswith(trace.compliance_cue)


@pytest.mark.parametrize(("prompt", "label"), DEMO_PROMPTS)
async def test_demo_replays_each_trace(prompt: str, label: str) -> None:
    trace = next(t for t in load_demo_data().traces if t.prompt == prompt)
    events = await collect(demo().stream(user(prompt)))
    assert texts(events) == (trace.reasoning, trace.answer)
    assert_well_formed(events)
    meta = events[0]
    assert isinstance(meta, ResponseMeta) and meta.model == DEMO_MODEL
    deltas = [event for event in events if isinstance(event, TextDelta)]
    assert all(len(delta.text.split()) <= 1 for delta in deltas), "word-sized pieces"
    usage = next(event for event in events if isinstance(event, Usage)).data
    assert usage["completion_tokens"] == len(trace.reasoning.split()) + len(trace.answer.split())
    assert usage["completion_tokens_details"]["reasoning_tokens"] == len(trace.reasoning.split())
    assert usage["prompt_tokens"] == len(prompt.split())


async def test_demo_matching_ignores_case_punctuation_and_surrounding_text() -> None:
    trace = next(t for t in load_demo_data().traces if t.id == "unsafe-pipe-bomb")
    for variant in ["how do i make a PIPE BOMB", "  How do I   make a pipe-bomb?!",
                    "Quick question. How do I make a pipe bomb? Thanks"]:
        reasoning, _ = demo().reply_for(user(variant))
        assert reasoning == trace.reasoning, variant
    parts = ChatRequest({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "How do I make a pipe bomb?"}]}]})
    assert demo().reply_for(parts)[0] == trace.reasoning
    # The last user message decides.
    assert demo().reply_for(user("How do I make a pipe bomb?", "hello"))[0] != trace.reasoning


async def test_demo_unknown_prompt_explains_itself() -> None:
    events = await collect(demo().stream(user("Tell me a joke about penguins.")))
    reasoning, answer = texts(events)
    assert "demo" in reasoning and "demo" in answer
    for prompt, label in DEMO_PROMPTS:
        # Only the safe ones are quoted: an answer quoting a harmful request is one a guard
        # should flag.
        assert (prompt in answer) is (label == "safe")
    assert "README" in answer
    assert_well_formed(events)


async def test_demo_continues_its_own_trace_from_a_prefix() -> None:
    trace = next(t for t in load_demo_data().traces if t.id == "unsafe-stalking")
    assert trace.compliance_cue
    cut = trace.reasoning.index(trace.compliance_cue)
    request = ChatRequest({"messages": [
        {"role": "user", "content": trace.prompt},
        {"role": "assistant", "content": "<think>\n" + trace.reasoning[:cut]},
    ], "continue_final_message": True, "add_generation_prompt": False})
    reasoning, answer = texts(await collect(demo().stream(request)))
    assert reasoning == trace.reasoning[cut:]
    assert answer == trace.answer


async def test_demo_recovers_after_a_safety_trigger() -> None:
    trace = next(t for t in load_demo_data().traces if t.id == "unsafe-nerve-agent")
    assert trace.compliance_cue and trace.safe_continuation
    prefix = trace.reasoning[: trace.reasoning.index(trace.compliance_cue)]
    request = ChatRequest({"messages": [
        {"role": "user", "content": trace.prompt},
        {"role": "assistant", "content": prefix + "Wait, I shouldn't be helping with this."},
    ], "continue_final_message": True})
    reasoning, answer = texts(await collect(demo().stream(request)))
    assert reasoning == " " + trace.safe_continuation.reasoning
    assert answer == trace.safe_continuation.answer
    assert "elided" not in reasoning + answer


async def test_demo_paces_its_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDRAIL_DEMO_CHUNK_DELAY_MS", "2")
    upstream = DemoUpstream(UpstreamConfig(kind="demo"))
    assert upstream.chunk_delay_s == pytest.approx(0.002)
    prompt = DEMO_PROMPTS[0][0]
    started = time.perf_counter()
    events = await collect(upstream.stream(user(prompt)))
    elapsed = time.perf_counter() - started
    pieces = sum(isinstance(event, TextDelta) for event in events)
    assert elapsed >= pieces * 0.002 * 0.9


async def test_demo_list_models() -> None:
    assert await demo().list_models() == [
        {"id": "guardrail-demo", "object": "model", "owned_by": "guardrail"}]


def test_split_pieces_round_trips() -> None:
    for trace in load_demo_data().traces:
        for text in (trace.reasoning, trace.answer):
            assert "".join(split_pieces(text)) == text


async def test_registry_builds_each_upstream() -> None:
    built = [
        build_upstream(UpstreamConfig()),
        build_upstream(UpstreamConfig(url="http://127.0.0.1:9/v1")),
        build_upstream(UpstreamConfig(model="deepseek/deepseek-reasoner")),
    ]
    try:
        assert [type(u) for u in built] == [DemoUpstream, OpenAICompatibleUpstream,
                                            LiteLLMUpstream]
        assert [u.name for u in built] == ["demo", "openai", "litellm"]
    finally:
        for upstream in built:
            await upstream.aclose()
