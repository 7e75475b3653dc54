"""Runs the real proxy (create_app + uvicorn on loopback) against fakes that speak the real wire
formats: a vLLM-like model server and a Llama Guard served the vLLM way."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from guardrail.config import Config, config_from_mapping
from guardrail.tracing import Tracer
from server.app import create_app
from tests.fakes.llama_guard_server import FakeLlamaGuard
from tests.fakes.loopback import LoopbackServers
from tests.fakes.openai_server import FakeOpenAIApp, FakeReply, create_fake_openai_app


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class Proxy:
    url: str
    config: Config
    upstream: FakeOpenAIApp
    guard: FakeLlamaGuard
    store_path: Path
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def chat(self, content: str = "hello", **body: Any) -> httpx.Response:
        payload = {"model": "fake-model", "messages": [{"role": "user", "content": content}],
                   **body}
        return self.client.post("/v1/chat/completions", json=payload)

    def stream_raw(self, content: str = "hello", **body: Any) -> tuple[httpx.Response, bytes]:
        payload = {"model": "fake-model", "messages": [{"role": "user", "content": content}],
                   "stream": True, **body}
        with self.client.stream("POST", "/v1/chat/completions", json=payload) as response:
            raw = response.read()
        return response, raw

    def case(self, case_id: str, *, wait_s: float = 5.0) -> dict[str, Any]:
        """The FINAL stored case (``status: complete``), polled for up to ``wait_s``.

        A streamed case is stored twice: ``in_progress`` before the headers go, and complete
        when the stream ends. A client that leaves mid-stream returns before the second write,
        so reading once could assert on the first; a test that reads a case always waits for
        the final one, and fails with what it last saw if that never comes."""
        deadline = time.monotonic() + wait_s
        while True:
            response = self.client.get(f"/admin/cases/{case_id}",
                                       headers=self.admin_headers())
            if response.status_code == 200:
                body: dict[str, Any] = response.json()
                if body.get("status") == "complete":
                    return body
            elif response.status_code != 404:
                raise AssertionError(f"case {case_id}: HTTP {response.status_code}: "
                                     f"{response.text}")
            if time.monotonic() > deadline:
                raise AssertionError(f"case {case_id} has no final record after {wait_s} s; "
                                     f"last seen: HTTP {response.status_code} {response.text}")
            time.sleep(0.02)

    def admin_headers(self) -> dict[str, str]:
        keys = self.config.server.named_admin_keys()
        return {"authorization": f"Bearer {keys[0][1]}"} if keys else {}


def sse_events(raw: bytes) -> list[Any]:
    """The JSON payloads of an SSE body, and the string "[DONE]"."""
    events: list[Any] = []
    for block in raw.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_text(events: list[Any]) -> tuple[str, str]:
    reasoning, content = [], []
    for event in events:
        if isinstance(event, dict):
            for choice in event.get("choices", []):
                delta = choice.get("delta", {})
                reasoning.append(delta.get("reasoning_content") or "")
                content.append(delta.get("content") or "")
    return "".join(reasoning), "".join(content)


@contextmanager
def running_proxy(
    tmp_path: Path,
    reply: FakeReply | None = None,
    *,
    guard: str = "llama-guard",
    overrides: dict[str, Any] | None = None,
    fake_guard: FakeLlamaGuard | None = None,
    upstream_app: FakeOpenAIApp | None = None,
    tracer: Tracer | None = None,
) -> Iterator[Proxy]:
    fake_guard = fake_guard or FakeLlamaGuard()
    upstream_app = upstream_app or create_fake_openai_app(reply or FakeReply())
    # The proxy and its fakes stop together when the block ends (after the client closes).
    with LoopbackServers() as servers, ExitStack() as stack:
        upstream_url = servers.serve(upstream_app)
        guard_url = servers.serve(fake_guard.app())
        store_path = tmp_path / "cases.db"
        data = {
            "upstream": {"url": f"{upstream_url}/v1"},
            "guard": {"kind": guard, "url": f"{guard_url}/v1", "timeout_s": 5},
            # Refusal keeps these tests about the stream; tests/test_intervention.py covers
            # the default, intervene.
            "correction": {"strategy": "refuse"},
            # Sentence-sized steps, so tests can say exactly where a cut falls.
            "stream": {"min_step_chars": 24},
            "store": {"url": f"sqlite:///{store_path}",
                      "fallback_path": str(tmp_path / "unstored.jsonl")},
        }
        config = config_from_mapping(merge(data, overrides or {}))
        # Only when given: tests swap create_app for a wrapper that takes the config alone.
        app = create_app(config) if tracer is None else create_app(config, tracer=tracer)
        url = servers.serve(app)
        proxy = Proxy(url, config, upstream_app, fake_guard, store_path)
        stack.callback(proxy.client.close)
        yield proxy
