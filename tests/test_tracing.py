"""OpenTelemetry traces through the real proxy: the span tree of a corrected request (the SDK's
in-memory exporter), a caller's trace joined through ``traceparent``, a failed upstream, the
OTLP/HTTP path a config sets up (to a collector on loopback), and tracing off by default."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from guardrail.config import TelemetryConfig
from guardrail.tracing import NoTracer, build_tracer
from guardrail.tracing_otel import OtelTracer, tracer_with
from tests.fakes.llama_guard_server import FakeLlamaGuard
from tests.fakes.loopback import LoopbackServers
from tests.fakes.openai_server import create_fake_openai_app
from tests.fakes.otlp_collector import FakeCollector
from tests.proxy_harness import running_proxy, sse_events
from tests.test_intervention import (
    PROMPT,
    REASONING,
    SAFE_CONTINUATION,
    UNSAFE_CONTINUATION,
    ContinuingModel,
)

ROOT = "POST /v1/chat/completions"


def traced(exporter: InMemorySpanExporter) -> OtelTracer:
    return tracer_with(SimpleSpanProcessor(exporter))


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [span for span in spans
            if span.parent is not None and span.parent.span_id == parent.context.span_id]


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def wait_for_root(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    """The request span ends after the case is stored, a moment after the stream's last byte."""
    import time

    deadline = time.monotonic() + 5
    while not any(span.name == ROOT for span in exporter.get_finished_spans()):
        assert time.monotonic() < deadline, "the request span never ended"
        time.sleep(0.02)
    return list(exporter.get_finished_spans())


def test_the_span_tree_of_a_corrected_request(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    model = ContinuingModel([UNSAFE_CONTINUATION, SAFE_CONTINUATION])
    app = create_fake_openai_app(responder=model)
    with running_proxy(tmp_path, upstream_app=app, tracer=traced(exporter),
                       overrides={"correction": {"strategy": "intervene"}},
                       fake_guard=FakeLlamaGuard(rules={"pipe bomb": "S9"})) as proxy:
        _, raw = proxy.stream_raw(PROMPT)
        summary = sse_events(raw)[-2]["guardrail"]
        assert summary["action"] == "intervened"
        case = proxy.case(summary["case_id"])
        spans = wait_for_root(exporter)

    [root] = named(spans, ROOT)
    assert root.kind is SpanKind.SERVER and root.parent is None
    assert attrs(root) | {"guardrail.case_id": case["id"]} == attrs(root)
    assert attrs(root)["guardrail.action"] == "intervened"
    assert attrs(root)["guardrail.status"] == "ok"
    assert attrs(root)["http.response.status_code"] == 200
    assert attrs(root)["guardrail.corrections"] == 2
    assert root.status.status_code is StatusCode.UNSET
    assert {span.context.trace_id for span in spans if span.context} == {
        root.context.trace_id if root.context else 0}

    # Under the request: the model's own attempt (its upstream call and checks), one span per
    # correction round, and the case write.
    top = children(spans, root)
    assert sorted(span.name for span in top if span.name != "guardrail.guard_check") == [
        "guardrail.case_store", "guardrail.correction", "guardrail.correction",
        "guardrail.upstream"]
    [upstream] = named(top, "guardrail.upstream")
    assert upstream.kind is SpanKind.CLIENT
    assert attrs(upstream)["guardrail.round"] == 0
    # The fake model sends its whole reply at once: read to the end, or cut short by the flag.
    assert attrs(upstream)["guardrail.outcome"] in {"completed", "cancelled"}
    assert attrs(upstream)["guardrail.events"] > 0
    [store] = named(top, "guardrail.case_store")
    assert attrs(store)["guardrail.stored"] is True

    first, second = sorted(named(top, "guardrail.correction"),
                           key=lambda span: attrs(span)["guardrail.round"])
    assert attrs(first) | {"guardrail.round": 1, "guardrail.cause": "flagged",
                           "guardrail.categories": ("S9",), "guardrail.strategy": "intervene",
                           "guardrail.action": "intervened", "guardrail.form": "vllm",
                           "guardrail.outcome": "unsafe_again"} == attrs(first)
    assert attrs(second)["guardrail.outcome"] == "recovered"
    for number, correction in ((1, first), (2, second)):
        [continuation] = named(children(spans, correction), "guardrail.upstream")
        assert attrs(continuation)["guardrail.round"] == number
    assert attrs(named(children(spans, second), "guardrail.upstream")[0])[
        "guardrail.outcome"] == "completed"

    # One check span per step, under its round's parent, saying what the case says.
    checks = named(spans, "guardrail.guard_check")
    assert len(checks) == len(case["steps"])
    parent_of_round = {0: root, 1: first, 2: second}
    by_step = {attrs(span)["guardrail.step"]: span for span in checks}
    for step in case["steps"]:
        span = by_step[step["index"]]
        parent = parent_of_round[step["round"]]
        assert span.parent is not None and parent.context is not None
        assert span.parent.span_id == parent.context.span_id
        assert attrs(span)["guardrail.round"] == step["round"]
        assert attrs(span)["guardrail.guard"] == "llama-guard"
        if step["unsafe"] is not None:  # judged, not cancelled by the flag before it
            verdict = "unsafe" if step["unsafe"] else "safe"
            assert attrs(span)["guardrail.verdict"] == verdict
            assert list(attrs(span)["guardrail.categories"]) == step["categories"]
    unsafe = [span for span in checks if attrs(span).get("guardrail.verdict") == "unsafe"]
    # The model's attempt and the first continuation were flagged; the second one recovered.
    assert {attrs(span)["guardrail.round"] for span in unsafe} == {0, 1}

    # Never the text: no attribute value holds any of the prompt's or the trace's words.
    for span in spans:
        for value in attrs(span).values():
            for text in (PROMPT, REASONING, UNSAFE_CONTINUATION, SAFE_CONTINUATION):
                for word in ("pipe bomb", "casing", "MARKER", "seal", "assembly"):
                    if word in text:
                        assert word not in str(value), (span.name, value)


def test_a_callers_traceparent_is_the_parent(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with running_proxy(tmp_path, tracer=traced(exporter)) as proxy:
        response = proxy.client.post(
            "/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
            headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
        assert response.status_code == 200
        spans = wait_for_root(exporter)
    [root] = named(spans, ROOT)
    assert root.context is not None and root.parent is not None
    assert f"{root.context.trace_id:032x}" == trace_id
    assert f"{root.parent.span_id:016x}" == parent_id
    assert attrs(root)["guardrail.action"] == "pass"
    assert attrs(root)["guardrail.stream"] is False
    # The model server is told the trace too (vLLM joins it when it traces).
    [sent] = [request for request in proxy.upstream.requests
              if request.path == "/v1/chat/completions"]
    assert sent.headers["traceparent"] == (
        f"00-{trace_id}-{root.context.span_id:016x}-01")


def test_off_no_trace_context_goes_upstream(tmp_path: Path) -> None:
    with running_proxy(tmp_path) as proxy:
        response = proxy.client.post(
            "/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
            headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
        assert response.status_code == 200
        [sent] = [request for request in proxy.upstream.requests
                  if request.path == "/v1/chat/completions"]
        assert "traceparent" not in sent.headers


def test_an_upstream_that_cannot_be_reached_is_a_failed_trace(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    # Port 9 (discard) on loopback: nothing listens, the connection is refused.
    with running_proxy(tmp_path, tracer=traced(exporter),
                       overrides={"upstream": {"url": "http://127.0.0.1:9/v1",
                                               "connect_timeout_s": 2}}) as proxy:
        response = proxy.chat("hi", stream=True)
        assert response.status_code == 502
        spans = wait_for_root(exporter)
    [root] = named(spans, ROOT)
    [upstream] = named(spans, "guardrail.upstream")
    assert attrs(upstream)["guardrail.outcome"] == "failed"
    assert upstream.status.status_code is StatusCode.ERROR
    assert root.status.status_code is StatusCode.ERROR
    assert attrs(root)["error.type"] == attrs(upstream)["error.type"]
    assert attrs(root)["guardrail.status"] == "error"
    assert attrs(root)["http.response.status_code"] == 502


def test_a_configured_endpoint_gets_the_spans_over_otlp_http(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("OTEL_SERVICE_NAME", "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(variable, raising=False)
    collector = FakeCollector()
    with LoopbackServers() as servers:
        endpoint = servers.serve(collector.app())
        with running_proxy(tmp_path,
                           overrides={"telemetry": {"otlp_endpoint": endpoint}}) as proxy:
            response = proxy.chat("hi")
            assert response.status_code == 200
            case_id = response.headers["x-guardrail-case-id"]
        # Batched in the background; the proxy's shutdown sends what is left.
        [root] = [span for span in collector.spans if span["name"] == ROOT]
    assert root["attributes"]["guardrail.case_id"] == case_id
    assert root["resource"]["service.name"] == "reasoning-guardrail"
    names = {span["name"] for span in collector.spans}
    assert {"guardrail.upstream", "guardrail.guard_check", "guardrail.case_store"} <= names


def test_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                     "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(variable, raising=False)
    assert isinstance(build_tracer(TelemetryConfig()), NoTracer)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    tracer = build_tracer(TelemetryConfig())
    assert isinstance(tracer, OtelTracer)
    tracer.shutdown()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert isinstance(build_tracer(TelemetryConfig(otlp_endpoint="http://127.0.0.1:9")),
                      NoTracer)


def test_without_the_extra_one_line_says_so(monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    # A None entry makes the import fail as it does where the extra is not installed.
    monkeypatch.setitem(sys.modules, "guardrail.tracing_otel", None)
    with caplog.at_level(logging.WARNING, logger="guardrail.tracing"):
        tracer = build_tracer(TelemetryConfig(otlp_endpoint="http://127.0.0.1:9"))
    assert isinstance(tracer, NoTracer)
    [record] = caplog.records
    assert "telemetry.otlp_endpoint" in record.getMessage()
    assert "pip install 'reasoning-guardrail[otel]'" in record.getMessage()


def test_the_proxy_never_loads_the_sdk_when_traces_are_off() -> None:
    # LiteLLM imports the OpenTelemetry API on its own; the SDK and our backend stay unloaded.
    code = ("import sys\n"
            "import guardrail.monitor, guardrail.tracing\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
            "from server.app import create_app\n"
            "from guardrail.tracing import build_tracer\n"
            "from guardrail.config import TelemetryConfig\n"
            "create_app(); build_tracer(TelemetryConfig())\n"
            "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', "
            "'opentelemetry.exporter', 'guardrail.tracing_otel'))))\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "[]"]
