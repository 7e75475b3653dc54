"""Turn OpenAI-style ``chat.completion.chunk`` objects into upstream events.

Shared by the upstreams that speak (or convert to) that shape. Reasoning may come as
``delta.reasoning`` (vLLM), ``delta.reasoning_content`` (DeepSeek, LiteLLM, older vLLM, which
for a while sent both with the same text: one is taken, never both), or inline in
``delta.content`` as ``<think>…</think>`` (no reasoning parser upstream), which goes through
:class:`~guardrail.reasoning.InlineThinkParser`. Tool-call fragments (``delta.tool_calls``) pass
through as they were sent, one :class:`~guardrail.events.ToolCallDelta` each.
"""

from __future__ import annotations

import math
from typing import Any

from guardrail.errors import UpstreamStreamBroken
from guardrail.events import (
    Finish,
    ResponseMeta,
    TextDelta,
    ToolCallDelta,
    UpstreamEvent,
    Usage,
)
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
    """Stateful, one per response. ``feed`` each chunk, then ``end`` when the stream ends.

    Chunks of any shape: what has a clear meaning is taken (``choices`` null or missing on a
    usage-only chunk, ``delta`` or ``usage`` null, an empty object, a list of text parts where
    text belongs, ``finish_reason: ""`` on a chunk that does not finish); anything else raises
    :class:`UpstreamStreamBroken` naming the field, which the proxy turns into a clean error.
    The checks are exact-type tests on the fields read, cheap enough for every chunk.
    """

    def __init__(self, think_start: ThinkStart = "auto", *, keep_extra: bool = True) -> None:
        self._parser = InlineThinkParser(think_start)
        self._keep_extra = keep_extra
        self._meta_sent = False
        self.finish_reason: str | None = None
        # True once a finish_reason arrived (the model completed), or after end().
        self.finished = False

    def feed(self, chunk: dict[str, Any]) -> list[UpstreamEvent]:
        if not chunk:
            # An empty object says nothing (a gateway's keep-alive); it must not stand in for
            # the first chunk, whose id and model the response adopts.
            return []
        message = stream_error_message(chunk)
        if message is not None:
            raise UpstreamStreamBroken(f"upstream error inside the stream: {message}")
        events: list[UpstreamEvent] = []
        if not self._meta_sent:
            self._meta_sent = True
            events.append(self._meta(chunk))
        choices = chunk.get("choices")
        if choices.__class__ is list:
            for position, choice in enumerate(choices):
                if choice.__class__ is not dict:
                    raise _malformed(f"choices[{position}]", choice, "an object")
                index = choice.get("index")
                if index is not None and index != 0:
                    if index.__class__ is not int:
                        raise _malformed(f"choices[{position}].index", index, "an integer")
                    # The proxy asks for one choice (it refuses n > 1), so another one is text
                    # it did not ask for and can neither guard nor deliver; and a server that
                    # numbers from 1 would otherwise end in an empty answer, unexplained.
                    raise UpstreamStreamBroken(
                        f"upstream sent choice index {index}; the proxy asks for one choice "
                        "(n=1) and follows index 0 only")
                self._feed_choice(choice, position, events)
        elif choices is not None:  # null or missing: a usage-only (or metadata) chunk
            raise _malformed("choices", choices, "a list")
        usage = chunk.get("usage")
        # A usage that is not an object is dropped, not an error: it says nothing about the
        # text, and it comes last, after an answer that is complete and judged.
        if usage.__class__ is dict and usage:
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
        extra = (
            {key: value for key, value in chunk.items() if key not in _KNOWN_TOP_LEVEL}
            if self._keep_extra
            else {}
        )
        return ResponseMeta(
            id=_str_or_none(chunk.get("id")),
            model=_str_or_none(chunk.get("model")),
            created=_timestamp(chunk.get("created")),
            system_fingerprint=_str_or_none(chunk.get("system_fingerprint")),
            extra=extra,
        )

    def _feed_choice(self, choice: dict[str, Any], position: int,
                     events: list[UpstreamEvent]) -> None:
        delta = choice.get("delta")
        if delta.__class__ is dict:
            reasoning = delta.get("reasoning")
            if reasoning is not None and reasoning.__class__ is not str:
                reasoning = _text(reasoning, position, "reasoning", answer=False)
            if not reasoning:
                # vLLM sent both fields with the same text for a while: one is taken, never both.
                reasoning = delta.get("reasoning_content")
                if reasoning is not None and reasoning.__class__ is not str:
                    reasoning = _text(reasoning, position, "reasoning_content", answer=False)
            if reasoning:
                if self.finished:
                    raise _after_finish(position, "reasoning")
                events.extend(self._parser.saw_reasoning_field())
                events.append(TextDelta("reasoning", reasoning))
            content = delta.get("content")
            if content is not None and content.__class__ is not str:
                content = _text(content, position, "content", answer=True)
            if content:
                if self.finished:
                    raise _after_finish(position, "content")
                events.extend(self._parser.feed(content))
            tool_calls = delta.get("tool_calls")
            if tool_calls is not None:
                events.extend(_tool_calls(tool_calls, position, self.finished))
        elif delta is not None:
            raise _malformed(f"choices[{position}].delta", delta, "an object")
        elif choice.get("message") is not None:
            # A whole message where a delta belongs: the full text so far, or only the new
            # text? Servers differ, and a wrong guess repeats or loses text.
            raise UpstreamStreamBroken(
                f"upstream sent a malformed chunk: choices[{position}] has a message but no "
                "delta")
        # else: delta null or missing, no text (a chunk that only finishes)
        reason = choice.get("finish_reason")
        if reason is not None:
            if reason.__class__ is not str:
                raise _malformed(f"choices[{position}].finish_reason", reason, "a string")
            # "" is how some servers say "not yet"; only a named reason ends the response.
            if reason and not self.finished:
                self.finish_reason = reason
                events.extend(self._parser.finish())
                events.append(Finish(reason))
                self.finished = True


def _text(value: Any, position: int, field: str, *, answer: bool) -> str:
    """The text of a delta field that is neither a plain string nor null: a list of parts is
    joined; anything else is malformed.

    A number (or a boolean, or an object) is rejected rather than stringified: no server sends
    one for text, so it means a broken server or gateway, and its string form may not be what
    the model wrote (``1e3``, ``007``, ``true``); the guard would judge, and the client read,
    text the model never produced.
    """
    if isinstance(value, str):  # a subclass of str (a library's own string type)
        return str(value)
    path = f"choices[{position}].delta.{field}"
    if value.__class__ is not list:
        raise _malformed(path, value, "a string")
    texts: list[str] = []
    for number, part in enumerate(value):
        if part.__class__ is str:
            texts.append(part)
            continue
        if part.__class__ is dict:
            text = part.get("text")
            # In the answer only a text part is text: another type (an image, or a "thinking"
            # part) must not reach the client as the answer.
            if text.__class__ is str and (not answer or part.get("type", "text") == "text"):
                texts.append(text)
                continue
            kind = part.get("type")
            raise UpstreamStreamBroken(
                f"upstream sent a malformed chunk: {path}[{number}] is a part "
                f"{'of type ' + repr(kind) + ' ' if kind is not None else ''}"
                "that is not text")
        raise _malformed(f"{path}[{number}]", part, "a string or a text part")
    return "".join(texts)


def _tool_calls(value: Any, position: int, finished: bool) -> list[UpstreamEvent]:
    """``delta.tool_calls`` as sent. A whole message's calls (a server that did not stream)
    carry no ``index``: their place in the list is their index."""
    path = f"choices[{position}].delta.tool_calls"
    if value.__class__ is not list:
        raise _malformed(path, value, "a list")
    events: list[UpstreamEvent] = []
    for number, call in enumerate(value):
        if call.__class__ is not dict:
            raise _malformed(f"{path}[{number}]", call, "an object")
        index = call.get("index", number)
        if index.__class__ is not int:
            raise _malformed(f"{path}[{number}].index", index, "an integer")
        if finished:
            raise _after_finish(position, "tool_calls")
        events.append(ToolCallDelta(call if "index" in call else {"index": index, **call}))
    return events


def _after_finish(position: int, field: str) -> UpstreamStreamBroken:
    # The response, finish reason and all, may already be out: the text has nowhere to go.
    return UpstreamStreamBroken(
        f"upstream sent a malformed chunk: choices[{position}].delta.{field} holds "
        f"{'a tool call' if field == 'tool_calls' else 'text'} after the finish_reason")


def _malformed(path: str, value: Any, wanted: str) -> UpstreamStreamBroken:
    return UpstreamStreamBroken(
        f"upstream sent a malformed chunk: {path} is {type(value).__name__}, not {wanted}")


def _timestamp(value: Any) -> int | None:
    if value.__class__ is int:
        return int(value)
    if value.__class__ is float and math.isfinite(value):
        return int(value)
    return None  # a string, NaN (Python's JSON reader accepts it), anything else


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
