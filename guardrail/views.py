"""Builds the bounded view a guard sees for one step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from guardrail.events import Channel
from guardrail.guards.base import GuardView


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") in ("text", "input_text")
        )
    return ""


def request_text(messages: Sequence[dict[str, Any]], max_chars: int) -> str:
    """The last user message, cut to its last ``max_chars`` characters (where a request that
    has been padded, as jailbreaks often are, usually puts its actual ask)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            text = message_text(message.get("content"))
            return text[-max_chars:]
    return ""


def build_view(
    request: str, history: Sequence[str], step: str, channel: Channel, window: int,
    round_number: int = 0,
) -> GuardView:
    context = tuple(history[-window:]) if window else ()
    return GuardView(request=request, context=context, step=step, channel=channel,
                     round=round_number)
