"""A fake OpenAI-compatible model server that streams the way vLLM does, for integration tests.

It speaks the real wire format over real HTTP (run it with :func:`tests.fakes.loopback.serve_app`),
so anything that talks to vLLM or DeepSeek (our upstreams, LiteLLM, the OpenAI SDK) can be
tested against it without a GPU.

API
---
``create_fake_openai_app(reply=None, *, responder=None, models=("fake-model",), api_key=None)``
    returns a :class:`FakeOpenAIApp`, an ASGI app with a recording of what it received.

``FakeReply(...)`` scripts one response (all fields optional):
    ``reasoning``, ``answer``     the text to send;
    ``reasoning_format``          where the reasoning goes: ``"reasoning"`` (``delta.reasoning``,
                                  vLLM), ``"reasoning_content"`` (DeepSeek, LiteLLM), ``"both"``
                                  (both fields with the same text, as vLLM sent during the
                                  rename), ``"inline"`` (``<think>R</think>A`` in content),
                                  ``"inline_closing"`` (``R</think>A``: R1 templates open the
                                  block in the prompt), ``"none"`` (answer only);
    ``finish_reason``             (``"stop"``; ``"tool_calls"`` with ``tool_calls``);
    ``tool_calls``                :class:`FakeToolCall` objects made after the answer's text,
                                  streamed as OpenAI does: per call a first fragment with ``index``,
                                  ``id``, ``type`` and ``function.name`` (``arguments: ""``),
                                  then the arguments in ``chunk_chars`` pieces, one call after
                                  the other (two or more are parallel calls); not streamed, the
                                  whole calls in ``message.tool_calls``;
    ``chunk_chars``               characters per streamed delta (4; tags get split);
    ``chunk_delay_s``             sleep between events (0), for cancellation tests;
    ``die_after_chunks``          send that many ``data:`` events, then die: ``die_mode="reset"``
                                  drops the connection mid-body (process crash),
                                  ``die_mode="eof"`` ends the body cleanly without ``[DONE]``;
    ``error_after_chunks``        send that many events, then an error object, then ``[DONE]``
                                  (what vLLM does when generation fails mid-stream);
    ``malformed_after_chunks``    send that many events, then ``malformed_event`` (raw text,
                                  default a ``data:`` line that is not JSON), then the rest as
                                  usual (a broken gateway or a buggy server in between);
    ``keepalive_every``           an SSE comment (``: keep-alive``) every N events;
    ``write_bytes``               re-split the byte stream into writes of N bytes, so events
                                  (and UTF-8 characters) straddle network chunks;
    ``http_status``, ``error_message``   answer with an OpenAI-shaped HTTP error instead;
    ``chunks``                    send exactly these payloads instead of the scripted text, each
                                  as one ``data:`` event, then ``[DONE]``: a ``str`` is sent as
                                  the raw data text (so it may be anything: ``'"a string"'``,
                                  ``'[1, 2]'``, ``'{}'``), any other value is JSON-encoded (odd
                                  chunk shapes; the other fields above still apply to the
                                  sending: pacing, ``write_bytes``, keep-alives).

``responder`` is ``Callable[[dict], FakeReply]``: choose the reply from the request body (e.g.
a continuation when ``continue_final_message`` is set). Without either, a default reply is used.

Routes: ``POST /v1/completions`` (streamed ``text_completion`` chunks; the reply's reasoning
inline, closed by ``</think>``, as raw model output), ``POST /v1/chat/completions`` (stream or
not; ``stream_options.include_usage`` adds the final usage chunk with empty ``choices``),
``GET /v1/models``; the ``/v1`` prefix is optional, and ``/beta`` (DeepSeek's prefix
completion) serves the same routes.
With ``api_key`` set, a missing or wrong bearer token gets 401; an unknown model gets 404;
bad JSON or no ``messages`` gets 400 — all as ``{"error": {"message", "type", "param",
"code"}}``.

Recording (``app.requests``, a list of :class:`RecordedRequest`, appended as requests arrive):
``method``, ``path``, ``headers`` (lower-case names), ``body`` (parsed JSON, unknown fields
kept), ``client`` (address and port: the same port means the same connection), and for
streamed chat requests ``chunks_sent``, ``completed`` (``[DONE]`` written), ``disconnected``
(the client went away before the end) and ``ended`` (a ``threading.Event`` set when the
stream is over either way: ``rec.ended.wait(2)`` in tests).
``app.chat_requests`` filters chat completions; ``app.reset()`` clears the recording.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

ReasoningFormat = Literal[
    "reasoning", "reasoning_content", "both", "inline", "inline_closing", "none"
]

Scope = Mapping[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_REASONING = (
    "The user asks for the sum of 2 and 2. Adding them gives 4. "
    "That is a simple arithmetic fact, so I can answer directly."
)
DEFAULT_ANSWER = "2 + 2 = 4."


@dataclass(frozen=True)
class FakeToolCall:
    id: str
    name: str
    arguments: str

    def whole(self) -> dict[str, Any]:
        """As a non-streamed ``message.tool_calls`` item holds it."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}

    def fragments(self, index: int, size: int) -> list[dict[str, Any]]:
        """The ``delta.tool_calls`` items that stream it."""
        return [{"index": index, "id": self.id, "type": "function",
                 "function": {"name": self.name, "arguments": ""}},
                *({"index": index, "function": {"arguments": piece}}
                  for piece in _pieces(self.arguments, size))]


@dataclass(frozen=True)
class FakeReply:
    reasoning: str = DEFAULT_REASONING
    answer: str = DEFAULT_ANSWER
    reasoning_format: ReasoningFormat = "reasoning"
    finish_reason: str = "stop"
    chunk_chars: int = 4
    chunk_delay_s: float = 0.0
    die_after_chunks: int | None = None
    die_mode: Literal["reset", "eof"] = "reset"
    error_after_chunks: int | None = None
    malformed_after_chunks: int | None = None
    malformed_event: str = "data: {\"choices\": [{\"delta\": not json\n\n"
    keepalive_every: int | None = None
    write_bytes: int | None = None
    http_status: int | None = None
    error_message: str = "simulated upstream error"
    chunks: tuple[Any, ...] | None = None
    tool_calls: tuple[FakeToolCall, ...] = ()


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any = None
    client: tuple[str, int] | None = None
    """The client's address and port: one port for several requests is one connection."""
    streamed: bool = False
    chunks_sent: int = 0
    completed: bool = False
    disconnected: bool = False
    ended: threading.Event = field(default_factory=threading.Event)


class SimulatedUpstreamCrash(Exception):
    """Raised inside the app to make uvicorn drop the connection mid-response."""


class _HideSimulatedCrash(logging.Filter):
    """uvicorn logs the exception that kills a connection; ours is on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, SimulatedUpstreamCrash)


_crash_filter = _HideSimulatedCrash()
if _crash_filter not in logging.getLogger("uvicorn.error").filters:
    logging.getLogger("uvicorn.error").addFilter(_crash_filter)


def _error_body(message: str, error_type: str, code: str | int | None,
                param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _pieces(text: str, size: int) -> list[str]:
    size = max(1, size)
    return [text[index:index + size] for index in range(0, len(text), size)]


def _word_count(messages: Any) -> int:
    count = 0
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                count += len(content.split())
    return max(count, 1)


class FakeOpenAIApp:
    """The ASGI app. See the module docstring for the API."""

    def __init__(
        self,
        reply: FakeReply | None = None,
        *,
        responder: Callable[[dict[str, Any]], FakeReply] | None = None,
        models: Iterable[str] = ("fake-model",),
        api_key: str | None = None,
    ) -> None:
        self.reply = reply or FakeReply()
        self.responder = responder
        self.models = list(models)
        self.api_key = api_key
        self.requests: list[RecordedRequest] = []
        self.created = int(time.time())

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [rec for rec in self.requests if rec.path.endswith("/chat/completions")]

    def reset(self) -> None:
        self.requests.clear()

    # -- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        raw_body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            raw_body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = {key.decode("latin-1").lower(): value.decode("latin-1")
                   for key, value in scope.get("headers", [])}
        path: str = scope["path"]
        client = scope.get("client")
        record = RecordedRequest(method=scope["method"], path=path, headers=headers,
                                 client=tuple(client) if client else None)
        self.requests.append(record)
        try:
            # DeepSeek serves its beta features (chat prefix completion) under /beta.
            route = path.removeprefix("/v1").removeprefix("/beta")
            if not self._authorised(headers):
                await _send_json(send, 401, _error_body(
                    "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"))
            elif route == "/models" and scope["method"] == "GET":
                await _send_json(send, 200, self._models_body())
            elif route == "/chat/completions" and scope["method"] == "POST":
                await self._chat(bytes(raw_body), record, receive, send)
            elif route == "/completions" and scope["method"] == "POST":
                await self._completions(bytes(raw_body), record, send)
            else:
                await _send_json(send, 404, _error_body(
                    f"no route {scope['method']} {path}", "invalid_request_error", None))
        finally:
            record.ended.set()

    def _authorised(self, headers: dict[str, str]) -> bool:
        return self.api_key is None or headers.get("authorization") == f"Bearer {self.api_key}"

    def _models_body(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": model, "object": "model", "created": self.created, "owned_by": "fake",
                 "root": model, "parent": None, "max_model_len": 32768}
                for model in self.models
            ],
        }

    async def _chat(self, raw_body: bytes, record: RecordedRequest, receive: Receive,
                    send: Send) -> None:
        try:
            body = json.loads(raw_body)
        except json.JSONDecodeError:
            await _send_json(send, 400, _error_body(
                "Request body is not valid JSON.", "invalid_request_error", None))
            return
        record.body = body
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            await _send_json(send, 400, _error_body(
                "'messages' is a required property", "invalid_request_error", None, "messages"))
            return
        model = body.get("model")
        if model not in self.models:
            await _send_json(send, 404, _error_body(
                f"The model `{model}` does not exist.", "invalid_request_error",
                "model_not_found", "model"))
            return
        reply = self.responder(body) if self.responder else self.reply
        if reply.http_status is not None:
            await _send_json(send, reply.http_status, _error_body(
                reply.error_message, "server_error" if reply.http_status >= 500
                else "invalid_request_error", reply.http_status))
            return
        if body.get("stream"):
            record.streamed = True
            await _Stream(reply, body, record, receive, send).run()
        else:
            await _send_json(send, 200, _completion_body(reply, body))


    async def _completions(self, raw_body: bytes, record: RecordedRequest, send: Send) -> None:
        """``/v1/completions`` as vLLM streams it: ``text_completion`` chunks whose
        ``choices[0].text`` is raw model output (no reasoning parser applies here, so the
        reasoning arrives inline and ends with ``</think>``)."""
        body = json.loads(raw_body)
        record.body = body
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            await _send_json(send, 400, _error_body(
                "'prompt' is a required property", "invalid_request_error", None, "prompt"))
            return
        reply = self.responder(body) if self.responder else self.reply
        text = (reply.reasoning + "</think>" if reply.reasoning else "") + reply.answer
        response_id = f"cmpl-{uuid.uuid4().hex}"

        def chunk(piece: str, finish: str | None) -> bytes:
            data = {"id": response_id, "object": "text_completion", "created": self.created,
                    "model": body.get("model"), "choices": [
                        {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}]}
            return f"data: {json.dumps(data)}\n\n".encode()

        record.streamed = True
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        pieces = _pieces(text, reply.chunk_chars)
        for piece in pieces:
            await send({"type": "http.response.body", "body": chunk(piece, None),
                        "more_body": True})
        await send({"type": "http.response.body", "body": chunk("", reply.finish_reason),
                    "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                    "more_body": False})
        record.completed = True


def create_fake_openai_app(
    reply: FakeReply | None = None,
    *,
    responder: Callable[[dict[str, Any]], FakeReply] | None = None,
    models: Iterable[str] = ("fake-model",),
    api_key: str | None = None,
) -> FakeOpenAIApp:
    """A fake vLLM-like server; see the module docstring."""
    return FakeOpenAIApp(reply, responder=responder, models=models, api_key=api_key)


async def _send_json(send: Send, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def _usage(body: dict[str, Any], completion_tokens: int) -> dict[str, Any]:
    prompt_tokens = _word_count(body.get("messages"))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _completion_body(reply: FakeReply, body: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.answer,
                               "tool_calls": [call.whole() for call in reply.tool_calls]}
    fmt = reply.reasoning_format
    if fmt in ("reasoning", "both"):
        message["reasoning"] = reply.reasoning
    if fmt in ("reasoning_content", "both"):
        message["reasoning_content"] = reply.reasoning
    if fmt == "inline":
        message["content"] = f"<think>{reply.reasoning}</think>{reply.answer}"
    elif fmt == "inline_closing":
        message["content"] = f"{reply.reasoning}</think>{reply.answer}"
    words = len(reply.reasoning.split()) + len(reply.answer.split())
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": reply.finish_reason, "stop_reason": None}],
        "usage": _usage(body, words),
        "prompt_logprobs": None,
    }


class _Stream:
    """One streamed response: builds the events like vLLM, writes them, watches the client."""

    def __init__(self, reply: FakeReply, body: dict[str, Any], record: RecordedRequest,
                 receive: Receive, send: Send) -> None:
        self.reply = reply
        self.body = body
        self.record = record
        self.receive = receive
        self.send = send
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.gone = asyncio.Event()

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        chunk = {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.body.get("model"),
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason,
                         **({"stop_reason": None} if finish_reason else {})}],
        }
        return f"data: {json.dumps(chunk)}\n\n"

    def _events(self) -> list[str]:
        reply = self.reply
        if reply.chunks is not None:
            return [f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}\n\n"
                    for chunk in reply.chunks]
        fmt = reply.reasoning_format
        events = [self._chunk({"role": "assistant", "content": ""})]
        content = reply.answer
        if fmt in ("reasoning", "reasoning_content", "both"):
            for piece in _pieces(reply.reasoning, reply.chunk_chars):
                delta = {"reasoning": piece} if fmt == "reasoning" else (
                    {"reasoning_content": piece} if fmt == "reasoning_content"
                    else {"reasoning": piece, "reasoning_content": piece})
                events.append(self._chunk(delta))
        elif fmt == "inline":
            content = f"<think>{reply.reasoning}</think>{reply.answer}"
        elif fmt == "inline_closing":
            content = f"{reply.reasoning}</think>{reply.answer}"
        events.extend(self._chunk({"content": piece})
                      for piece in _pieces(content, reply.chunk_chars))
        events.extend(self._chunk({"tool_calls": [fragment]})
                      for index, call in enumerate(reply.tool_calls)
                      for fragment in call.fragments(index, reply.chunk_chars))
        events.append(self._chunk({"content": ""}, reply.finish_reason))
        options = self.body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            usage_chunk: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk",
                           "created": self.created, "model": self.body.get("model"),
                           "choices": [], "usage": _usage(self.body, len(events) - 2)}
            events.append(f"data: {json.dumps(usage_chunk)}\n\n")
        return events

    async def _watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.gone.set()
                return

    async def _write(self, data: str) -> bool:
        """Write one event (in pieces if asked); False once the client has gone."""
        raw = data.encode()
        size = self.reply.write_bytes
        parts = [raw] if not size else [raw[i:i + size] for i in range(0, len(raw), size)]
        for part in parts:
            if self.gone.is_set():
                return False
            await self.send({"type": "http.response.body", "body": part, "more_body": True})
            if size:
                await asyncio.sleep(0.001)
        return not self.gone.is_set()

    async def _pause(self) -> None:
        if self.reply.chunk_delay_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.gone.wait(), self.reply.chunk_delay_s)
        else:
            await asyncio.sleep(0)

    async def run(self) -> None:
        reply = self.reply
        await self.send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache")]})
        watcher = asyncio.create_task(self._watch())
        try:
            events = self._events()
            limit = reply.die_after_chunks if reply.die_after_chunks is not None else (
                reply.error_after_chunks)
            for number, event in enumerate(events[:limit] if limit is not None else events):
                if reply.keepalive_every and number and number % reply.keepalive_every == 0:
                    await self._write(": keep-alive\n\n")
                if number == reply.malformed_after_chunks:
                    await self._write(reply.malformed_event)
                if not await self._write(event):
                    self.record.disconnected = True
                    return
                self.record.chunks_sent += 1
                await self._pause()
            if reply.die_after_chunks is not None:
                if reply.die_mode == "reset":
                    raise SimulatedUpstreamCrash("the fake upstream died mid-stream")
                await self.send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            if reply.error_after_chunks is not None:
                error = _error_body(reply.error_message, "server_error", 500)
                await self._write(f"data: {json.dumps(error)}\n\n")
            if not await self._write("data: [DONE]\n\n"):
                self.record.disconnected = True
                return
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
            self.record.completed = True
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
