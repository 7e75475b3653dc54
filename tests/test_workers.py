"""``guardrail serve --workers 2``: two processes really serve, ``/metrics`` of either sums both,
the rate limit holds across them, both write one SQLite store safely, and the metrics folder is
gone after the exit. Real subprocesses on loopback, a fake model in this process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.loopback import serve_app
from tests.fakes.openai_server import FakeReply, create_fake_openai_app
from tests.serve_process import ServeProcess, metric, stored_cases

BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "2+2?"}]}


@pytest.fixture(scope="module")
def fake_model() -> Iterator[str]:
    reply = FakeReply(reasoning="Two and two. That makes four.", answer="2 + 2 = 4.")
    with serve_app(create_fake_openai_app(reply)) as url:
        yield url


def config(tmp_path: Path, fake_model: str, **server: Any) -> dict[str, Any]:
    return {
        "upstream": {"url": f"{fake_model}/v1"},
        "guard": {"kind": "none"},
        "store": {"url": f"sqlite:///{tmp_path / 'cases.db'}",
                  "fallback_path": str(tmp_path / "unstored.jsonl")},
        "server": {"workers": 2, **server},
    }


def pinned_clients(url: str, tries: int = 40) -> dict[int, httpx.Client]:
    """Clients that each keep one connection, so each talks to one worker: one per worker pid
    seen (connections are spread over the workers by the kernel)."""
    clients: dict[int, httpx.Client] = {}
    for _ in range(tries):
        client = httpx.Client(base_url=url, timeout=30,
                              limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        pid = client.get("/healthz").json()["pid"]
        if pid in clients:
            client.close()
        else:
            clients[pid] = client
        if len(clients) == 2:
            break
    return clients


def pids_of(client: httpx.Client) -> int:
    pid: int = client.get("/healthz").json()["pid"]
    return pid


def test_two_workers_serve_and_metrics_are_summed_over_both(
    tmp_path: Path, fake_model: str
) -> None:
    runtime = tmp_path / "tmp"
    runtime.mkdir()
    serve = ServeProcess(tmp_path, config(tmp_path, fake_model), env={"TMPDIR": str(runtime)})
    try:
        serve.wait_healthy()
        clients = pinned_clients(serve.url)
        assert len(clients) == 2, f"one worker answered every connection: {list(clients)}"
        (pid_a, first), (pid_b, second) = clients.items()
        assert pid_a != pid_b and serve.process.pid not in (pid_a, pid_b)
        for client, count in ((first, 3), (second, 5)):
            for _ in range(count):
                assert client.post("/v1/chat/completions", json=BODY).status_code == 200
        # Each worker answered its own requests over its connection ...
        assert (pids_of(first), pids_of(second)) == (pid_a, pid_b)
        # ... and either one's /metrics counts all eight.
        for client in (first, second):
            scraped = client.get("/metrics").text
            assert metric(scraped, "guardrail_requests_total", stream="false",
                          status="ok") == 8
            assert metric(scraped, "guardrail_streams_in_flight") == 0
        for client in clients.values():
            client.close()
        # Metrics files live in a fresh folder of the supervisor's, there while it serves.
        assert [path.name.startswith("guardrail-serve-") for path in runtime.iterdir()] == [True]
    finally:
        serve.stop()
    assert list(runtime.iterdir()) == [], "the metrics folder was left behind"


def test_two_workers_write_one_sqlite_store_without_losing_a_case(
    tmp_path: Path, fake_model: str
) -> None:
    serve = ServeProcess(tmp_path, config(tmp_path, fake_model))
    try:
        serve.wait_healthy()
        sent = 60

        def one(index: int) -> tuple[str, int]:
            # A connection per request, so both workers take a share of the writes.
            with httpx.Client(base_url=serve.url, timeout=30) as client:
                response = client.post("/v1/chat/completions",
                                       json={**BODY, "stream": index % 2 == 0})
                return response.headers["x-guardrail-case-id"], response.status_code

        with ThreadPoolExecutor(max_workers=12) as pool:
            results = list(pool.map(one, range(sent)))
        assert all(status == 200 for _, status in results)
    finally:
        serve.stop()
    cases = {case["id"]: case for case in stored_cases(tmp_path / "cases.db")}
    assert set(cases) == {case_id for case_id, _ in results}
    assert all(case["status"] == "complete" and case["error"] is None
               for case in cases.values())
    assert not (tmp_path / "unstored.jsonl").exists(), "a write fell back: the store was busy"


def test_the_rate_limit_holds_across_workers(tmp_path: Path, fake_model: str) -> None:
    """The workers share their token buckets: a client whose connections reach both still gets
    the configured burst, not twice it."""
    serve = ServeProcess(tmp_path, config(
        tmp_path, fake_model, rate_limit={"requests_per_minute": 1, "burst": 3}))
    try:
        serve.wait_healthy()
        clients = pinned_clients(serve.url)
        assert len(clients) == 2
        first, second = clients.values()
        statuses = [client.post("/v1/chat/completions", json=BODY).status_code
                    for client in (first, second, first, second, first)]
        assert statuses == [200, 200, 200, 429, 429]
        assert int(second.post("/v1/chat/completions", json=BODY).headers["retry-after"]) > 1
        for client in clients.values():
            client.close()
    finally:
        serve.stop()


def test_workers_must_be_at_least_one(tmp_path: Path, fake_model: str) -> None:
    serve = ServeProcess(tmp_path, config(tmp_path, fake_model), args=("--workers", "0"))
    assert serve.wait(30) == 2
    lines = serve.stderr().splitlines()
    assert len(lines) == 1 and lines[0].startswith("guardrail: config error: server.workers")


def test_a_worker_that_cannot_load_its_guard_stops_the_server_with_one_line(
    tmp_path: Path, fake_model: str
) -> None:
    # llama-guard without a url loads guard.model in each worker as it warms up; there is
    # none here, so both workers fail after they started listening.
    broken = {**config(tmp_path, fake_model), "guard": {"kind": "llama-guard"}}
    serve = ServeProcess(tmp_path, broken)
    assert serve.wait(90) == 2, serve.stderr()
    errors = [line for line in serve.stderr().splitlines()
              if line.startswith("guardrail: config error")]
    assert len(errors) == 1 and "guard.model" in errors[0], serve.stderr()
    assert not os.path.exists(tmp_path / "unstored.jsonl")


def test_a_guards_own_counters_are_copied_into_a_counter_for_several_workers() -> None:
    """With several workers a custom collector is never read, so a cascade's counters are
    mirrored into a Counter: each sync adds what grew since the last one."""
    from prometheus_client import CollectorRegistry, generate_latest

    from guardrail.guards.plumbing.stats import GuardStatsMirror

    class Counting:
        name = "cascade"

        def __init__(self) -> None:
            self.counts = {"escalated": 0, "first_only": 0}

        def stats(self) -> dict[str, int]:
            return dict(self.counts)

    guard = Counting()
    registry = CollectorRegistry()
    mirror = GuardStatsMirror(guard, registry)
    guard.counts.update(escalated=2, first_only=5)
    mirror.sync()
    guard.counts.update(escalated=3)
    mirror.sync()
    mirror.sync()  # nothing new: nothing added
    text = generate_latest(registry).decode()
    assert metric(text, "guardrail_guard_stats_total", guard="cascade", stat="escalated") == 3
    assert metric(text, "guardrail_guard_stats_total", guard="cascade", stat="first_only") == 5
