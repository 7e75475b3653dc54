"""The Case record: one per checked request, everything the harvest needs later.

The schema is stated here once; stores persist it as JSON alongside a few indexed columns.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, model_validator

Action = Literal["pass", "intervened", "rewritten", "refused", "blocked", "error"]
CaseStatus = Literal["in_progress", "complete"]
ReviewVerdict = Literal["confirmed", "false_positive", "bad_correction"]

SCHEMA_VERSION = 2
"""The Case schema this code writes. 1: records written before the version was recorded (no
``schema_version`` field); 2: adds ``schema_version``, ``review``, and ``Correction.cause`` /
``outcome``. Readers accept every version up to this one."""


def _is_stored(info: ValidationInfo) -> bool:
    context = info.context
    return info.mode == "json" or (isinstance(context, dict) and bool(context.get("stored")))


def new_case_id() -> str:
    return f"case_{uuid.uuid4().hex}"


class StepRecord(BaseModel):
    index: int
    channel: Literal["reasoning", "answer"]
    text: str
    round: int = 0
    """0 for the model's first attempt; corrections number their rounds from 1."""
    unsafe: bool | None = None
    """None when the step was never judged (the stream stopped first)."""
    categories: list[str] = Field(default_factory=list)
    score: float | None = None
    raw: str | None = None
    error: str | None = None
    latency_ms: float | None = None
    released: bool = False


class Flag(BaseModel):
    """A flagged step as the client is told of it (no offending text)."""

    step: int
    categories: list[str] = Field(default_factory=list)
    score: float | None = None


RoundOutcome = Literal["completed", "flagged", "failed"]


class Correction(BaseModel):
    """One correction round: why it happened, what was cut, what replaced it, how it ended."""

    round: int
    strategy: str
    cause: str = ""
    """Why this round happened: the flagged step and its verdict, or the failure before it."""
    withheld: str = ""
    inserted: str = ""
    continuation: str = ""
    outcome: RoundOutcome | None = None
    """How the continuation this correction started ended (None: it started none)."""
    extra: dict[str, Any] = Field(default_factory=dict)


class ReviewLabel(BaseModel):
    """A team's review of a case, set before training on it."""

    label: ReviewVerdict
    by: str
    """The name of the admin key that set it (never the key itself), or the CLI user."""
    at: float = Field(default_factory=time.time)
    note: str | None = None


class Timings(BaseModel):
    total_ms: float | None = None
    upstream_first_token_ms: float | None = None
    guard_total_ms: float = 0.0
    guard_max_ms: float = 0.0


class Case(BaseModel):
    schema_version: int = SCHEMA_VERSION
    """New cases are stamped ``SCHEMA_VERSION``; a stored record without the field is 1. A
    stored record is one read from JSON (``model_validate_json``, as every store and the
    fallback file read them) or validated with ``context={"stored": True}``."""
    id: str = Field(default_factory=new_case_id)
    created_at: float = Field(default_factory=time.time)
    model: str | None = None
    upstream: str | None = None
    guard: str | None = None
    mode: str | None = None
    stream: bool = False
    request: dict[str, Any] = Field(default_factory=dict)
    steps: list[StepRecord] = Field(default_factory=list)
    withheld: str = ""
    """Model text the client never saw because a step was flagged (or judged after a flag)."""
    client_reasoning: str = ""
    client_content: str = ""
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    """The tool calls the client was sent, whole (``message.tool_calls`` form), as the model
    made them; not judged. Absent from records written before it existed: empty."""
    action: Action = "pass"
    finish_reason: str | None = None
    flagged: list[Flag] = Field(default_factory=list)
    corrections: list[Correction] = Field(default_factory=list)
    usage: dict[str, Any] | None = None
    timings: Timings = Field(default_factory=Timings)
    error: str | None = None
    review: ReviewLabel | None = None
    status: CaseStatus = "complete"
    """``in_progress`` while the response is still being sent (stored as it starts, so a crash
    loses no case id a client was given); ``complete`` once it has ended, however it ended."""

    @model_validator(mode="before")
    @classmethod
    def _versioned(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict):
            version = data.get("schema_version")
            if version is None and _is_stored(info):
                # Only a stored record without the field is version 1; a case built in code
                # (``Case(model=...)``) is a new one and gets the field's default.
                data = {**data, "schema_version": 1}
                version = 1
            if version is not None and (
                    not isinstance(version, int) or isinstance(version, bool)
                    or not 1 <= version <= SCHEMA_VERSION):
                raise ValueError(f"case schema_version {version!r} is not one this version "
                                 f"reads (1 to {SCHEMA_VERSION}); upgrade reasoning-guardrail")
        return data

    @property
    def checks(self) -> int:
        return sum(1 for step in self.steps if step.unsafe is not None or step.error)


class CaseSummary(BaseModel):
    id: str
    created_at: float
    model: str | None
    action: Action
    flagged: int
    error: str | None
