"""SIGTERM drains: a real ``guardrail serve``, streams in flight from the OpenAI SDK, SIGTERM, then
the stored cases. During the drain new requests get 503 and ``/readyz`` says not ready; streams
in flight finish and their cases end complete; a stream still running at the deadline ends with
an error event and its case says why."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.loopback import serve_app
from tests.fakes.openai_server import FakeReply, create_fake_openai_app
from tests.serve_process import ServeProcess, metric, stored_cases

REASONING = "".join(f"Step {number} of the plan is fine. " for number in range(12))
ANSWER = "All steps done."


@pytest.fixture(scope="module")
def slow_model() -> Iterator[str]:
    # 4 characters a chunk every 20 ms: about 2.5 s for the whole reply.
    reply = FakeReply(reasoning=REASONING, answer=ANSWER, chunk_chars=4, chunk_delay_s=0.02)
    with serve_app(create_fake_openai_app(reply)) as url:
        yield url


def start(tmp_path: Path, model_url: str, drain_seconds: float, workers: int = 1
          ) -> ServeProcess:
    serve = ServeProcess(tmp_path, {
        "upstream": {"url": f"{model_url}/v1"},
        "guard": {"kind": "none"},
        "store": {"url": f"sqlite:///{tmp_path / 'cases.db'}",
                  "fallback_path": str(tmp_path / "unstored.jsonl")},
        "server": {"drain_seconds": drain_seconds, "workers": workers},
    })
    serve.wait_healthy()
    return serve


def stream_all(url: str, started: threading.Event) -> dict[str, Any]:
    """One streamed completion through the OpenAI SDK: what arrived and how it ended."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    reasoning, content = [], []
    response = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "plan it"}], stream=True)
    case_id = response.headers["x-guardrail-case-id"]
    try:
        for chunk in response.parse():
            if chunk.choices:
                delta = chunk.choices[0].delta
                reasoning.append(getattr(delta, "reasoning_content", None) or "")
                content.append(delta.content or "")
                if "".join(reasoning):
                    started.set()
    except openai.APIError as error:
        return {"case_id": case_id, "reasoning": "".join(reasoning), "error": str(error)}
    return {"case_id": case_id, "reasoning": "".join(reasoning), "content": "".join(content),
            "error": None}


def start_streams(url: str, count: int) -> list[Future[dict[str, Any]]]:
    pool = ThreadPoolExecutor(max_workers=count)
    events = [threading.Event() for _ in range(count)]
    futures = [pool.submit(stream_all, url, event) for event in events]
    pool.shutdown(wait=False)
    for event in events:
        assert event.wait(20), "a stream never started"
    return futures


def drained(log: str) -> tuple[int, int, int]:
    """The drain's outcome, summed over the workers' log lines."""
    totals = [0, 0, 0]
    for found in re.finditer(r"drained: (\d+) finished, (\d+) ended at the deadline, (\d+) left",
                             log):
        for index in range(3):
            totals[index] += int(found.group(index + 1))
    return totals[0], totals[1], totals[2]


@pytest.mark.parametrize(("workers", "group"), [(1, False), (2, False), (2, True)],
                         ids=["1-worker", "2-workers", "2-workers-whole-group"])
def test_sigterm_drains_streams_in_flight_and_their_cases_end_complete(
    tmp_path: Path, slow_model: str, workers: int, group: bool
) -> None:
    serve = start(tmp_path, slow_model, drain_seconds=30, workers=workers)
    try:
        futures = start_streams(serve.url, 3)
        # With the whole group signalled each worker gets SIGTERM twice (its own, and the one
        # the supervisor forwards): it must still drain, not stop at once.
        serve.terminate(group=group)
        time.sleep(0.3)  # the drain starts on the server's next tick (0.1 s)
        assert serve.process.poll() is None, "the process left with streams in flight"
        with httpx.Client(base_url=serve.url, timeout=10) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["draining"] is True
            assert client.get("/healthz").status_code == 200  # alive, just not taking work
            refused = client.post("/v1/chat/completions", json={
                "model": "fake-model", "messages": [{"role": "user", "content": "more?"}]})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "shutting_down"
            assert refused.headers["retry-after"] == "1"
        results = [future.result(timeout=30) for future in futures]
        assert serve.wait(30) == 0
    finally:
        serve.stop()
    for result in results:
        assert result["error"] is None
        assert (result["reasoning"], result["content"]) == (REASONING, ANSWER)
    cases = {case["id"]: case for case in stored_cases(tmp_path / "cases.db")}
    assert set(cases) == {result["case_id"] for result in results}  # the refused one has none
    for case in cases.values():
        assert (case["status"], case["action"], case["error"]) == ("complete", "pass", None)
    assert drained(serve.stderr()) == (3, 0, 0)


def test_a_stream_still_running_at_the_deadline_ends_cleanly_with_its_case(
    tmp_path: Path,
) -> None:
    # About 12 s of reply against a 1 s drain.
    reply = FakeReply(reasoning=REASONING * 5, answer=ANSWER, chunk_chars=4, chunk_delay_s=0.03)
    with serve_app(create_fake_openai_app(reply)) as model_url:
        serve = start(tmp_path, model_url, drain_seconds=1)
        try:
            futures = start_streams(serve.url, 2)
            # And one not streamed: nothing reaches its client until it ends.
            with ThreadPoolExecutor(max_workers=1) as pool:
                plain = pool.submit(httpx.post, f"{serve.url}/v1/chat/completions", timeout=30,
                                    json={"model": "fake-model", "messages": [
                                        {"role": "user", "content": "plan it"}]})
                wait_in_flight(serve.url, 3)
                started = time.monotonic()
                serve.terminate()
                results = [future.result(timeout=30) for future in futures]
                refused = plain.result(timeout=30)
            assert serve.wait(30) == 0
            took = time.monotonic() - started
        finally:
            serve.stop()
    assert took < 8, f"the drain outlived its deadline: {took:.1f} s"
    for result in results:
        assert result["error"] is not None and "shutting down" in result["error"]
        assert 0 < len(result["reasoning"]) < len(REASONING * 5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    cases = {case["id"]: case for case in stored_cases(tmp_path / "cases.db")}
    assert set(cases) == {result["case_id"] for result in results} | {
        refused.headers["x-guardrail-case-id"]}
    for case in cases.values():
        assert case["status"] == "complete" and case["action"] == "error"
        assert case["error"].startswith("ShuttingDown: ") and "drain" in case["error"]
    assert drained(serve.stderr()) == (0, 3, 0)


def wait_in_flight(url: str, count: int) -> None:
    """Until the proxy's own gauge counts ``count`` responses in flight."""
    deadline = time.monotonic() + 20
    while metric(httpx.get(f"{url}/metrics").text, "guardrail_streams_in_flight") != count:
        assert time.monotonic() < deadline, "the responses never were all in flight"
        time.sleep(0.05)
