"""The UnsafeChain record: one training example in the form UnsafeChain publishes.

``prompt`` is the user's request; ``response`` is ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``
(DeepSeek-R1 style, what an R1-distill is fine-tuned on). The rest is provenance, kept so that a
team can trace every example back to the case (or public set) it came from:

- ``unsafe_response``: what the model wrote before it was stopped (empty for public sets);
- ``category``, ``score``, ``guard``: the verdict that flagged it;
- ``correction``: how it was corrected (``intervene``, ``rewrite``, ``refuse``, or ``none``
  for a benign case that passed untouched);
- ``case_id``, ``label`` (a review label, or None), ``source`` (``proxy`` for harvested cases,
  the public set's name for imports).

Public sets do not always tag the reasoning (UnsafeChain's own ``response`` is sometimes
untagged), so :func:`split_response` accepts ``<think>R</think>A``, ``R</think>A`` (R1
templates open the block in the prompt) and untagged text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

Correction = Literal["intervene", "rewrite", "refuse", "none"]
CORRECTIONS: tuple[Correction, ...] = ("intervene", "rewrite", "refuse", "none")

OPEN_THINK = "<think>"
CLOSE_THINK = "</think>"


class RecordError(ValueError):
    """A row that is not a valid record; the message says which field and why."""


@dataclass(frozen=True, slots=True)
class ParsedResponse:
    reasoning: str
    answer: str
    tagged: bool
    """False when the text had no ``</think>``: then ``answer`` is the whole text."""


def format_response(reasoning: str, answer: str) -> str:
    """The UnsafeChain / R1 response form: ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``."""
    return f"{OPEN_THINK}\n{reasoning.strip()}\n{CLOSE_THINK}\n\n{answer.strip()}"


def split_response(text: str) -> ParsedResponse:
    """Reasoning and answer of a response, tagged or not (see the module docstring).

    Only the LAST ``</think>`` ends the reasoning: a trace may quote the tag earlier.
    """
    close = text.rfind(CLOSE_THINK)
    if close < 0:
        return ParsedResponse(reasoning="", answer=text.strip(), tagged=False)
    reasoning = text[:close]
    opened = reasoning.find(OPEN_THINK)
    if opened >= 0 and not reasoning[:opened].strip():
        reasoning = reasoning[opened + len(OPEN_THINK):]
    return ParsedResponse(reasoning=reasoning.strip(),
                          answer=text[close + len(CLOSE_THINK):].strip(), tagged=True)


@dataclass(frozen=True, slots=True)
class UnsafeChainRecord:
    prompt: str
    response: str
    unsafe_response: str = ""
    category: str | None = None
    score: float | None = None
    guard: str | None = None
    correction: Correction = "none"
    case_id: str | None = None
    label: str | None = None
    source: str = "proxy"

    @classmethod
    def build(cls, prompt: str, reasoning: str, answer: str,
              **provenance: Any) -> UnsafeChainRecord:
        """A record whose response is formatted from its two parts."""
        return cls(prompt=prompt, response=format_response(reasoning, answer), **provenance)

    @property
    def parsed(self) -> ParsedResponse:
        return split_response(self.response)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: Any) -> UnsafeChainRecord:
        """A record from a JSON object; unknown keys are ignored, bad ones raise RecordError."""
        if not isinstance(row, dict):
            raise RecordError(f"a record is a JSON object, not {type(row).__name__}")
        for name in ("prompt", "response"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise RecordError(f"{name!r}: a non-empty string is required")
        correction = row.get("correction", "none")
        if correction not in CORRECTIONS:
            raise RecordError(f"'correction': {correction!r} is not one of {list(CORRECTIONS)}")
        score = row.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)):
            raise RecordError(f"'score': a number or null, not {score!r}")
        known = {field.name for field in fields(cls)}
        values = {key: value for key, value in row.items() if key in known}
        for name in ("unsafe_response", "source"):
            if name in values and not isinstance(values[name], str):
                raise RecordError(f"{name!r}: a string is required")
        for name in ("category", "guard", "case_id", "label"):
            value = values.get(name)
            if value is not None and not isinstance(value, str):
                values[name] = str(value)
        if score is not None:
            values["score"] = float(score)
        return cls(**values)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Writes rows to ``path`` atomically (a temporary file renamed at the end): a reader never
    sees a half-written file. Returns the number of rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    count = 0
    with partial.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
        out.flush()
        os.fsync(out.fileno())
    partial.replace(path)
    return count


@dataclass(frozen=True, slots=True)
class BadRow:
    line: int
    problem: str


def read_jsonl(path: Path) -> Iterator[tuple[int, Any] | BadRow]:
    """(line number, parsed JSON) per non-blank line, or a BadRow for a line that is not JSON."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                yield BadRow(number, f"not JSON ({error.msg})")
