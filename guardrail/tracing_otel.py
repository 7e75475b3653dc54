"""The OpenTelemetry backend of ``guardrail.tracing``: imported only when traces are on, and only
with the ``otel`` extra installed."""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode

from guardrail import __version__
from guardrail.config import TelemetryConfig
from guardrail.tracing import Attributes, Span, SpanKind

_KINDS = {"internal": trace.SpanKind.INTERNAL, "client": trace.SpanKind.CLIENT,
          "server": trace.SpanKind.SERVER}
DEFAULT_SERVICE_NAME = "reasoning-guardrail"


class OtelSpan:
    __slots__ = ("_ended", "_span", "_tracer")

    def __init__(self, tracer: trace.Tracer, span: trace.Span) -> None:
        self._tracer = tracer
        self._span = span
        self._ended = False

    def child(self, name: str, attributes: Attributes | None = None, *,
              kind: SpanKind = "internal") -> Span:
        context = trace.set_span_in_context(self._span)
        return OtelSpan(self._tracer, self._tracer.start_span(
            name, context=context, kind=_KINDS[kind], attributes=attributes))

    def set(self, attributes: Attributes) -> None:
        self._span.set_attributes(attributes)

    def fail(self, error_type: str) -> None:
        self._span.set_attribute("error.type", error_type)
        self._span.set_status(Status(StatusCode.ERROR))

    def end(self) -> None:
        # The SDK warns on a second end; a span can be ended by a clean-up path and a normal one.
        if not self._ended:
            self._ended = True
            self._span.end()

    def context_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        inject(headers, context=trace.set_span_in_context(self._span))
        return headers


class OtelTracer:
    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("guardrail", __version__)

    def start(self, name: str, attributes: Attributes | None = None, *,
              headers: Mapping[str, str] | None = None) -> Span:
        context = extract(headers) if headers is not None else None
        return OtelSpan(self._tracer, self._tracer.start_span(
            name, context=context, kind=trace.SpanKind.SERVER, attributes=attributes))

    def shutdown(self) -> None:
        self._provider.shutdown()


def tracer_with(processor: SpanProcessor, config: TelemetryConfig | None = None) -> OtelTracer:
    """A tracer whose spans go to ``processor`` (tests pass the SDK's in-memory exporter)."""
    config = config or TelemetryConfig()
    attributes: dict[str, str] = {SERVICE_VERSION: __version__}
    if config.service_name:
        attributes[SERVICE_NAME] = config.service_name
    elif not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = DEFAULT_SERVICE_NAME
    # The sampler comes from OTEL_TRACES_SAMPLER as the SDK reads it (parent-based, always on).
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(processor)
    return OtelTracer(provider)


def otlp_tracer(config: TelemetryConfig) -> OtelTracer:
    """Spans batched in the background and sent over OTLP/HTTP, to ``telemetry.otlp_endpoint``
    or where the ``OTEL_EXPORTER_OTLP_*`` variables say."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    endpoint = None
    if config.otlp_endpoint:
        # Like OTEL_EXPORTER_OTLP_ENDPOINT: a base URL, with the traces path added.
        endpoint = config.otlp_endpoint.rstrip("/")
        if not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"
    return tracer_with(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)), config)
