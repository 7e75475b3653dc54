"""What flows through the guarded stream. An upstream yields ``UpstreamEvent``s; the monitor
yields ``OutputEvent``s that the server encodes for the client."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Channel = Literal["reasoning", "answer"]


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of text the model wrote, already sorted into reasoning or answer."""

    channel: Channel
    text: str


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


UpstreamEvent = TextDelta | Finish | Usage | ResponseMeta
