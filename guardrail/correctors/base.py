"""The corrector protocol: what happens after a step is judged unsafe.

The monitor cancels the upstream, drops unreleased text and asks the corrector for a plan. A
plan may carry fixed text the proxy itself wrote (a refusal, a safety trigger), shown as-is, and
a new stream of model text, which the monitor guards exactly like the first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from guardrail.cases.model import Action
from guardrail.config import CorrectionConfig
from guardrail.events import Channel, TextDelta, UpstreamEvent
from guardrail.guards.base import Verdict
from guardrail.upstreams.base import ChatRequest, Upstream


@dataclass(slots=True)
class CorrectionContext:
    request: ChatRequest
    upstream: Upstream
    config: CorrectionConfig
    released_reasoning: str
    """Reasoning the client has already seen (safe, judged)."""
    released_answer: str
    withheld: str
    """The flagged step and everything after it that the client did not see."""
    verdict: Verdict
    round: int
    """1 for the first correction of a response."""
    channel: Channel = "reasoning"
    """Where the flagged step was: a cut in the answer continues the answer."""
    flagged_released: str = ""
    """Fast mode only: the flagged step's text, which the client already saw."""


@dataclass(slots=True)
class CorrectionPlan:
    action: Action
    inserted: list[TextDelta] = field(default_factory=list)
    """Text written by the proxy, shown to the client unguarded (it is ours)."""
    continuation: AsyncIterator[UpstreamEvent] | None = None
    """Model text to guard and show after ``inserted``; None ends the response."""
    finish_reason: str | None = "stop"
    """Used when there is no continuation (a continuation reports its own)."""
    details: dict[str, str] = field(default_factory=dict)
    """What the case record should keep about this plan (the form used, the trigger...)."""


class Corrector(Protocol):
    name: str

    async def plan(self, context: CorrectionContext) -> CorrectionPlan: ...

    async def aclose(self) -> None: ...
