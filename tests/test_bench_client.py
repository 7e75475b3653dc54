"""The benchmarks' own machinery: its client must count what the servers did, or the figures in
benchmarks/RESULTS.md mean nothing. (The benchmarks themselves run in `make bench`.)"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from benchmarks.fake_upstream import ANSWER, REASONING, VARIANTS, FakeUpstream, Script, texts
from benchmarks.launch import start_upstream
from benchmarks.stream_client import Target, percentile, run_requests, streamed_text
from tests.fakes import FakeReply, LoopbackServers, create_fake_openai_app, serve_app


def test_fake_upstream_streams_the_whole_text_in_the_chunks_asked_for() -> None:
    app = FakeUpstream(Script(chunks=40, chunk_delay_s=0.0))
    for variant in (0, 7, VARIANTS - 1):
        body = b"".join(app.streams[variant])
        assert streamed_text(body) == texts(variant)
        assert len(app.streams[variant]) == 40 + 3  # role, 40 pieces, finish chunk, [DONE]


def test_no_two_nearby_streams_share_a_sentence() -> None:
    # A guard that remembers embeddings must not judge one stream's steps from another's.
    first, second = texts(1), texts(2)
    sentences = {sentence for text in first for sentence in text.split(". ")}
    assert not sentences & {sentence for text in second for sentence in text.split(". ")}
    assert texts(3) == texts(3 + VARIANTS) and texts(3)[0].startswith(REASONING[:40])


def test_client_times_and_checks_each_stream() -> None:
    with serve_app(FakeUpstream(Script(chunks=50, chunk_delay_s=0.002)), lifespan="off") as url:
        results = asyncio.run(run_requests(Target("direct", f"{url}/v1"), 4, 10, texts))
    assert len(results) == 10 and not [r.error for r in results if r.error]
    for result in results:
        assert result.ttft_s is not None
        # 52 events 2 ms apart: the first text comes early, the end about 0.1 s later.
        assert result.ttft_s < result.total_s and result.total_s >= 0.09


def test_client_reports_a_stream_that_differs_from_the_model() -> None:
    altered = FakeReply(reasoning=REASONING, answer=ANSWER.replace("jar", "box"),
                        reasoning_format="reasoning_content")
    with serve_app(create_fake_openai_app(altered)) as url:
        results = asyncio.run(run_requests(Target("altered", f"{url}/v1"), 2, 2,
                                           lambda _: (REASONING, ANSWER)))
    assert [r.error for r in results] == ["streamed text differs from what the model sent"] * 2


def test_client_reports_http_errors_and_error_events() -> None:
    failing = FakeReply(http_status=503, error_message="overloaded")
    broken = FakeReply(reasoning="R", answer="A", error_after_chunks=1)
    with LoopbackServers() as servers:
        down = servers.serve(create_fake_openai_app(failing))
        erring = servers.serve(create_fake_openai_app(broken))
        refused = asyncio.run(run_requests(Target("down", f"{down}/v1"), 1, 1))
        errored = asyncio.run(run_requests(Target("erring", f"{erring}/v1"), 1, 1))
    assert refused[0].error is not None and refused[0].error.startswith("HTTP 503")
    assert errored[0].error is not None and errored[0].error.startswith("error event")


def test_client_reports_a_refused_connection() -> None:
    from tests.fakes import free_port

    results = asyncio.run(run_requests(Target("nobody", f"http://127.0.0.1:{free_port()}/v1"),
                                       1, 1))
    assert results[0].error is not None and "Connect" in results[0].error


def test_upstream_process_is_measured_and_stopped() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server, target = start_upstream(Path(tmp), chunks=20)
        try:
            server.wait_ready(timeout_s=60)
            results = asyncio.run(run_requests(target, 2, 6, texts))
            assert not [r.error for r in results if r.error]
            assert server.cpu_seconds() > 0
            assert 5 < server.memory_mib() <= server.memory_mib("VmHWM")
        finally:
            server.stop()
        assert server.process.poll() is not None


def test_percentile_is_nearest_rank() -> None:
    samples = [float(n) for n in range(1, 101)]
    assert percentile(samples, 0.5) == 50.0
    assert percentile(samples, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0


def test_a_guard_correction_is_counted_apart_from_errors() -> None:
    # A proxy that changed the text and says so (its guardrail summary) made a verdict, not a
    # failure: counted apart, so that it is neither an error nor a fast stream.
    from tests.fakes.llama_guard_server import FakeLlamaGuard
    from tests.proxy_harness import running_proxy

    reply = FakeReply(reasoning=REASONING, answer="Mix flour and water, then wait.")
    with tempfile.TemporaryDirectory() as tmp, running_proxy(
            Path(tmp), reply, fake_guard=FakeLlamaGuard(rules={"flour": "S1"})) as proxy:
        target = Target("proxy", f"{proxy.url}/v1")
        results = asyncio.run(run_requests(target, 1, 2, lambda _: (REASONING, reply.answer)))
    assert [(r.error, r.corrected) for r in results] == [(None, "refused")] * 2
