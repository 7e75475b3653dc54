"""``POST /v1/chat/completions``: validate, guard, and answer streamed or not.

Both paths run the same guarded stream; the non-streamed answer is assembled from it. The case
record is stored before the response ends, however it ends (a flag, an upstream failure, a
client that leaves).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from guardrail.cases.model import Case
from guardrail.events import Finish, ResponseMeta, TextDelta, ToolCallDelta, Usage
from guardrail.monitor import GuardedStream, OutputEvent
from guardrail.tool_calls import ToolCallAccumulator
from guardrail.upstreams.base import ChatRequest
from server.backpressure import Refusal
from server.case_lifecycle import CaseLifecycle
from server.errors import ClientError, error_response, guardrail_error_response
from server.logs import REQUEST_ID_HEADER, request_id
from server.protocol import (
    ChatCompletionRequest,
    ChunkWriter,
    completion_body,
    error_body,
    guardrail_summary,
)
from server.services import Services
from server.streaming import SSE_DONE, DisconnectAwareStreamingResponse, sse_event

logger = logging.getLogger(__name__)
router = APIRouter()

CASE_HEADER = "x-guardrail-case-id"


def _parse_body(raw: bytes) -> tuple[dict[str, Any], ChatCompletionRequest]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ClientError(400, f"request body is not valid JSON: {error}") from None
    except RecursionError:
        raise ClientError(400, "request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ClientError(400, "request body must be a JSON object")
    try:
        # JSON allows escapes such as "\ud800" (a lone surrogate) that no UTF-8 text holds: they
        # could reach neither the model nor the case store.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ClientError(400, "request body is not valid JSON: a string holds a lone "
                          "surrogate escape (not valid Unicode text)") from None
    try:
        parsed = ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        field = _field_path(body, first["loc"]) or "body"
        raise ClientError(400, f"{field}: {first['msg']}", param=field) from None
    return body, parsed


def _field_path(body: Any, loc: tuple[int | str, ...]) -> str:
    """The client's field an error is about. pydantic's location also names the union member
    it tried (``messages.1.content.str``); those parts are not in the body, so the path stops
    where the body does, keeping a last part that is missing (a required field)."""
    parts: list[str] = []
    value = body
    for position, part in enumerate(loc):
        present = (isinstance(value, dict) and part in value) or (
            isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value))
        if not present:
            if position == len(loc) - 1 and isinstance(value, dict):
                parts.append(str(part))
            break
        value = value[part]
        parts.append(str(part))
    return ".".join(parts)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    services: Services = request.app.state.services
    services.drain.refuse_if_draining()
    services.auth.client(request)
    body, parsed = _parse_body(await request.body())
    # A request that arrives while the guard loads waits for it, as its first check would.
    await services.readiness.guard_warm()
    rid = request_id(request.headers.get(REQUEST_ID_HEADER))
    admission = services.gate.admit()
    if isinstance(admission, Refusal):
        # Before the case, the model and the guard: nothing has started that could fail later.
        return error_response(503, admission.message, "server_error", code="guard_overloaded",
                              headers={"retry-after": str(admission.retry_after_s),
                                       REQUEST_ID_HEADER: rid})
    config = services.config
    model = config.upstream.model or parsed.model or "unknown"
    case = Case(model=model, upstream=services.upstream.name, stream=parsed.stream, request=body)
    headers = {CASE_HEADER: case.id, REQUEST_ID_HEADER: rid}
    span = services.tracer.start("POST /v1/chat/completions", {
        "http.request.method": "POST", "http.route": "/v1/chat/completions",
        "guardrail.case_id": case.id, "guardrail.request_id": rid,
        "guardrail.stream": parsed.stream, "guardrail.model": model,
        "guardrail.upstream": services.upstream.name, "guardrail.guard": services.guard.name,
        "guardrail.mode": config.stream.mode,
    }, headers=request.headers)
    monitor = GuardedStream(
        # The trace's context goes upstream with every request for this response.
        request=ChatRequest(body=body, headers=span.context_headers()),
        upstream=services.upstream, guard=services.guard,
        corrector=services.corrector, config=config, metrics=services.metrics, case=case,
        on_checking=admission.checking, on_end=admission.end, span=span,
    )
    lifecycle = CaseLifecycle(services, case, monitor, rid)
    writer = ChunkWriter(f"chatcmpl-{case.id.removeprefix('case_')}", model,
                         config.server.reasoning_field)
    if parsed.stream:
        # A stream sends the case id in its headers but stores the case when it ends: store it
        # before the headers go, so a crash mid-stream cannot leave the client an id of nothing.
        # Started now, so the write overlaps the wait for the model rather than adding to it.
        # (The other answers below are sent only after the case is finished and stored.)
        lifecycle.begin()
    try:
        # Wait for the upstream's first event, so an upstream that cannot be reached is an HTTP
        # error (502) rather than a stream that starts and then fails.
        first = await anext(lifecycle.events)
        await lifecycle.begun()
    except Exception as error:
        failure = lifecycle.fail(error)
        lifecycle.status_code = failure.status_code
        await lifecycle.finish()
        return guardrail_error_response(failure, headers=headers)
    except BaseException:
        await lifecycle.finish()
        raise
    if parsed.stream:
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        stream = _sse_stream(lifecycle, first, writer, include_usage, monitor.output_ready)
        return DisconnectAwareStreamingResponse(stream, media_type="text/event-stream",
                                                headers={**headers, "cache-control": "no-cache"})
    return await _complete(lifecycle, first, writer, headers)


async def _sse_stream(
    lifecycle: CaseLifecycle,
    first: OutputEvent,
    writer: ChunkWriter,
    include_usage: bool,
    more_ready: Callable[[], bool],
) -> AsyncIterator[bytes]:
    """The SSE body. Events that are ready together (a burst from the model, a step released
    at once) go out in one write: the same bytes, fewer writes. ``more_ready`` says whether the
    next event can be had without waiting; only then is anything held back."""
    case = lifecycle.case
    usage: dict[str, Any] | None = None
    held = bytearray()
    try:
        if isinstance(first, ResponseMeta):
            _adopt_meta(writer, first)
        held += sse_event(writer.chunk({"role": "assistant", "content": ""}))
        async for event in _prepend(first, lifecycle.events):  # closed by lifecycle.finish
            if isinstance(event, TextDelta):
                chunk = writer.text(event.channel, event.text)
                if chunk is not None:
                    held += sse_event(chunk)
            elif isinstance(event, ToolCallDelta):
                held += sse_event(writer.tool_call(event.data))
            elif isinstance(event, Usage):
                usage = event.data
            elif isinstance(event, Finish):
                last_extra = {} if include_usage else {"guardrail": guardrail_summary(case)}
                held += sse_event(writer.chunk({}, event.reason, **last_extra))
                if include_usage:
                    held += sse_event(writer.chunk(None, usage=usage,
                                                   guardrail=guardrail_summary(case)))
            if held and not more_ready():
                yield bytes(held)
                held.clear()
        yield bytes(held) + SSE_DONE
    except Exception as error:
        failure = lifecycle.fail(error)
        body = error_body(str(failure), failure.error_type, code=failure.code)
        yield bytes(held) + sse_event({**body, "guardrail": guardrail_summary(case)}) + SSE_DONE
    finally:
        await lifecycle.finish()


async def _complete(
    lifecycle: CaseLifecycle,
    first: OutputEvent,
    writer: ChunkWriter,
    headers: dict[str, str],
) -> Response:
    reasoning: list[str] = []
    content: list[str] = []
    tool_calls = ToolCallAccumulator()
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    try:
        async for event in _prepend(first, lifecycle.events):
            if isinstance(event, TextDelta):
                (reasoning if event.channel == "reasoning" else content).append(event.text)
            elif isinstance(event, ToolCallDelta):
                tool_calls.add(event.data)
            elif isinstance(event, ResponseMeta):
                _adopt_meta(writer, event)
            elif isinstance(event, Usage):
                usage = event.data
            elif isinstance(event, Finish):
                finish_reason = event.reason
    except Exception as error:
        failure = lifecycle.fail(error)
        lifecycle.status_code = failure.status_code
        await lifecycle.finish()
        return guardrail_error_response(failure, headers=headers)
    await lifecycle.finish()
    body = completion_body(writer, reasoning="".join(reasoning), content="".join(content),
                           finish_reason=finish_reason, usage=usage, case=lifecycle.case,
                           tool_calls=tool_calls.calls())
    return JSONResponse(body, headers=headers)


async def _prepend(first: OutputEvent, rest: AsyncIterator[OutputEvent]
                   ) -> AsyncIterator[OutputEvent]:
    """``first``, then the rest. Holds no clean-up of its own: whoever owns ``rest`` closes it."""
    yield first
    async for event in rest:
        yield event


def _adopt_meta(writer: ChunkWriter, meta: ResponseMeta) -> None:
    """Keep the upstream's identity for the response, as a transparent proxy should."""
    if meta.id:
        writer.id = meta.id
    if meta.model:
        writer.model = meta.model
    if meta.created:
        writer.created = meta.created
    writer.system_fingerprint = meta.system_fingerprint
