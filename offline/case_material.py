"""What an intercepted case teaches: the pieces a harvest turns into training records.

A case records every step with its round, channel, verdict and whether the client saw it, and
every correction with what it withheld, what it inserted and what the model wrote next. From
that, for a case the proxy corrected:

- the **prefix**: the reasoning (and answer, for a cut in the answer) the client saw before the
  first cut: judged safe, shared by the safe and the unsafe path (IPO's shared prefix);
- the **unsafe continuation**: what the model wrote from the flagged step until it was stopped
  (the withheld text of the first correction);
- the **safe response**: what the client read in the end, as reasoning and answer, without any
  flagged step that fast mode let through;
- the **trigger** and the **safe continuation** after it, for an intervention.

Text is read from the steps and corrections, never re-derived from a model, so what a harvest
writes is exactly what the proxy saw and showed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from guardrail.cases.model import Action, Case, StepRecord
from guardrail.views import request_text

Correction = Literal["intervene", "rewrite", "refuse"]
CORRECTED: dict[Action, Correction] = {
    "intervened": "intervene", "rewritten": "rewrite", "refused": "refuse",
}
"""The case actions a harvest can learn from, and the correction each names."""


@dataclass(frozen=True, slots=True)
class CaseMaterial:
    case_id: str
    prompt: str
    correction: Correction
    categories: tuple[str, ...]
    score: float | None
    guard: str | None
    label: str | None
    flagged_channel: Literal["reasoning", "answer"]
    prefix_reasoning: str
    """Reasoning the client saw before the first cut."""
    prefix_answer: str
    """Answer the client saw before the first cut (a cut in the answer)."""
    unsafe_continuation: str
    """From the flagged step to where the model was stopped."""
    safe_reasoning: str
    safe_answer: str
    trigger: str
    """The first correction's trigger (empty unless it intervened)."""
    continuation_reasoning: str
    continuation_answer: str
    """What the model wrote after the first trigger and the client read, by channel."""
    continuation_completed: bool
    """The first correction's continuation ended without another flag or failure."""
    finish_reason: str | None

    @property
    def refusal_only(self) -> bool:
        """The correction refused outright: the answer is the proxy's refusal, no model text."""
        return self.correction == "refuse"


def material_of(case: Case) -> CaseMaterial | None:
    """The training material of a corrected case; None for a case there is nothing to learn
    from (passed, blocked, an error, still in progress, no flagged step, no user prompt)."""
    correction = CORRECTED.get(case.action)
    if correction is None or case.status != "complete" or not case.flagged:
        return None
    if not case.corrections:
        return None
    prompt = request_text(case.request.get("messages") or [], max_chars=1_000_000)
    if not prompt.strip():
        return None
    flagged_index = case.flagged[0].step
    flagged = next((step for step in case.steps if step.index == flagged_index), None)
    if flagged is None:
        return None
    first = case.corrections[0]
    shown_before = [step for step in case.steps
                    if step.round == 0 and step.index < flagged_index and step.released]
    continued = [step for step in case.steps if step.round == 1 and step.released]
    leaked = {step.index for step in case.steps
              if step.released and step.unsafe and step.index in _flagged(case)}
    return CaseMaterial(
        case_id=case.id,
        prompt=prompt,
        correction=correction,
        categories=tuple(case.flagged[0].categories),
        score=case.flagged[0].score,
        guard=case.guard,
        label=case.review.label if case.review is not None else None,
        flagged_channel=flagged.channel,
        prefix_reasoning=_joined(shown_before, "reasoning"),
        prefix_answer=_joined(shown_before, "answer"),
        unsafe_continuation=_unsafe_continuation(case, flagged, first.withheld),
        safe_reasoning=_without(case.client_reasoning, case.steps, leaked, "reasoning"),
        safe_answer=_without(case.client_content, case.steps, leaked, "answer"),
        trigger=str(first.extra.get("trigger", "")) if correction == "intervene" else "",
        continuation_reasoning=_joined(continued, "reasoning"),
        continuation_answer=_joined(continued, "answer"),
        continuation_completed=(first.outcome == "completed" if first.outcome is not None
                                else bool(first.extra.get("recovered"))),
        finish_reason=case.finish_reason,
    )


def _flagged(case: Case) -> set[int]:
    return {flag.step for flag in case.flagged}


def _joined(steps: list[StepRecord], channel: str) -> str:
    return "".join(step.text for step in steps if step.channel == channel)


def _unsafe_continuation(case: Case, flagged: StepRecord, withheld: str) -> str:
    """The flagged step and what followed it. Strict mode withheld the flagged step itself;
    fast mode released it, so it is put back in front of what was withheld."""
    if flagged.released and not withheld.startswith(flagged.text):
        return flagged.text + withheld
    return withheld


def _without(shown: str, steps: list[StepRecord], leaked: set[int], channel: str) -> str:
    """What the client read on ``channel``, less any flagged step fast mode let through."""
    for step in steps:
        if step.index in leaked and step.channel == channel:
            shown = shown.replace(step.text, "", 1)
    return shown
