"""What flows through the guarded stream. An upstream yields ``UpstreamEvent``s; the monitor
yields ``OutputEvent``s that the server encodes for the client."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Channel = Literal["reasoning", "answer"]


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of text the model wrote, already sorted into reasoning or answer."""

    channel: Channel
    text: str


@dataclass(frozen=True, slots=True)
class HeldText:
    """Text whose channel is not known yet: untagged leading content of an upstream whose
    template may have opened the think block in the prompt (``upstream.think_start: auto``).
    It is split and judged as it streams, but released only once a :class:`HeldResolved` says
    which channel it belongs to."""

    text: str


@dataclass(frozen=True, slots=True)
class HeldResolved:
    """All :class:`HeldText` so far belongs to ``channel``: ``reasoning`` when a ``</think>``
    closed it, ``answer`` when the response ended (or reasoning came in its own field)."""

    channel: Channel


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """One fragment of a tool call, exactly as the model sent it in ``delta.tool_calls``
    (``index``, and on its first fragment ``id``, ``type`` and ``function.name``; then pieces
    of ``function.arguments``). Forwarded in order with the text; not judged by the guard."""

    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Finish:
    """The model stopped: ``stop``, ``length``, ``tool_calls``, ``content_filter``."""

    reason: str | None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts as the upstream reported them (passed on as-is)."""

    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """Identity of the upstream response (first chunk), and any extra choice fields."""

    id: str | None = None
    model: str | None = None
    created: int | None = None
    system_fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


UpstreamEvent = (TextDelta | HeldText | HeldResolved | ToolCallDelta | Finish | Usage
                 | ResponseMeta)


@runtime_checkable
class Closable(Protocol):
    """A stream that can be closed early (an async generator, an HTTP response): closing an
    upstream's stream is what cancels its request."""

    async def aclose(self) -> None: ...
