"""Split ``content`` that carries the reasoning inline (``<think>…</think>``) into reasoning and
answer text, incrementally, as it streams.

Upstreams differ: vLLM with a reasoning parser sends reasoning in its own field; without one the
tags stay in ``content``; R1-style chat templates put ``<think>`` in the *prompt*, so the output
holds only ``</think>``. This parser accepts all of these. Its invariant: the reasoning deltas
concatenate to exactly the text inside the think block and the answer deltas to exactly the text
after it; only the tags (and whitespace before a leading tag) are dropped.

Untagged leading text in ``auto`` mode is :class:`~guardrail.events.HeldText` until a
``</think>`` (reasoning) or the end (answer) decides, and a
:class:`~guardrail.events.HeldResolved` says which: the text streams on, so the monitor can judge
it while it is held, and holding it costs no more than passing it on (only a possible tag
prefix is kept back).
"""

from __future__ import annotations

from typing import Literal

from guardrail.events import Channel, HeldResolved, HeldText, TextDelta

ThinkStart = Literal["auto", "reasoning", "answer"]

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"

_State = Literal["leading", "reasoning", "held", "answer"]

ParsedText = TextDelta | HeldText | HeldResolved


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``: the part
    that must be held back because the next chunk may complete the tag."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


class InlineThinkParser:
    """Incremental splitter for one response.

    ``start`` says where untagged leading text belongs: ``reasoning`` (the template opened the
    think block in the prompt), ``answer`` (the model does not think; a leading
    ``<think>…</think>`` block is still recognised), or ``auto``: untagged leading text is held
    text until a ``</think>`` shows it was reasoning, or the end shows it was the answer.

    Only a possible tag prefix at the end of a chunk is held back (plus leading whitespace, to
    see whether a tag follows it).
    """

    def __init__(self, start: ThinkStart = "auto") -> None:
        self._start: ThinkStart = start
        self._state: _State = "leading"
        self._buffer = ""
        # True when the reasoning state was entered because of ``start``, not an explicit tag:
        # a reasoning field seen later overrides a default but not an explicit tag.
        self._reasoning_by_default = False

    @property
    def state(self) -> str:
        """``leading``, ``reasoning``, ``held`` (auto mode, undecided) or ``answer``."""
        return self._state

    def saw_reasoning_field(self) -> list[ParsedText]:
        """The upstream sends reasoning in its own field, so plain content is the answer.

        Returns what this decides (held content is now known to be answer)."""
        self._start = "answer"
        out: list[ParsedText] = []
        if self._state == "held":
            self._emit_held(out, self._buffer)
            out.append(HeldResolved("answer"))
            self._buffer = ""
            self._state = "answer"
        elif self._state == "reasoning" and self._reasoning_by_default:
            self._emit(out, "reasoning", self._buffer)
            self._buffer = ""
            self._state = "answer"
        return out

    def feed(self, text: str) -> list[ParsedText]:
        out: list[ParsedText] = []
        if text:
            self._process(text, out)
        return out

    def finish(self) -> list[ParsedText]:
        """End of the response: release whatever is held. Idempotent."""
        out: list[ParsedText] = []
        pending, self._buffer = self._buffer, ""
        if self._state == "leading":
            # Only whitespace or an incomplete tag arrived: it was text after all.
            self._emit(out, "reasoning" if self._start == "reasoning" else "answer", pending)
        elif self._state == "reasoning":
            self._emit(out, "reasoning", pending)
        elif self._state == "held":
            self._emit_held(out, pending)
            out.append(HeldResolved("answer"))
        self._state = "answer"
        return out

    # -- internals ---------------------------------------------------------------------------

    @staticmethod
    def _emit(out: list[ParsedText], channel: Channel, text: str) -> None:
        if not text:
            return
        last = out[-1] if out else None
        if isinstance(last, TextDelta) and last.channel == channel:
            out[-1] = TextDelta(channel, last.text + text)
        else:
            out.append(TextDelta(channel, text))

    @staticmethod
    def _emit_held(out: list[ParsedText], text: str) -> None:
        if text:
            out.append(HeldText(text))

    def _process(self, text: str, out: list[ParsedText]) -> None:
        if self._state == "leading":
            self._process_leading(text, out)
        elif self._state == "reasoning":
            self._process_reasoning(text, out)
        elif self._state == "held":
            self._process_held(text, out)
        else:
            self._emit(out, "answer", text)

    def _process_leading(self, text: str, out: list[ParsedText]) -> None:
        buffer = self._buffer + text
        stripped = buffer.lstrip()
        for tag in (OPEN_TAG, CLOSE_TAG):
            if stripped.startswith(tag):
                # Whitespace before a leading tag belongs to neither channel.
                self._buffer = ""
                rest = stripped[len(tag):]
                if tag == OPEN_TAG:
                    self._state = "reasoning"
                    self._reasoning_by_default = False
                    self._process_reasoning(rest, out)
                else:
                    # A bare closing tag first: the reasoning was empty (or sent elsewhere).
                    self._state = "answer"
                    self._emit(out, "answer", rest)
                return
        if not stripped or OPEN_TAG.startswith(stripped) or CLOSE_TAG.startswith(stripped):
            self._buffer = buffer  # still could become a tag
            return
        self._buffer = ""
        if self._start == "answer":
            self._state = "answer"
            self._emit(out, "answer", buffer)
        elif self._start == "reasoning":
            self._state = "reasoning"
            self._reasoning_by_default = True
            self._process_reasoning(buffer, out)
        else:
            self._state = "held"
            self._process_held(buffer, out)

    def _process_reasoning(self, text: str, out: list[ParsedText]) -> None:
        buffer = self._buffer + text
        index = buffer.find(CLOSE_TAG)
        if index >= 0:
            self._buffer = ""
            self._emit(out, "reasoning", buffer[:index])
            self._state = "answer"
            self._emit(out, "answer", buffer[index + len(CLOSE_TAG):])
            return
        keep = _partial_tag_suffix(buffer, CLOSE_TAG)
        self._emit(out, "reasoning", buffer[: len(buffer) - keep])
        self._buffer = buffer[len(buffer) - keep:]

    def _process_held(self, text: str, out: list[ParsedText]) -> None:
        # Only a possible partial tag is kept back, so the cost per chunk does not grow with
        # the text held so far.
        buffer = self._buffer + text
        index = buffer.find(CLOSE_TAG)
        if index >= 0:
            self._buffer = ""
            # Text before a closing tag with no opening one: the template opened the block.
            self._emit_held(out, buffer[:index])
            out.append(HeldResolved("reasoning"))
            self._state = "answer"
            self._emit(out, "answer", buffer[index + len(CLOSE_TAG):])
            return
        keep = _partial_tag_suffix(buffer, CLOSE_TAG)
        self._emit_held(out, buffer[: len(buffer) - keep])
        self._buffer = buffer[len(buffer) - keep:]


def resolve_held(parts: list[ParsedText]) -> list[TextDelta]:
    """``parts`` with held text given the channel it was resolved to (for whole texts and
    tests; the monitor resolves as it streams)."""
    out: list[TextDelta] = []
    held: list[str] = []
    for part in parts:
        if isinstance(part, HeldText):
            held.append(part.text)
        elif isinstance(part, HeldResolved):
            if held:
                out.append(TextDelta(part.channel, "".join(held)))
            held = []
        else:
            out.append(part)
    if held:  # never resolved: what a response that ends without a decision would be
        out.append(TextDelta("answer", "".join(held)))
    return out


def split_inline_think(text: str, start: ThinkStart = "auto") -> tuple[str, str]:
    """Split a whole text into ``(reasoning, answer)`` by the same rules as the parser."""
    parser = InlineThinkParser(start)
    parts = resolve_held(parser.feed(text) + parser.finish())
    reasoning = "".join(part.text for part in parts if part.channel == "reasoning")
    answer = "".join(part.text for part in parts if part.channel == "answer")
    return reasoning, answer
