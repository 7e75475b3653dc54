"""Splits streamed text into steps: sentences (or paragraphs) with a bounded length.

The splitter is incremental and lossless: the steps it returns, joined, are exactly the text fed
to it, so what the proxy releases is exactly what the model wrote.
"""

from __future__ import annotations

from typing import Literal

# Latin and CJK full stops, question and exclamation marks, and the ellipsis.
_SENTENCE_END = frozenset(".!?\u3002\uff01\uff1f\u2026")


class StepSplitter:
    """Feed text as it arrives; take back each step once its boundary is certain.

    A sentence ends at ``.``/``!``/``?`` followed by white space (which stays with it), or at a
    newline; a paragraph at a blank line. Steps shorter than ``min_chars`` are joined with the
    next so the guard has enough to judge; none is longer than ``max_chars``, so a model that
    never ends a sentence is still checked as it goes.
    """

    def __init__(
        self,
        split: Literal["sentence", "paragraph"] = "sentence",
        max_chars: int = 600,
        min_chars: int = 24,
    ) -> None:
        if max_chars < 2 or min_chars >= max_chars:
            raise ValueError("need 0 <= min_chars < max_chars and max_chars >= 2")
        self.split = split
        self.max_chars = max_chars
        self.min_chars = min_chars
        self._buffer = ""
        self._resume_at = 0  # where the next scan starts; everything before it holds no boundary

    @property
    def pending(self) -> str:
        """Text received but not yet part of a finished step."""
        return self._buffer

    def feed(self, text: str) -> list[str]:
        self._buffer += text
        return self._drain()

    def finish(self) -> list[str]:
        """End of text: whatever is buffered becomes the last step(s)."""
        steps = self._drain(final=True)
        if self._buffer:
            steps.append(self._buffer)
        self._buffer = ""
        self._resume_at = 0
        return steps

    def _drain(self, final: bool = False) -> list[str]:
        steps: list[str] = []
        while (cut := self._next_cut(final)) is not None:
            steps.append(self._buffer[:cut])
            self._buffer = self._buffer[cut:]
            self._resume_at = 0
        return steps

    def _next_cut(self, final: bool) -> int | None:
        text = self._buffer
        limit = min(len(text), self.max_chars)
        index = self._resume_at
        while index < limit:
            end = self._boundary_after(text, index, final)
            if end == -1:  # need the next character to decide
                self._resume_at = index
                return self._forced_cut(text)
            if end is not None and end >= self.min_chars:
                return end
            index += 1
        self._resume_at = index
        return self._forced_cut(text)

    def _boundary_after(self, text: str, index: int, final: bool) -> int | None:
        """End of a step whose last mark is at ``index``; None if none; -1 if undecidable yet."""
        char = text[index]
        has_next = index + 1 < len(text)
        if self.split == "paragraph":
            if char != "\n":
                return None
            if not has_next:
                return None if final else -1
            return index + 2 if text[index + 1] == "\n" else None
        if char == "\n":
            return index + 1
        if char in _SENTENCE_END:
            if not has_next:
                return None if final else -1
            return index + 2 if text[index + 1].isspace() else None
        return None

    def _forced_cut(self, text: str) -> int | None:
        """A step at ``max_chars`` with no boundary: cut after the last space, if any."""
        if len(text) < self.max_chars:
            return None
        window = text[: self.max_chars]
        space = max(window.rfind(" "), window.rfind("\n"), window.rfind("\t"))
        return space + 1 if space >= self.min_chars else self.max_chars
