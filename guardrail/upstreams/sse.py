"""A minimal server-sent-events reader: enough for OpenAI-style streams, by the SSE rules.

Lines arrive already split (the upstream joins lines that were split across network chunks);
an event is dispatched at a blank line; several ``data:`` lines join with
``\\n``; comment lines (``: keep-alive``) and other fields (``event:``, ``id:``, ``retry:``) are
ignored, since OpenAI-compatible servers put everything in ``data``.
"""

from __future__ import annotations


class SSEDecoder:
    """Feed lines one at a time; get a data payload back when an event is complete."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed_line(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return None

    def flush(self) -> str | None:
        """End of stream: a last event without its blank line is still delivered (servers that
        close right after ``data: [DONE]`` are common)."""
        return self._dispatch()

    def _dispatch(self) -> str | None:
        if not self._data:
            return None
        payload = "\n".join(self._data)
        self._data = []
        # The SSE rules dispatch nothing for empty data (``data:`` then a blank line).
        return payload or None

