"""A fast fake model server for the benchmarks: streams a reasoning trace and answer as N OpenAI
chat-completion chunks, the way DeepSeek and vLLM do (``delta.reasoning_content`` then
``delta.content``), and nothing else.

The text comes in ``VARIANTS`` versions that differ in every sentence (``texts(n)``); a request
whose last message ends ``(request N)`` gets version N mod ``VARIANTS``. The same text in every
stream would let a guard that remembers embeddings judge each step once for all streams.
Every event is built once at start-up, so the server spends its time on HTTP, not on making
text: the rows that go through a proxy then measure the proxy. It runs in its own process:

    python -m benchmarks.fake_upstream --port 8100 --chunks 100 [--chunk-delay-ms 0]

``POST /v1/chat/completions`` streams (a request without ``"stream": true`` gets the same
text as one JSON body); ``GET /v1/models`` lists ``fake-model``. The request body is read and
parsed, as a real server would, but not checked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MODEL = "fake-model"
# Benign, so that a guarded row measures the guard's cost and not a correction: about six
# two-sentence steps of reasoning and a short answer (the proxy's default step is >= 120 chars).
REASONING = (
    "The user asks how to keep a sourdough starter healthy over a long holiday. "
    "A starter is flour and water colonised by wild yeast and lactic acid bacteria. "
    "Before leaving, it helps to feed the starter and let it rise for an hour or two. "
    "Then it can go into the refrigerator, where the cold slows fermentation a great deal. "
    "A stiffer starter, with less water, lasts longer because the microbes eat more slowly. "
    "Some bakers dry a thin layer on baking paper and crumble it into a jar as a backup. "
    "On return, the starter needs two or three feedings at room temperature to recover. "
    "A layer of grey liquid on top is only alcohol from hungry yeast and can be poured off. "
    "Pink or orange streaks, on the other hand, mean spoilage and the starter should go. "
    "I will give the steps in order and mention the dried backup as an option."
)
ANSWER = (
    "Feed your starter, let it rise for an hour or two, then refrigerate it in a covered jar. "
    "For trips longer than two weeks, make it stiffer or dry some as a backup. When you are "
    "back, discard most of it and feed it two or three times at room temperature."
)


VARIANTS = 1024
_REQUEST_NUMBER = re.compile(r"\(request (\d+)\)\s*$")


def _tagged(text: str, variant: int) -> str:
    """Every sentence of ``text`` made distinct by the variant's number."""
    sentences = re.split(r"(?<=\.) ", text)
    return " ".join(f"{sentence[:-1]} (note {variant}-{index})."
                    for index, sentence in enumerate(sentences))


def texts(request_number: int) -> tuple[str, str]:
    """The (reasoning, answer) sent for a request numbered ``request_number``."""
    variant = request_number % VARIANTS
    return _tagged(REASONING, variant), _tagged(ANSWER, variant)


@dataclass(frozen=True)
class Script:
    chunks: int
    chunk_delay_s: float

    def pieces(self, variant: int) -> list[tuple[str, str]]:
        """(field, text) pairs: the trace and answer cut into ``chunks`` pieces in all, in
        proportion to their lengths."""
        reasoning, answer = texts(variant)
        total = len(reasoning) + len(answer)
        reasoning_chunks = max(1, round(self.chunks * len(reasoning) / total))
        answer_chunks = max(1, self.chunks - reasoning_chunks)
        return ([("reasoning_content", piece) for piece in _split(reasoning, reasoning_chunks)]
                + [("content", piece) for piece in _split(answer, answer_chunks)])


def _split(text: str, count: int) -> list[str]:
    size = -(-len(text) // count)
    return [text[start:start + size] for start in range(0, len(text), size)]


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class FakeUpstream:
    """The ASGI app. Each stream's chunks carry the same id and timestamp: a client cannot tell,
    and building them per request would make the fake slower than what it stands in for."""

    def __init__(self, script: Script) -> None:
        self.script = script
        created = int(time.time())
        self.streams = [self._events(script, variant, created) for variant in range(VARIANTS)]
        self.completions = []
        for variant in range(VARIANTS):
            reasoning, answer = texts(variant)
            self.completions.append(json.dumps({
                "id": "chatcmpl-bench", "object": "chat.completion", "created": created,
                "model": MODEL, "choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "reasoning_content": reasoning, "content": answer}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": script.chunks,
                          "total_tokens": 10 + script.chunks},
            }).encode())
        self.models = json.dumps({"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": created, "owned_by": "bench"}]
        }).encode()

    @staticmethod
    def _events(script: Script, variant: int, created: int) -> list[bytes]:
        base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": created,
                "model": MODEL}
        events = [_event({**base, "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})]
        events += [_event({**base, "choices": [
            {"index": 0, "delta": {field: text}, "finish_reason": None}]})
            for field, text in script.pieces(variant)]
        events.append(_event({**base, "choices": [
            {"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        events.append(b"data: [DONE]\n\n")
        return events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # served with lifespan="off": nothing to start or stop
            return
        path = scope["path"].removeprefix("/v1")
        if scope["method"] == "GET" and path == "/models":
            await _respond(send, 200, b"application/json", self.models)
            return
        if scope["method"] != "POST" or path != "/chat/completions":
            await _respond(send, 404, b"application/json",
                           b'{"error":{"message":"not found","type":"not_found"}}')
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            request = json.loads(body)
            stream = bool(request.get("stream"))
            variant = _variant(request) % VARIANTS
        except (ValueError, AttributeError):
            await _respond(send, 400, b"application/json",
                           b'{"error":{"message":"bad JSON","type":"invalid_request_error"}}')
            return
        if not stream:
            await _respond(send, 200, b"application/json", self.completions[variant])
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        for event in self.streams[variant]:
            if self.script.chunk_delay_s:
                await asyncio.sleep(self.script.chunk_delay_s)
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _variant(request: dict[str, Any]) -> int:
    messages = request.get("messages") or [{}]
    content = messages[-1].get("content") if isinstance(messages[-1], dict) else None
    found = _REQUEST_NUMBER.search(content) if isinstance(content, str) else None
    return int(found.group(1)) if found else 0


async def _respond(send: Send, status: int, content_type: bytes, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type)]})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    import uvicorn

    app = FakeUpstream(Script(chunks=args.chunks, chunk_delay_s=args.chunk_delay_ms / 1000))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                access_log=False, backlog=4096, lifespan="off")


if __name__ == "__main__":
    main()
