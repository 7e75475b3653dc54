"""The benchmarks' client: many concurrent streamed chat completions, each timed.

A stream counts as an error if its HTTP status is not 200, if it carries an error event, if it
ends without ``data: [DONE]``, or (with ``expect``) if the reasoning and answer it carried
are not exactly the text the model sent. Time to first token is the time to the first event with
non-empty reasoning or answer text (a proxy's opening role chunk does not count).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

# The first delta with text: `"content":"x` or `"reasoning_content":"x` (any non-quote x).
_FIRST_TEXT = re.compile(rb'"(?:content|reasoning_content|reasoning)":"[^"]')
_DONE = b"data: [DONE]"


@dataclass(frozen=True)
class StreamResult:
    started_s: float
    """When the request was sent (``time.perf_counter``)."""
    total_s: float
    ttft_s: float | None
    error: str | None = None
    corrected: str | None = None
    """The proxy's action when its guard changed the text (``intervened``, ``refused``...): a
    verdict, not a failure, and a different path, so kept out of the latency figures."""
    retry_after_s: float | None = None
    """Set when the proxy refused the request up front (503 with ``Retry-After``: its guard
    was too far behind): the client may come back after that long."""


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str
    """Up to and including ``/v1``."""
    api_key: str | None = None


Expect = Callable[[int], tuple[str, str]]
"""Request number -> the (reasoning, answer) the model will send for it."""

# Numbers every request this process sends, across runs: the fake model answers request N with
# its text number N (benchmarks/fake_upstream.py), so no two nearby streams carry the same text.
_request_numbers = itertools.count()


def chat_body(number: int, model: str = "fake-model") -> dict[str, Any]:
    return {"model": model, "stream": True, "messages": [
        {"role": "user", "content": "How do I keep my sourdough starter alive while I am away "
                                    f"for three weeks? (request {number})"}]}


def streamed_text(body: bytes) -> tuple[str, str]:
    """The (reasoning, answer) that a stream's events carried."""
    reasoning: list[str] = []
    answer: list[str] = []
    for line in body.split(b"\n"):
        if not line.startswith(b"data: {"):
            continue
        for choice in json.loads(line[6:]).get("choices") or []:
            delta = choice.get("delta") or {}
            reasoning.append(delta.get("reasoning_content") or delta.get("reasoning") or "")
            answer.append(delta.get("content") or "")
    return "".join(reasoning), "".join(answer)


class _Connection:
    """One keep-alive HTTP/1.1 connection, spoken by hand: a general client (httpx) costs more
    CPU per chunk than the servers under test, and at high concurrency the client would be what
    the benchmark measured."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.headers: dict[str, str] = {}
        """The last response's headers (lower-case names)."""

    async def post_stream(self, path: str, body: bytes, headers: dict[str, str],
                          on_data: Callable[[bytes], None]) -> int:
        """Send the request, pass each piece of the body to ``on_data``; the HTTP status."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None and self.writer is not None
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n{head}\r\n"
            .encode() + body)
        reader = self.reader
        status_line, *header_lines = (
            (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n"))
        status = int(status_line.split()[1])
        fields = dict(line.lower().split(": ", 1) for line in header_lines if ": " in line)
        self.headers = fields
        keep_alive = fields.get("connection") != "close"
        if fields.get("transfer-encoding") == "chunked":
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await reader.readline()
                    break
                on_data((await reader.readexactly(size + 2))[:-2])
        elif "content-length" in fields:
            on_data(await reader.readexactly(int(fields["content-length"])))
        else:  # the body ends with the connection
            on_data(await reader.read())
            keep_alive = False
        if not keep_alive:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def one_stream(connection: _Connection, target: Target, body: bytes,
                     expect_text: tuple[str, str] | None = None) -> StreamResult:
    headers = {"authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    path = urlsplit(target.base_url).path + "/chat/completions"
    started = time.perf_counter()
    ttft: float | None = None
    received = bytearray()

    def on_data(data: bytes) -> None:
        nonlocal ttft
        # Search only the new bytes and a few before them: a marker can straddle two pieces.
        offset = max(0, len(received) - 32)
        received.extend(data)
        if ttft is None and _FIRST_TEXT.search(received, offset):
            ttft = time.perf_counter() - started

    try:
        status = await connection.post_stream(path, body, headers, on_data)
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as failure:
        connection.close()
        return StreamResult(started, time.perf_counter() - started, ttft,
                            f"{type(failure).__name__}: {failure}")
    total = time.perf_counter() - started
    body = bytes(received)
    if status == 503 and "retry-after" in connection.headers:
        return StreamResult(started, total, ttft, f"HTTP 503: {body[:200]!r}",
                            retry_after_s=float(connection.headers["retry-after"]))
    error = _check(status, body, expect_text)
    action = _ACTION.findall(body[-2000:])
    if error == _DIFFERS and action and action[-1] == b"error":
        # The guard failed (a timeout, say) and the stream ended: a failure, not a verdict.
        error = "the proxy ended the stream with action error (guard failed or timed out)"
    elif error == _DIFFERS and action and action[-1] != b"pass":
        return StreamResult(started, total, ttft, corrected=action[-1].decode())
    return StreamResult(started, total, ttft, error)


_DIFFERS = "streamed text differs from what the model sent"
_ACTION = re.compile(rb'"action":"(\w+)"')


def _check(status: int, body: bytes, expect_text: tuple[str, str] | None) -> str | None:
    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    if (at := body.find(b'"error":')) >= 0:
        return f"error event: {body[at:at + 200]!r}"
    if _DONE not in body[-32:]:
        return "stream ended without [DONE]"
    if expect_text is not None and streamed_text(body) != expect_text:
        return _DIFFERS
    return None


async def run_requests(target: Target, concurrency: int, requests: int,
                       expect: Expect | None = None, refused: list[float] | None = None,
                       ) -> list[StreamResult]:
    """``requests`` streams, ``concurrency`` of them in flight at any time."""
    remaining = iter(range(requests))
    return await _workers(target, concurrency, lambda: next(remaining, None) is not None,
                          expect, refused)


async def run_for(target: Target, concurrency: int, duration_s: float,
                  expect: Expect | None = None, refused: list[float] | None = None,
                  ) -> list[StreamResult]:
    """``concurrency`` streams in flight, each replaced as it ends, for ``duration_s``."""
    deadline = time.perf_counter() + duration_s
    return await _workers(target, concurrency, lambda: time.perf_counter() < deadline, expect,
                          refused)


async def _workers(target: Target, concurrency: int, another: Callable[[], bool],
                   expect: Expect | None, refused: list[float] | None) -> list[StreamResult]:
    """With ``refused``, a request the proxy refuses up front (503, ``Retry-After``) is sent
    again after the time it names, as the OpenAI SDKs do, and each wait is appended there;
    without it, a refusal is an error like any other."""
    results: list[StreamResult] = []
    address = urlsplit(target.base_url)

    async def worker() -> None:
        connection = _Connection(address.hostname or "127.0.0.1", address.port or 80)
        try:
            while another():
                while True:
                    number = next(_request_numbers)
                    payload = json.dumps(chat_body(number)).encode()
                    result = await one_stream(connection, target, payload,
                                              expect(number) if expect else None)
                    if result.retry_after_s is None or refused is None:
                        break
                    refused.append(result.retry_after_s)
                    if result.retry_after_s >= 4:
                        # A server may close a connection idle that long (uvicorn: after 5 s).
                        connection.close()
                    await asyncio.sleep(result.retry_after_s)
                results.append(result)
        finally:
            connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = math.ceil(q * len(ordered) - 1e-9)  # the epsilon: 0.99 * 100 is 99.00000000000001
    return ordered[min(len(ordered), max(1, rank)) - 1]
