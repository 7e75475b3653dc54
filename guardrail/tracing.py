"""Traces of a request: one span for the request, children for each upstream call, guard check,
correction round and case write.

The core sees only the ``Tracer`` and ``Span`` protocols below; OpenTelemetry lives in
``guardrail.tracing_otel``, imported only when traces are asked for (``telemetry.otlp_endpoint``
or the standard ``OTEL_EXPORTER_OTLP_*ENDPOINT`` variables). Off, every span is ``NO_SPAN``:
a method call that does nothing, made per request, round and check, never per chunk.

Attributes name things (case id, guard, verdict, action, counts), never the text of a request
or a step, nor a key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

from guardrail.config import TelemetryConfig

logger = logging.getLogger(__name__)

AttributeValue = str | int | float | bool | Sequence[str]
Attributes = Mapping[str, AttributeValue]
SpanKind = Literal["internal", "client", "server"]


class Span(Protocol):
    def child(self, name: str, attributes: Attributes | None = None, *,
              kind: SpanKind = "internal") -> Span:
        """A span under this one, started now."""
        ...

    def set(self, attributes: Attributes) -> None: ...

    def fail(self, error_type: str) -> None:
        """Mark the span failed; ``error_type`` is a class or kind name, never a message
        (messages can quote what the model or the guard said)."""
        ...

    def end(self) -> None:
        """End the span; a second call does nothing."""
        ...

    def context_headers(self) -> dict[str, str]:
        """W3C trace context (``traceparent``) for a request this span makes, so a model
        server that traces (vLLM with ``--otlp-traces-endpoint``) joins the trace; none when
        off."""
        ...


class Tracer(Protocol):
    def start(self, name: str, attributes: Attributes | None = None, *,
              headers: Mapping[str, str] | None = None) -> Span:
        """A request's root span; a ``traceparent`` in ``headers`` makes it the caller's
        child."""
        ...

    def shutdown(self) -> None:
        """Send what is still buffered, and stop."""
        ...


class _NoSpan:
    __slots__ = ()

    def child(self, name: str, attributes: Attributes | None = None, *,
              kind: SpanKind = "internal") -> Span:
        return self

    def set(self, attributes: Attributes) -> None:
        pass

    def fail(self, error_type: str) -> None:
        pass

    def end(self) -> None:
        pass

    def context_headers(self) -> dict[str, str]:
        return {}


NO_SPAN: Span = _NoSpan()


class NoTracer:
    """Tracing off."""

    def start(self, name: str, attributes: Attributes | None = None, *,
              headers: Mapping[str, str] | None = None) -> Span:
        return NO_SPAN

    def shutdown(self) -> None:
        pass


_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def traces_wanted(config: TelemetryConfig) -> str | None:
    """What asked for traces (for the start-up line), or None when nothing did."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if config.otlp_endpoint:
        return "telemetry.otlp_endpoint"
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    return next((name for name in _ENDPOINT_VARIABLES if os.environ.get(name)), None)


def build_tracer(config: TelemetryConfig) -> Tracer:
    """The tracer the config asks for; without the ``otel`` extra, one warning and none."""
    source = traces_wanted(config)
    if source is None:
        return NoTracer()
    try:
        from guardrail.tracing_otel import otlp_tracer
    except ImportError as error:
        logger.warning("traces asked for (%s) but OpenTelemetry is not installed (%s): "
                       "pip install 'reasoning-guardrail[otel]'; serving without traces",
                       source, error.name or error)
        return NoTracer()
    tracer = otlp_tracer(config)
    logger.info("traces: OTLP/HTTP to %s", config.otlp_endpoint or f"${source}")
    return tracer
