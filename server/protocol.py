"""The OpenAI wire types the proxy reads and writes, in one place.

Requests are validated here but forwarded as the client sent them: fields this module does not
name are allowed and reach the upstream untouched.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from guardrail.cases.model import Case


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False
    """Strict: ``"stream": "yes"`` or ``1`` is a mistake to report, not a value to guess at."""
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    """One choice per request: each is guarded as its own stream of steps."""

    @field_validator("stream", mode="before")
    @classmethod
    def _null_stream(cls, value: Any) -> Any:
        return False if value is None else value  # the OpenAI API allows "stream": null


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(
    message: str, error_type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return ErrorResponse(
        error=ErrorDetail(message=message, type=error_type, param=param, code=code)
    ).model_dump()


def guardrail_summary(case: Case) -> dict[str, Any]:
    """What every response says about what the proxy did (no offending text).

    ``wait_words``: how much the model wrote that the client waited for and never saw (the
    withheld text of every correction, in whitespace words): CARE's "wait tokens", counted
    without a tokenizer."""
    return {
        "case_id": case.id,
        "action": case.action,
        "checks": case.checks,
        "flagged": [flag.model_dump() for flag in case.flagged],
        "corrections": len(case.corrections),
        "wait_words": sum(len(correction.withheld.split()) for correction in case.corrections),
    }


ReasoningField = Literal["reasoning_content", "reasoning", "both", "hidden"]


def reasoning_fields(text: str, how: ReasoningField) -> dict[str, str]:
    if how == "hidden":
        return {}
    if how == "both":
        return {"reasoning_content": text, "reasoning": text}
    return {how: text}


class ChunkWriter:
    """Builds ``chat.completion.chunk`` objects for one response."""

    def __init__(self, response_id: str, model: str, reasoning_field: ReasoningField) -> None:
        self.id = response_id
        self.model = model
        self.created = int(time.time())
        self.reasoning_field = reasoning_field
        self.system_fingerprint: str | None = None

    def chunk(
        self,
        delta: dict[str, Any] | None,
        finish_reason: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": []
            if delta is None
            else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.system_fingerprint:
            body["system_fingerprint"] = self.system_fingerprint
        body.update(extra)
        return body

    def text(self, channel: str, text: str) -> dict[str, Any] | None:
        if channel == "answer":
            return self.chunk({"content": text})
        fields = reasoning_fields(text, self.reasoning_field)
        return self.chunk(dict(fields)) if fields else None

    def tool_call(self, fragment: dict[str, Any]) -> dict[str, Any]:
        """One ``delta.tool_calls`` fragment, as the model sent it."""
        return self.chunk({"tool_calls": [fragment]})


def completion_body(
    writer: ChunkWriter,
    *,
    reasoning: str,
    content: str,
    finish_reason: str | None,
    usage: dict[str, Any] | None,
    case: Case,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    # As OpenAI answers: content null when the model only called tools.
    message: dict[str, Any] = {"role": "assistant",
                               "content": content if content or not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if reasoning:
        message.update(reasoning_fields(reasoning, writer.reasoning_field))
    body: dict[str, Any] = {
        "id": writer.id,
        "object": "chat.completion",
        "created": writer.created,
        "model": writer.model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": usage,
        "guardrail": guardrail_summary(case),
    }
    if writer.system_fingerprint:
        body["system_fingerprint"] = writer.system_fingerprint
    return body
