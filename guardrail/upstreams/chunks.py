"""Turn OpenAI-style ``chat.completion.chunk`` objects into upstream events.

Shared by the upstreams that speak (or convert to) that shape. Reasoning may come as
``delta.reasoning`` (vLLM), ``delta.reasoning_content`` (DeepSeek, LiteLLM, older vLLM, which
for a while sent both with the same text: one is taken, never both), or inline in
``delta.content`` as ``<think>…</think>`` (no reasoning parser upstream), which goes through
:class:`~guardrail.reasoning.InlineThinkParser`.
"""

from __future__ import annotations

from typing import Any

from guardrail.errors import UpstreamStreamBroken
from guardrail.events import Finish, ResponseMeta, TextDelta, UpstreamEvent, Usage
from guardrail.reasoning import InlineThinkParser, ThinkStart

_KNOWN_TOP_LEVEL = frozenset(
    {"id", "object", "created", "model", "system_fingerprint", "choices", "usage"}
)


def stream_error_message(chunk: dict[str, Any]) -> str | None:
    """The message of an error object sent inside a stream, if ``chunk`` is one.

    OpenAI sends ``{"error": {...}}``; vLLM has sent ``{"object": "error", "message": ...}``.
    """
    error = chunk.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or "upstream reported an error")
    if isinstance(error, str) and error:
        return error
    if chunk.get("object") == "error":
        return str(chunk.get("message") or "upstream reported an error")
    return None


class ChunkMapper:
    """Stateful, one per response. ``feed`` each chunk, then ``end`` when the stream ends."""

    def __init__(self, think_start: ThinkStart = "auto", *, keep_extra: bool = True) -> None:
        self._parser = InlineThinkParser(think_start)
        self._keep_extra = keep_extra
        self._meta_sent = False
        self.finish_reason: str | None = None
        # True once a finish_reason arrived (the model completed), or after end().
        self.finished = False

    def feed(self, chunk: dict[str, Any]) -> list[UpstreamEvent]:
        message = stream_error_message(chunk)
        if message is not None:
            raise UpstreamStreamBroken(f"upstream error inside the stream: {message}")
        events: list[UpstreamEvent] = []
        if not self._meta_sent:
            self._meta_sent = True
            events.append(self._meta(chunk))
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                # n > 1 is not guarded: only the first choice is followed.
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    self._feed_choice(choice, events)
                    break
        usage = chunk.get("usage")
        if isinstance(usage, dict) and usage:
            events.append(Usage(dict(usage)))
        return events

    def end(self) -> list[UpstreamEvent]:
        """The stream ended normally (``[DONE]``, or the body ended after a finish reason)."""
        events: list[UpstreamEvent] = []
        if not self.finished:
            events.extend(self._parser.finish())
            events.append(Finish(self.finish_reason))
            self.finished = True
        return events

    def _meta(self, chunk: dict[str, Any]) -> ResponseMeta:
        created = chunk.get("created")
        extra = (
            {key: value for key, value in chunk.items() if key not in _KNOWN_TOP_LEVEL}
            if self._keep_extra
            else {}
        )
        return ResponseMeta(
            id=_str_or_none(chunk.get("id")),
            model=_str_or_none(chunk.get("model")),
            created=int(created) if isinstance(created, int | float) else None,
            system_fingerprint=_str_or_none(chunk.get("system_fingerprint")),
            extra=extra,
        )

    def _feed_choice(self, choice: dict[str, Any], events: list[UpstreamEvent]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            reasoning = delta.get("reasoning")
            if not isinstance(reasoning, str) or not reasoning:
                reasoning = delta.get("reasoning_content")
            if isinstance(reasoning, str) and reasoning:
                events.extend(self._parser.saw_reasoning_field())
                events.append(TextDelta("reasoning", reasoning))
            content = delta.get("content")
            if isinstance(content, str) and content:
                events.extend(self._parser.feed(content))
        reason = choice.get("finish_reason")
        if reason is not None and not self.finished:
            self.finish_reason = str(reason)
            events.extend(self._parser.finish())
            events.append(Finish(self.finish_reason))
            self.finished = True


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
