"""Durability: SIGKILL the real server (``guardrail serve`` in a subprocess) while streams are in
flight, restart it on the same store, and find every case whose id a client was given.

The id reaches the client in the response headers as the stream starts; the finished case is
stored when the stream ends. The case must already be in the store in between (``in_progress``),
or a crash would hand clients ids that point at nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.loopback import free_port, serve_app
from tests.fakes.openai_server import FakeReply, create_fake_openai_app

GUARDRAIL = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "guardrail"
CLIENTS = 20
# About 50 chunks of 4 characters, 0.1 s apart: every stream lasts ~5 s, far longer than it
# takes to open them all and kill the server.
REPLY = FakeReply(chunk_delay_s=0.1)
PAYLOAD = {"model": "fake-model", "stream": True,
           "messages": [{"role": "user", "content": "What is 2 + 2?"}]}

pytestmark = pytest.mark.skipif(not GUARDRAIL.exists(), reason=f"{GUARDRAIL} not installed")


@contextmanager
def guardrail_server(
    config_path: Path, log_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``guardrail serve`` on a free loopback port, ready to answer; killed and reaped on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [str(GUARDRAIL), "serve", "--config", str(config_path), "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(url, process, log_path)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def _wait_ready(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 60
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"guardrail serve exited {process.returncode}:\n"
                                     f"{log_path.read_text(errors='replace')}")
            try:
                if client.get(f"{url}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"guardrail serve not ready in 60 s:\n"
                         f"{log_path.read_text(errors='replace')}")


class StreamingClient(threading.Thread):
    """Opens one streamed chat request, notes the case id from its headers, then reads until
    the stream ends or the connection dies."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.settled = threading.Event()  # headers arrived, or the request failed before them
        self.case_id: str | None = None
        self.status: int | None = None
        self.done = False  # [DONE] arrived: the stream ended before the kill
        self.error: str | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=10) as client, client.stream(
                "POST", f"{self.url}/v1/chat/completions", json=PAYLOAD
            ) as response:
                self.status = response.status_code
                self.case_id = response.headers.get("x-guardrail-case-id")
                self.settled.set()
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
        except httpx.HTTPError as error:  # the kill cuts the stream: expected
            self.error = repr(error)
        finally:
            self.settled.set()  # never leave the main thread waiting on a dead client


def test_sigkill_mid_stream_loses_no_case_id_a_client_received(tmp_path: Path) -> None:
    upstream = create_fake_openai_app(REPLY)
    with serve_app(upstream) as upstream_url:
        config = {
            "upstream": {"url": f"{upstream_url}/v1"},
            "guard": {"kind": "none"},
            "store": {"url": f"sqlite:///{tmp_path / 'cases.db'}",
                      "fallback_path": str(tmp_path / "unstored.jsonl")},
        }
        config_path = tmp_path / "guardrail.yaml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        log_path = tmp_path / "server.log"

        with guardrail_server(config_path, log_path) as (url, process):
            clients = [StreamingClient(url) for _ in range(CLIENTS)]
            for client in clients:
                client.start()
            deadline = time.monotonic() + 30
            for client in clients:
                assert client.settled.wait(timeout=max(0.0, deadline - time.monotonic())), (
                    "clients did not get their response headers in time")
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            for client in clients:
                client.join(timeout=15)
            assert not any(client.is_alive() for client in clients), "a client hung"

        received = [client.case_id for client in clients if client.case_id is not None]
        assert all(client.status == 200 for client in clients), [c.error for c in clients]
        assert len(received) == CLIENTS and len(set(received)) == CLIENTS
        # The kill really fell mid-stream (else the test proves nothing about durability).
        cut = [client for client in clients if not client.done]
        assert cut, "every stream ended before the kill"

        with guardrail_server(config_path, log_path) as (url, _), \
                httpx.Client(base_url=url, timeout=10) as admin:
            statuses: dict[str, Any] = {}
            for case_id in received:
                response = admin.get(f"/admin/cases/{case_id}")
                assert response.status_code == 200, (case_id, response.text)
                case = response.json()
                assert case["id"] == case_id
                statuses[case_id] = case["status"]
        assert set(statuses.values()) <= {"in_progress", "complete"}
        # Streams cut by the kill were found as they started, not as they would have ended.
        assert "in_progress" in statuses.values()
